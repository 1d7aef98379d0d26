"""Hardware profiles: what one chip computes, reads and sends per second.

Published figures (peak bf16 FLOP/s, HBM size and bandwidth, interconnect) come from the vendors' data
sheets and, for TPU v4, from PAPER.md. `flops_efficiency`, `hbm_efficiency` and `collective_latency`
are not published: they are fitted once per profile (see `strategies/cost.py` and
`experiments/fit_tpu_v4.py`) and documented in `fitted`.

Interconnect: a chip sends at most `link_bandwidth` bytes/s (all its links); on a torus a collective
can also be limited by the links of the axes it spans (`axis_bandwidth` per axis, so a group over two
axes gets twice one axis's links). None means axes do not limit it: behind a switch (NVLink/NVSwitch)
any group reaches the chip's full bandwidth.

Measured by shape and size (cpu-local, `runtime/calibrate.py`): `matmul_shapes` gives matmul FLOP/s at a
grid of local shapes, so each matmul is priced at its own shape's instead of at one peak; `collectives`
gives each kind of collective and group size its own latency and bandwidth, by size range where large
ones cost more per byte than small ones. The TPU and GPU profiles have neither (one peak, one link).

Overlap: with `weight_prefetch`, weight all-gathers are issued ahead of use (the emitted programs do:
passes/schedule.py), and `comm_overlap` (0..1) is the fraction of their time that the compute running
meanwhile hides. cpu-local measures it (`runtime/calibrate.py`: gloo's thread against single-threaded
ranks sharing the cores); the TPU and GPU profiles assume 1 (DMA engines and links move the data while
the cores compute; TPU v4's fit was made with full overlap), which is not measured.
`branch_overlap` is the same fraction for a parallel block's attention collectives that its
feed-forward computes beside (strategies/cost.py); None takes `comm_overlap`. TPU v4 sets 0: its fit
priced no such overlap (pricing it moves PaLM's decode rows 12–13% under the published figures).

Meeting: `sync_waits` (cpu-local) is what a collective takes beyond its measured price when the ranks
computed longer since their last one: with more single-threaded ranks than cores they drift apart while
they compute, and a collective waits for the last of its group to arrive, the others' cores idle. The
collectives are priced after 1 ms of compute; a 1024-token program computes 10-50 ms between them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
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
    link_bandwidth: float  # bytes/s one chip's links carry (published)
    link_efficiency: float = 1.0  # achievable fraction of it in collectives
    axis_bandwidth: float | None = None  # bytes/s over the links of one mesh axis (torus); None: not limiting
    topology: Literal["torus", "switch"] = "torus"
    collective_latency: float = 10e-6  # seconds per collective, whatever its size and group
    hop_latency: float = 0.0  # seconds per ring step: a collective over g chips takes g − 1 steps
    weight_prefetch: bool = True  # weight all-gathers are issued ahead of use (passes/schedule.py, async DMA)
    comm_overlap: float = 1.0  # fraction of a prefetched gather's time that compute running meanwhile hides
    # fraction of a parallel block's attention-only activation collectives its feed-forward hides, computing
    # while they are in flight (strategies/cost.py); None: comm_overlap
    branch_overlap: float | None = None
    flops_efficiency: float = 1.0  # achievable fraction of peak in large matmuls
    hbm_efficiency: float = 1.0  # achievable fraction of HBM bandwidth
    call_overhead: float = 0.0  # seconds one matmul call costs beyond its FLOPs and bytes (launch, dispatch)
    # a collective over a dim other than the first needs a local copy to merge or order its blocks, as the
    # emitted programs do (runtime/lower.py): priced as memory traffic on the step's critical path. False
    # where the fit assumed none (TPU v4: the ICI's DMA gathers into strided layouts, and the fitted rows
    # did not price them)
    relayout_copies: bool = True
    # bytes/s one chip streams through pointwise ops, cats and reductions over activations (read + write),
    # serial with its matmuls (strategies/cost.py: elementwise). None: not priced, as where a compiler fuses
    # them into the matmuls (XLA on TPU v4, whose fit priced none; the GPU profiles); cpu-local measures it
    elementwise_bandwidth: float | None = None
    # measured per collective: (kind, group size, latency s, wire bytes/s[, up to wire bytes]) fitted on this
    # machine; where one matches a collective, it replaces collective_latency / the link bandwidth
    # (strategies/cost.py). A kind and group may have several lines, each for the collectives of at most its
    # `up to` wire bytes (None: any size), the smallest that holds a collective pricing it; beyond them all,
    # the largest's line (cpu-local: a least-squares line up to 16 MiB, then one through each larger size)
    collectives: tuple[tuple, ...] = ()
    # measured matmul FLOP/s per chip by local shape: (M, K, N, FLOP/s) at every point of a grid of Ms × Ks × Ns
    # (cpu-local: runtime/calibrate.py). Where set, a matmul's compute is its FLOPs over the FLOP/s at its
    # shape (`matmul_flops`) instead of peak · flops_efficiency; attention cores and experts keep the peak
    matmul_shapes: tuple[tuple[int, int, int, float], ...] = ()
    # measured wait at a collective for the ranks to meet: (group size, seconds the ranks computed since their
    # last collective, seconds the collective then takes beyond its price in `collectives`), per group size at
    # several such gaps (cpu-local: runtime/calibrate.py, where `collectives` are timed after 1 ms of compute
    # and more ranks than cores share the machine, so the longer the ranks ran apart, the longer the last one
    # takes to arrive). The cost model adds `sync_wait` to each collective (strategies/cost.py); () adds none
    sync_waits: tuple[tuple[int, float, float], ...] = ()
    source: str = ""
    fitted: dict[str, str] = field(default_factory=dict, compare=False)  # constant → how it was fitted

    def __post_init__(self) -> None:
        for name, (low, strict, optional) in _RANGES.items():  # a profile is read from a file a user may edit
            v = getattr(self, name)
            if v is None and optional:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > low if strict else v >= low) \
                    or (name in _FRACTIONS and v > 1):
                want = ("a fraction from 0 to 1" if name in _FRACTIONS else
                        f"a number {'>' if strict else '≥'} {low:g}") + (" or null" if optional else "")
                raise ShardwiseError(f"hardware profile {self.name!r}: {name} is {v!r}; expected {want}. "
                                     f"Fix the profile, or for cpu-local run `shardwise calibrate` again")
        # from JSON: lists back to tuples (hashable, equal to the saved profile)
        object.__setattr__(self, "collectives", tuple(_fit_entry(self.name, e) for e in self.collectives))
        # looked up for every collective the search prices: a dict of lines by size, not a scan
        fits: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
        for k, g, a, b, up_to in self.collectives:
            fits.setdefault((k, g), []).append((math.inf if up_to is None else up_to, a, b))
        object.__setattr__(self, "_fits", {key: sorted(lines) for key, lines in fits.items()})
        object.__setattr__(self, "matmul_shapes", _matmul_grid(self.name, self.matmul_shapes))
        object.__setattr__(self, "sync_waits", _sync_waits(self.name, self.sync_waits))
        waits: dict[int, list[tuple[float, float]]] = {}
        for g, gap, extra in self.sync_waits:
            waits.setdefault(g, []).append((gap, extra))
        object.__setattr__(self, "_waits", waits)
        object.__setattr__(self, "_by_shape", {})  # (m, k, n) → FLOP/s, as the search asks

    def matmul_flops(self, m: int, k: int, n: int) -> float:
        """FLOP/s of one [m, k]·[k, n] matmul on this chip: from `matmul_shapes`, interpolated linearly in
        log2 of each of m, k and n between the grid's points (the log of FLOP/s; a shape beyond the grid
        takes its edge), or peak · flops_efficiency where the profile has no grid."""
        if not self.matmul_shapes:
            return self.peak_flops * self.flops_efficiency
        key = (m, k, n)
        got = self._by_shape.get(key)
        if got is None:
            got = self._by_shape[key] = _interpolate(self.matmul_shapes, key)
        return got

    def collective_fit(self, kind: str, group: int, wire: float = 0.0) -> tuple[float, float] | None:
        """(latency s, wire bytes/s) measured for `kind` over `group` chips, if this profile has it: the line
        for a collective of `wire` bytes (the smallest range that holds it; beyond every range, the largest's)."""
        lines = self._fits.get((kind, group))
        if lines is None:
            return None
        for up_to, latency, bandwidth in lines:
            if wire <= up_to:
                return latency, bandwidth
        return lines[-1][1:]

    def sync_wait(self, group: int, gap: float) -> float:
        """Seconds a collective over `group` chips waits for them to meet beyond its `collectives` price, when
        they computed `gap` seconds since their last collective (`sync_waits`): linear in the gap between the
        measured gaps, the nearest measured one's beyond them; for a group size not measured, the largest
        measured one below it (none: 0)."""
        below = [g for g in self._waits if g <= group]
        if not below:
            return 0.0
        points = self._waits[max(below)]
        if gap <= points[0][0]:
            return points[0][1]
        for (g0, e0), (g1, e1) in zip(points, points[1:]):
            if gap <= g1:
                return e0 + (e1 - e0) * (gap - g0) / (g1 - g0)
        return points[-1][1]

    def collective_bandwidth(self, axes: Sequence[str]) -> float:
        """Bytes/s one chip sends in a collective whose group spans these mesh axes."""
        chip = self.link_bandwidth * self.link_efficiency
        if self.axis_bandwidth is None:
            return chip
        return min(chip, self.axis_bandwidth * max(1, len(set(axes))))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Hardware":
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as e:
            raise ShardwiseError(f"hardware profile: not JSON ({e}). Fix the profile, or for cpu-local run "
                                 f"`shardwise calibrate` again") from None
        if not isinstance(fields, dict):
            raise ShardwiseError(f"hardware profile: expected a JSON object of fields, got a "
                                 f"{type(fields).__name__}. Fix the profile, or for cpu-local run "
                                 f"`shardwise calibrate` again")
        unknown = sorted(set(fields) - set(cls.__dataclass_fields__))
        if unknown:
            raise ShardwiseError(f"hardware profile {fields.get('name', '?')!r}: unknown field(s) "
                                 f"{', '.join(unknown)}; expected only {', '.join(cls.__dataclass_fields__)}. "
                                 f"Fix the profile, or for cpu-local run `shardwise calibrate` again")
        return cls(**fields)


def _fit_entry(profile: str, entry) -> tuple[str, int, float, float, float | None]:
    """One `collectives` entry as (kind, group, latency, bandwidth, up to wire bytes or None), or a ShardwiseError."""
    try:
        kind, group, latency, bandwidth, *rest = entry
        up_to = rest[0] if rest else None
        out = (str(kind), int(group), float(latency), float(bandwidth), None if up_to is None else float(up_to))
        if len(rest) > 1 or out[1] < 1 or out[3] <= 0 or (out[4] is not None and out[4] <= 0):
            raise ValueError
    except (TypeError, ValueError):
        raise ShardwiseError(f"hardware profile {profile!r}: collectives entry {entry!r}; expected [kind, group "
                             f"size ≥ 1, latency s, wire bytes/s > 0] with an optional fifth, the most wire bytes "
                             f"it prices (> 0, or null). Fix the profile, or for cpu-local run `shardwise calibrate` "
                             f"again") from None
    return out


def _sync_waits(profile: str, entries) -> tuple[tuple[int, float, float], ...]:
    """`sync_waits` as sorted (group, gap s, extra s) tuples, distinct gaps per group, or a ShardwiseError."""
    try:
        out = tuple(sorted((int(g), float(gap), float(extra)) for g, gap, extra in entries))
        if any(g < 1 or gap < 0 or not math.isfinite(extra) for g, gap, extra in out) \
                or len({e[:2] for e in out}) != len(out):
            raise ValueError
    except (TypeError, ValueError):
        raise ShardwiseError(f"hardware profile {profile!r}: sync_waits must be [group size ≥ 1, gap s ≥ 0, extra s] "
                             f"entries, one per group and gap. Fix the profile, or for cpu-local run `shardwise "
                             f"calibrate` again") from None
    return out


def _matmul_grid(profile: str, entries) -> tuple[tuple[int, int, int, float], ...]:
    """`matmul_shapes` as sorted (m, k, n, FLOP/s) tuples covering a full grid, or a ShardwiseError."""
    try:
        out = tuple(sorted((int(m), int(k), int(n), float(f)) for m, k, n, f in entries))
        if any(min(e) <= 0 for e in out):
            raise ValueError
    except (TypeError, ValueError):
        raise ShardwiseError(f"hardware profile {profile!r}: matmul_shapes must be [M, K, N, FLOP/s] entries, all "
                             f"positive. Fix the profile, or for cpu-local run `shardwise calibrate` again") from None
    axes = [sorted({e[i] for e in out}) for i in range(3)]
    if len({e[:3] for e in out}) != len(out) or len(out) != math.prod(len(a) for a in axes):
        raise ShardwiseError(f"hardware profile {profile!r}: matmul_shapes has {len(out)} entries, not one for each "
                             f"point of its grid M {axes[0]} × K {axes[1]} × N {axes[2]}. Fix the profile, or for "
                             f"cpu-local run `shardwise calibrate` again")
    return out


def _interpolate(grid: tuple[tuple[int, int, int, float], ...], shape: tuple[int, int, int]) -> float:
    """FLOP/s at `shape` from a full (m, k, n, FLOP/s) grid: trilinear in log2 of the dims, of log FLOP/s,
    each dim clamped to the grid's range."""
    axes = [sorted({e[i] for e in grid}) for i in range(3)]
    value = {e[:3]: math.log(e[3]) for e in grid}
    corners = []  # per dim: [(grid value, weight)]
    for axis, x in zip(axes, shape):
        x = min(max(x, axis[0]), axis[-1])
        hi = next(i for i, v in enumerate(axis) if v >= x)
        if axis[hi] == x or hi == 0:
            corners.append([(axis[hi], 1.0)])
            continue
        a, b = axis[hi - 1], axis[hi]
        t = (math.log2(x) - math.log2(a)) / (math.log2(b) - math.log2(a))
        corners.append([(a, 1.0 - t), (b, t)])
    return math.exp(sum(wm * wk * wn * value[(m, k, n)]
                        for m, wm in corners[0] for k, wk in corners[1] for n, wn in corners[2]))


# numeric fields: (lower bound, strictly above it, may be None)
_RANGES = {"peak_flops": (0, True, False), "hbm_bytes": (0, True, False), "hbm_bandwidth": (0, True, False),
           "link_bandwidth": (0, True, False), "link_efficiency": (0, True, False), "axis_bandwidth": (0, True, True),
           "collective_latency": (0, False, False), "hop_latency": (0, False, False),
           "comm_overlap": (0, False, False), "branch_overlap": (0, False, True),
           "flops_efficiency": (0, True, False), "hbm_efficiency": (0, True, False),
           "call_overhead": (0, False, False), "elementwise_bandwidth": (0, True, True)}
_FRACTIONS = {"comm_overlap", "branch_overlap", "link_efficiency", "flops_efficiency", "hbm_efficiency"}


# TPU v4: published figures from PAPER.md; the five constants below are fitted once, on PaLM 540B's
# four published rows, by experiments/fit_tpu_v4.py (grid search; all four rows then choose the
# paper's layouts, predicted latency within 5%; leave-one-out predictions in that script's output).
TPU_V4 = Hardware(
    name="tpu-v4",
    peak_flops=275e12,
    hbm_bytes=32 * GiB,
    hbm_bandwidth=1200e9,
    link_bandwidth=270e9,  # 6 links × 45 GB/s
    topology="torus",
    flops_efficiency=0.75,
    hbm_efficiency=0.7,
    link_efficiency=100 / 270,
    collective_latency=2e-6,
    hop_latency=0.5e-6,
    relayout_copies=False,
    branch_overlap=0.0,
    source="PAPER.md (Pope et al. 2022, TPU v4)",
    fitted={
        "flops_efficiency": "0.75: grid search on PaLM 540B's four published rows (experiments/fit_tpu_v4.py)",
        "hbm_efficiency": "0.7: same fit",
        "link_efficiency": "100/270: same fit; collectives are not limited by the axes they span, as in PAPER.md",
        "collective_latency": "2 µs per collective: same fit",
        "hop_latency": "0.5 µs per ring step (g − 1 steps for g chips): same fit",
        "call_overhead": "0: not fitted (PaLM has no experts, and XLA compiles an experts' loop into one program)",
        "comm_overlap": "1: assumed (prefetched weight gathers fully hidden, as the fit above assumed), not measured",
        "relayout_copies": "False: the fit above priced no local copies around collectives",
        "branch_overlap": "0: the fit above priced no overlap of a parallel block's attention collectives with "
                          "its feed-forward; priced at comm_overlap with the constants above, the two decode rows "
                          "fall to 12% and 13% under the published figures (from +2% and −6%), prefill batch 1 "
                          "to −3% (from +2%), prefill batch 512 (weight-gathered) is unchanged",
    },
)
# GPUs: published figures; no published rows to fit against, so the efficiencies and latencies are
# assumed (TPU v4's fitted efficiencies, NVLink-class latencies), not fitted.
_ASSUMED = {"flops_efficiency": 0.75, "hbm_efficiency": 0.7, "link_efficiency": 0.7, "collective_latency": 5e-6,
            "hop_latency": 1e-6, "call_overhead": 5e-6,  # call: a CUDA kernel launch and a small GEMM's tail
            "comm_overlap": 1.0}  # NCCL/DMA moves prefetched weights while the SMs compute: assumed fully hidden
_ASSUMED_NOTE = {k: "assumed, not fitted (no published rows)" for k in _ASSUMED}
_ASSUMED_NOTE["branch_overlap"] = "None (comm_overlap): assumed, not fitted (no published rows)"
A100_80G = Hardware(
    name="a100-80g", peak_flops=312e12, hbm_bytes=80e9, hbm_bandwidth=2039e9, link_bandwidth=300e9,
    topology="switch", source="NVIDIA A100 80GB SXM data sheet; NVLink 3 (300 GB/s each way)", fitted=_ASSUMED_NOTE,
    **_ASSUMED,
)
H100 = Hardware(
    name="h100", peak_flops=989e12, hbm_bytes=80e9, hbm_bandwidth=3350e9, link_bandwidth=450e9,
    topology="switch", source="NVIDIA H100 SXM data sheet; NVLink 4 (450 GB/s each way)", fitted=_ASSUMED_NOTE,
    **_ASSUMED,
)
H200 = Hardware(
    name="h200", peak_flops=989e12, hbm_bytes=141e9, hbm_bandwidth=4800e9, link_bandwidth=450e9,
    topology="switch", source="NVIDIA H200 SXM data sheet; NVLink 4 (450 GB/s each way)", fitted=_ASSUMED_NOTE,
    **_ASSUMED,
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

