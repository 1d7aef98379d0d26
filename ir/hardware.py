"""Hardware profiles: what one chip computes, reads and sends per second.

Published figures (peak bf16 FLOP/s, HBM size and bandwidth, interconnect) come from the vendors' data
sheets and, for TPU v4, from PAPER.md. `flops_efficiency`, `hbm_efficiency` and `collective_latency`
are not published: they are fitted once per profile (see `strategies/cost.py` and
`experiments/fit_tpu_v4.py`) and documented in `fitted`.

Interconnect: on a torus each mesh axis has its own links, so a collective over the atoms of two axes
moves data over twice the links (`link_bandwidth` is per axis, both directions of a ring); behind a
switch (NVLink/NVSwitch) every collective shares one chip's bandwidth.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal, Sequence

from ..errors import ShardwiseError

GiB = 1024**3


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # dense bf16 FLOP/s per chip
    hbm_bytes: float  # HBM capacity per chip
    hbm_bandwidth: float  # bytes/s per chip
    link_bandwidth: float  # bytes/s a chip moves in a collective over one axis (torus) or any group (switch)
    topology: Literal["torus", "switch"] = "torus"
    collective_latency: float = 10e-6  # seconds per collective, whatever its size
    flops_efficiency: float = 1.0  # achievable fraction of peak in large matmuls
    hbm_efficiency: float = 1.0  # achievable fraction of HBM bandwidth
    source: str = ""
    fitted: dict[str, str] = field(default_factory=dict, compare=False)  # constant → how it was fitted

    def collective_bandwidth(self, axes: Sequence[str]) -> float:
        """Bytes/s one chip sends in a collective whose group spans these mesh axes."""
        if self.topology == "switch":
            return self.link_bandwidth
        return self.link_bandwidth * max(1, len(set(axes)))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Hardware":
        return cls(**json.loads(text))


# Fitted constants for TPU v4 (PaLM 540B rows of PAPER.md): see experiments/fit_tpu_v4.py.
TPU_V4 = Hardware(
    name="tpu-v4",
    peak_flops=275e12,
    hbm_bytes=32 * GiB,
    hbm_bandwidth=1200e9,
    link_bandwidth=90e9,  # 270 GB/s per chip over 3 axes: 2 links × 45 GB/s per axis
    topology="torus",
    collective_latency=10e-6,
    source="PAPER.md (Pope et al. 2022, TPU v4)",
)
A100_80G = Hardware(
    name="a100-80g", peak_flops=312e12, hbm_bytes=80e9, hbm_bandwidth=2039e9, link_bandwidth=300e9,
    topology="switch", collective_latency=10e-6, source="NVIDIA A100 80GB SXM data sheet; NVLink 3 (300 GB/s each way)",
)
H100 = Hardware(
    name="h100", peak_flops=989e12, hbm_bytes=80e9, hbm_bandwidth=3350e9, link_bandwidth=450e9,
    topology="switch", collective_latency=10e-6, source="NVIDIA H100 SXM data sheet; NVLink 4 (450 GB/s each way)",
)
H200 = Hardware(
    name="h200", peak_flops=989e12, hbm_bytes=141e9, hbm_bandwidth=4800e9, link_bandwidth=450e9,
    topology="switch", collective_latency=10e-6, source="NVIDIA H200 SXM data sheet; NVLink 4 (450 GB/s each way)",
)
PROFILES: dict[str, Hardware] = {h.name: h for h in (TPU_V4, A100_80G, H100, H200)}
CPU_LOCAL = "cpu-local"


def cpu_local_path() -> Path:
    import os

    base = Path(os.environ.get("SHARDWISE_CACHE", Path.home() / ".cache" / "shardwise"))
    return base / "cpu-local.json"


def get_hardware(name: "str | Hardware") -> Hardware:
    """A profile by name; `cpu-local` reads what `shardwise calibrate` measured on this machine."""
    if isinstance(name, Hardware):
        return name
    if name in PROFILES:
        return PROFILES[name]
    if name == CPU_LOCAL:
        path = cpu_local_path()
        if not path.exists():
            raise ShardwiseError(
                f"hardware 'cpu-local' has not been measured on this machine ({path} is missing): "
                f"run `shardwise calibrate` first"
            )
        return Hardware.from_json(path.read_text())
    raise ShardwiseError(f"unknown hardware {name!r}: known profiles are {', '.join([*PROFILES, CPU_LOCAL])}")


def with_constants(hw: Hardware, **kw) -> Hardware:
    return replace(hw, **kw)
