"""Plan: the per-layer decisions for one phase on one mesh, what they communicate and what they cost.

Plain data with a JSON round trip (no pickle). A Plan made by `shardwise.plan` also carries the
global-view program it was made from (not serialized), so `Plan.emit(rank)` can build a rank's program.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .collective import format_bytes
from .mesh import Mesh


@dataclass
class CollectiveRecord:
    node: str
    kind: str  # all_gather | reduce_scatter | all_reduce | all_to_all
    group: str  # mesh axes (or atoms) of the group, e.g. "yz"
    src: str  # layout before, paper notation
    dst: str  # layout after
    bytes: int  # per chip, the paper's accounting
    wire_bytes: float  # per chip, with the (g−1)/g factor
    axes: list[str] = field(default_factory=list)
    weight: bool = False  # moves a weight (weight-gathered layouts), not an activation

    def line(self) -> str:
        sym = self.kind.replace("_", "-")
        return f"{sym}({self.group}) {self.src} → {self.dst}  [{format_bytes(self.bytes)}/chip]"


@dataclass
class LayerPlan:
    name: str
    kind: str  # embedding | attention | ffn | head | output
    block: int | None
    layout: str
    dims: dict[str, int] = field(default_factory=dict)
    weights: dict[str, dict[str, str]] = field(default_factory=dict)  # role → {"at_rest", "in_use"}
    collectives: list[CollectiveRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    cost: dict[str, float] = field(default_factory=dict)  # seconds and bytes per step, from the cost model
    count: int = 1  # identical layers this row stands for (blocks.[0-117].mlp)

    @property
    def comm_bytes(self) -> int:
        return sum(c.bytes for c in self.collectives)


@dataclass
class Plan:
    model: str
    mesh: Mesh
    hardware: str
    phase: str
    batch: int
    seq: int
    layers: list[LayerPlan]
    unknown_ops: list[dict[str, str]] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)  # per-rank bytes: weights, replicated parts, KV cache
    totals: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # layouts requested, objective, dtypes, ...
    explain: list[str] = field(default_factory=list)  # every candidate, its cost and why it lost
    program: Any = field(default=None, repr=False, compare=False)  # api.Program; not serialized

    # ------------------------------------------------------------------------------------ use
    def emit(self, rank: int, *, group_name=None, weights=None, device=None):
        """Rank `rank`'s program (an nn.Module holding only its shards) for the real process groups.

        `weights`: a WeightSource to read shards from (default: the captured model's tensors);
        `device`: where to run, when the plan was captured on the meta device.
        """
        if self.program is None:
            raise RuntimeError(
                "this Plan has no program attached (it was loaded from JSON): re-plan with "
                "shardwise.plan(model, args, layouts=...) to emit"
            )
        return self.program.emit(rank, group_name=group_name, weights=weights, device=device)

    @property
    def collectives(self) -> list[CollectiveRecord]:
        return [c for l in self.layers for c in l.collectives]

    def layer(self, name: str) -> LayerPlan:
        for l in self.layers:
            if l.name == name:
                return l
        raise KeyError(f"no layer {name!r}; layers: {', '.join(l.name for l in self.layers)}")

    # ------------------------------------------------------------------------------------ printing
    def summary(self, *, collectives: bool = True) -> str:
        head = (
            f"{self.model}  phase={self.phase}  batch={self.batch}  seq={self.seq}  mesh={self.mesh} "
            f"({self.mesh.size} chips)  hardware={self.hardware}"
        )
        rows = [head, ""]
        w = max([len(l.name) for l in self.layers] + [10])
        for l in self.layers:
            cost = ""
            if l.cost:
                cost = (f"  step {l.cost.get('time', 0) * 1e3:8.3f} ms  (compute {l.cost.get('compute', 0) * 1e3:.3f}, "
                        f"memory {l.cost.get('memory', 0) * 1e3:.3f}, comm {l.cost.get('comm', 0) * 1e3:.3f})")
            times = f" ×{l.count}" if l.count > 1 else ""
            rows.append(f"{l.name:<{w}}  {l.kind:<9} {l.layout:<8}  comm {format_bytes(l.comm_bytes):>10}/chip{cost}{times}")
            for role, wl in l.weights.items():
                gathered = "" if wl["at_rest"] == wl["in_use"] else f"  (stored {wl['at_rest']})"
                rows.append(f"{'':<{w}}    weight {role:<7} {wl['in_use']}{gathered}")
            if collectives:
                for c in l.collectives:
                    rows.append(f"{'':<{w}}    {c.line()}")
            for n in l.notes:
                rows.append(f"{'':<{w}}    note: {n}")
        if self.unknown_ops:
            rows += ["", "ops with no layout rule (ran on replicated inputs):"]
            rows += [f"  {u['node']}: {u['target']} in {u['module'] or '(top level)'}" for u in self.unknown_ops]
        if self.memory:
            rows += ["", "memory per chip: " + ", ".join(f"{k} {format_bytes(v)}" for k, v in self.memory.items()
                                                           if isinstance(v, (int, float)))]
        if self.totals:
            rows += ["totals: " + ", ".join(f"{k} {_fmt_total(k, v)}" for k, v in self.totals.items())]
        if self.settings.get("family"):
            rows += [f"chosen: {self.settings.get('chosen')} ({self.settings['family']}), objective "
                     f"{self.settings.get('objective')}, weights {self.settings.get('weights')}"]
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.summary()

    # ------------------------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        from dataclasses import replace

        d = asdict(replace(self, program=None))  # the attached program is not data: never copy it
        d.pop("program")
        d["mesh"] = str(self.mesh)
        return d

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), indent=kw.pop("indent", 2), **kw)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        d = json.loads(text)
        d["mesh"] = Mesh.parse(d["mesh"])
        layers = []
        for l in d.pop("layers"):
            l["collectives"] = [CollectiveRecord(**c) for c in l["collectives"]]
            layers.append(LayerPlan(**l))
        return cls(layers=layers, **d)


def _fmt_total(key: str, v: float) -> str:
    if key.endswith("bytes"):
        return format_bytes(v)
    if key.endswith("_s") or key in ("latency", "time"):
        return f"{v * 1e3:.3f} ms"
    if key == "mfu":
        return f"{v * 100:.1f}%"
    if key == "chip_ms_per_token":
        return f"{v:.4g} chip-ms/token"
    if key == "transitions":
        return f"{v * 1e3:.3f} ms"
    return f"{v:.4g}"
