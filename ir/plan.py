"""Plan: the per-layer decisions for one phase on one mesh, what they communicate and what they cost.

Plain, typed data with a versioned JSON round trip (no pickle, no code evaluated). A Plan made by
`shardwise.plan` also carries the global-view program it was made from (not serialized), so
`Plan.emit(rank)` can build a rank's program.

    runs      the layouts of the blocks, one record per run of consecutive blocks sharing one
              (`plan.chosen`: "ws2d+batch", or "117×ws2d+batch, 1×ws1d_ar+batch" for a mixed plan)
    layers    one row per layer (a block's rows stand for every block of its run: `count`)
    memory    bytes per chip: weights (the 1/n share and what is replicated beyond it), KV cache
    totals    the step: latency, MFU, chip-ms per token
    settings  what was asked: objective, precisions, layouts forced by the user
    sharding  how much of the model is split over the chips: the fraction of parameter bytes and of
              matmul FLOPs, what stays replicated, a block's matmuls every chip computes whole
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, NamedTuple

from ..errors import ShardwiseError
from .collective import Kind, format_bytes
from .kinds import AttentionMode, LayerKind, Objective, Phase
from .mesh import Mesh
from .plan_schema import load

FORMAT = 2  # version of the JSON form; 1 had untyped settings/memory/totals and no version field


@dataclass
class CollectiveRecord:
    node: str
    kind: Kind
    group: str  # mesh axes (or atoms) of the group, e.g. "yz"
    src: str  # layout before, paper notation
    dst: str  # layout after
    bytes: int  # per chip, the paper's accounting
    wire_bytes: float  # per chip, with the (g−1)/g factor
    axes: list[str] = field(default_factory=list)
    weight: bool = False  # moves a weight (weight-gathered layouts), not an activation
    looped: bool = False  # run as a looped collective matmul: its ring steps beside the partial matmuls
    time: float = 0.0  # seconds on the plan's hardware, as the cost model prices it (0: not priced)
    # a parallel block's attention collective that its feed-forward computes beside: that feed-forward's row
    beside: str = ""

    def __post_init__(self) -> None:
        _non_negative(self, "bytes", "wire_bytes", "time")

    @classmethod
    def of(cls, step, mesh: Mesh, dims, *, node: str, weight: bool = False) -> CollectiveRecord:
        """The record of a redistribution step (an ir.collective.Collective); `dims` names the tensor's
        dims in the paper's letters ("BLE", or one name per dim)."""
        return cls(node=node, kind=step.kind, group=mesh.format_atoms(step.atoms), src=step.src.notation(mesh, dims),
                   dst=step.dst.notation(mesh, dims), bytes=step.bytes, wire_bytes=step.wire_bytes,
                   axes=list(step.axes), weight=weight)

    def line(self) -> str:
        sym = self.kind.replace("_", "-")
        return f"{sym}({self.group}) {self.src} → {self.dst}  [{format_bytes(self.bytes)}/chip]"


@dataclass
class LayerPlan:
    name: str
    kind: LayerKind
    block: int | None
    choice: str  # the layout chosen for the layer: a family member (ffn), heads/batch (attention), E/vocab
    dims: dict[str, int] = field(default_factory=dict)
    weights: dict[str, dict[str, str]] = field(default_factory=dict)  # role → {"at_rest", "in_use"}
    collectives: list[CollectiveRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    cost: dict[str, float] = field(default_factory=dict)  # seconds and bytes per step, from the cost model
    count: int = 1  # identical layers this row stands for (blocks.[0-117].mlp)

    def __post_init__(self) -> None:
        self.kind = LayerKind.parse(self.kind, "layer kind")
        _non_negative(self, "count")
        for name, size in self.dims.items():
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ShardwiseError(f"layer {self.name}: dim {name} = {size!r}: expected a whole number ≥ 1")
        _check_choice(self.kind, self.choice, f"layer {self.name}")

    @property
    def comm_bytes(self) -> int:
        return sum(c.bytes for c in self.collectives)


@dataclass
class BlockRun:
    """Consecutive blocks first..last sharing one layout: a family member and an attention split."""

    first: int
    last: int
    member: str  # the family member on this mesh ("ws2d", "bx.ey.fz")
    attention: str  # how the attention core is really split: heads, batch, heads+batch, replicated ("" if none)
    family: str  # the paper's name of the member ("2D WS", "WG-XYZ", ...)
    experts: str = ""  # how a mixture's experts split under the member: "sliced", "parallel" or "a2a" ("" if none)
    latent: str = ""  # a latent attention's low-rank projections: "replicated" or "split" ("" if none)

    def __post_init__(self) -> None:
        _non_negative(self, "first", "last")
        if self.last < self.first:
            raise ShardwiseError(f"blocks {self.first}..{self.last}: the last block comes before the first")
        if self.attention not in _CORE_SPLITS:
            raise ShardwiseError(f"blocks {self.first}..{self.last}: attention split {self.attention!r}: expected one "
                                 f"of {', '.join(repr(a) for a in _CORE_SPLITS)}")
        _check_choice(LayerKind.FFN, self.member, f"blocks {self.first}..{self.last}")

    @property
    def count(self) -> int:
        return self.last - self.first + 1

    @property
    def name(self) -> str:
        experts = (f"+experts-{self.experts}" if self.experts else "") + (f"+latent-{self.latent}" if self.latent else "")
        return (f"{self.member}+{self.attention}" if self.attention else self.member) + experts

    def describe(self) -> str:
        experts = (f" + experts {self.experts}" if self.experts else "") + (f" + latent {self.latent}" if self.latent else "")
        return (f"{self.family} + attention by {self.attention}" if self.attention else self.family) + experts


class ReplicatedWeight(NamedTuple):
    key: str  # state key
    extra_bytes: float  # per rank, beyond the 1/n share
    factor: int  # how many ranks hold each element


@dataclass
class Memory:
    """Bytes per chip, in the planned precisions."""

    weights_total: float = 0.0  # the whole model's weights (not per chip)
    weights_per_chip: float = 0.0
    replicated_per_chip: float = 0.0  # weights held beyond the 1/n share
    kv_cache_per_chip: float = 0.0
    hbm_per_chip: float | None = None  # the hardware's capacity
    replicated: list[ReplicatedWeight] = field(default_factory=list)  # known once the program is built

    def __post_init__(self) -> None:
        self.replicated = [ReplicatedWeight(*r) for r in self.replicated]
        _non_negative(self, "weights_total", "weights_per_chip", "kv_cache_per_chip")
        _as_floats(self, "weights_total", "weights_per_chip", "replicated_per_chip", "kv_cache_per_chip", "hbm_per_chip")


@dataclass
class Totals:
    """One step of the whole model, as the cost model predicts it."""

    latency: float = 0.0  # seconds per step
    mfu: float = 0.0  # model FLOPs utilization: 2 × parameters a token uses (routed experts: k of X) per token
    chip_ms_per_token: float = 0.0
    tokens_per_step: int = 0
    params: float = 0.0
    transitions: float = 0.0  # seconds spent redistributing the residual between runs of blocks

    def __post_init__(self) -> None:
        _non_negative(self, "latency", "mfu", "chip_ms_per_token", "tokens_per_step", "params", "transitions")
        _as_floats(self, "latency", "mfu", "chip_ms_per_token", "params", "transitions")


@dataclass
class Settings:
    """What the plan was asked for."""

    objective: Objective = Objective.LATENCY
    weights: str = "as captured"  # weight precision planned for (bf16, int8, ...)
    kv: str = "as captured"
    overlap: bool = False
    collective_matmul: bool = False  # collectives over a matmul's last dim run as looped collective matmuls
    requested: dict[str, str] = field(default_factory=dict)  # layouts forced by layer kind
    context: int | None = None  # decode: the KV-cache length planned for

    def __post_init__(self) -> None:
        self.objective = Objective.parse(self.objective, "objective")
        for kind, choice in self.requested.items():
            if kind == "latent":  # not a layer: how an attention's low-rank projections split
                if choice not in ("replicated", "split"):
                    raise ShardwiseError(f"the requested layouts: latent {choice!r}: expected 'replicated' or 'split'")
                continue
            _check_choice(LayerKind.parse(kind, "layer kind"), choice, "the requested layouts")


@dataclass
class UnknownOp:
    node: str
    target: str
    module: str


class NotShardedWarning(UserWarning):
    """A plan leaves some of a block's matmuls unsharded: every chip computes them whole
    (`plan(..., strict=True)` makes it a ShardwiseError)."""


@dataclass
class ReplicatedParam:
    """A parameter every chip holds whole (not split over any mesh axis)."""

    name: str  # state key; a block's parameter standing for a run of blocks: model.layers.[0-31].mlp.gate.weight
    bytes: float  # the whole model's bytes of it (every block it stands for), as captured
    share: float  # of the model's parameter bytes

    def __post_init__(self) -> None:
        _non_negative(self, "bytes", "share")
        _as_floats(self, "bytes", "share")


@dataclass
class UnshardedOp:
    """A matmul of a block that is not sharded: every chip computes it whole, or holds its weight whole."""

    node: str  # the op (of one block where the row stands for a run of blocks: `count`)
    target: str  # aten.linear, aten.scaled_dot_product_attention, ...
    module: str  # module path (blocks as a range: model.layers.[0-31].mixer)
    weight: str = ""  # state key of the weight it reads ("" for a matmul of activations)
    why: str = ""  # "every chip computes it whole", "every chip holds its weight whole"
    flops: float = 0.0  # per step, the whole model (all `count` copies)
    share: float = 0.0  # of the model's matmul FLOPs per step
    count: int = 1

    def __post_init__(self) -> None:
        _non_negative(self, "flops", "share", "count")
        _as_floats(self, "flops", "share")

    def describe(self) -> str:
        reads = f" reading {self.weight}" if self.weight else ""
        times = f" ×{self.count}" if self.count > 1 else ""
        why = f"{self.why}; " if self.why else ""
        return (f"{self.module or '(top level)'}: {self.target} {self.node}{reads}{times} "
                f"({why}{self.share * 100:.1f}% of the matmul FLOPs)")


@dataclass
class Sharding:
    """How much of the model the plan splits over the chips, rather than replicating it on every chip.

    A parameter is sharded when its layout splits it over more than one chip; a matmul (projections,
    attention cores, other matmul-like ops) when each chip computes a part of it. Both are exact sums
    over the planned graph (a prototype's block counted once per block it stands for)."""

    chips: int = 1
    param_bytes: float = 0.0  # every parameter of the model, bytes as captured
    sharded_param_bytes: float = 0.0  # those split over more than one chip
    flops: float = 0.0  # matmul FLOPs of one step, the whole model
    sharded_flops: float = 0.0  # those each chip computes only a part of
    replicated: list[ReplicatedParam] = field(default_factory=list)  # parameters held whole, largest first
    unsharded: list[UnshardedOp] = field(default_factory=list)  # a block's matmuls not sharded, most FLOPs first
    experts: list[str] = field(default_factory=list)  # mixture-of-experts modules, run replicated
    expert_param_bytes: float = 0.0  # their parameters (the routers' included), bytes as captured
    experts_per_block: int | None = None  # experts in each of those modules, where known

    def __post_init__(self) -> None:
        _non_negative(self, "chips", "param_bytes", "sharded_param_bytes", "flops", "sharded_flops",
                      "expert_param_bytes")
        _as_floats(self, "param_bytes", "sharded_param_bytes", "flops", "sharded_flops", "expert_param_bytes")

    @property
    def param_fraction(self) -> float:
        return self.sharded_param_bytes / self.param_bytes if self.param_bytes else 0.0

    @property
    def flops_fraction(self) -> float:
        return self.sharded_flops / self.flops if self.flops else 0.0

    def line(self, shown: int = 3) -> str:
        """"sharded: 96.3% of parameter bytes, 98.1% of matmul FLOPs (replicated: lm_head.weight 2.1%, ...)"."""
        head = (f"sharded: {self.param_fraction * 100:.1f}% of parameter bytes, {self.flops_fraction * 100:.1f}% of "
                f"matmul FLOPs")
        if self.chips <= 1:
            return head + " (one chip: nothing is split)"
        if not self.replicated:
            return head + " (no parameter replicated)"
        rest = self.replicated[shown:]
        names = [f"{r.name} {_percent(r.share)}" for r in self.replicated[:shown]]
        if rest:
            names.append(f"{len(rest)} more {_percent(sum(r.share for r in rest))}")
        return head + f" (replicated: {', '.join(names)})"

    def experts_note(self) -> str:
        """"experts run replicated (4 experts per block: 61.2% of the parameters): model.layers.[0-1].mlp"."""
        if not self.experts:
            return ""
        per = f"{self.experts_per_block} experts per block: " if self.experts_per_block else ""
        share = self.expert_param_bytes / self.param_bytes if self.param_bytes else 0.0
        return (f"experts run replicated ({per}{share * 100:.1f}% of the parameters): "
                + ", ".join(self.experts[:4]) + (" …" if len(self.experts) > 4 else ""))

    def unsharded_lines(self, shown: int = 6) -> list[str]:
        """One line per unsharded matmul of a block (the first `shown`, then how many more)."""
        out = [u.describe() for u in self.unsharded[:shown]]
        if len(self.unsharded) > shown:
            rest = self.unsharded[shown:]
            out.append(f"… and {len(rest)} more ({sum(u.share for u in rest) * 100:.1f}% of the matmul FLOPs)")
        return out


@dataclass
class Plan:
    model: str
    mesh: Mesh
    hardware: str
    phase: Phase
    batch: int
    seq: int
    layers: list[LayerPlan]
    runs: list[BlockRun] = field(default_factory=list)
    unknown_ops: list[UnknownOp] = field(default_factory=list)
    memory: Memory = field(default_factory=Memory)
    totals: Totals = field(default_factory=Totals)
    settings: Settings = field(default_factory=Settings)
    explain: list[str] = field(default_factory=list)  # every candidate, its cost and why it lost
    notes: list[str] = field(default_factory=list)  # how the plan was made: defaults used, meshes skipped
    sharding: Sharding | None = None  # how much is split over the chips (None: not recorded, older plans)
    program: Any = field(default=None, repr=False, compare=False)  # planning.program.Program; not serialized

    def __post_init__(self) -> None:
        self.phase = Phase.parse(self.phase, "phase")
        _non_negative(self, "batch", "seq")
        for layer in self.layers:
            for c in layer.collectives:
                axes = set(re.sub(r"[^a-z]", "", c.group)) | set(c.axes)
                idle = sorted(a for a in axes if a not in "xyz" or self.mesh.shape["xyz".index(a)] == 1)
                if idle:
                    raise ShardwiseError(f"layer {layer.name}: a {c.kind} over {c.group!r} (axes {c.axes}) uses "
                                         f"{', '.join(idle)}, which {'is' if len(idle) == 1 else 'are'} no axis larger "
                                         f"than 1 of mesh {self.mesh}: the collectives do not belong to this mesh")

    # ------------------------------------------------------------------------------------ the choice
    @property
    def chosen(self) -> str:
        """The layouts of the blocks: "ws2d+batch", or run by run "117×ws2d+batch, 1×ws1d_ar+batch"."""
        return _by_run(self.runs, lambda r: r.name)

    @property
    def family(self) -> str:
        """The same in the paper's names: "2D WS + attention by batch"."""
        return _by_run(self.runs, lambda r: r.describe())

    @property
    def main(self) -> BlockRun | None:
        """The run covering the most blocks (the first of equals): the plan's layout in one word."""
        return max(self.runs, key=lambda r: r.count, default=None)

    # ------------------------------------------------------------------------------------ use
    def emit(self, rank: int, *, group_name=None, weights=None, device=None, schedule: bool | None = None,
             collective_matmul: bool | None = None, cpu_kernels: bool = True):
        """Rank `rank`'s program (an nn.Module holding only its shards) for the real process groups.

        `weights`: a WeightSource to read shards from (default: the captured model's tensors);
        `device`: where to run, when the plan was captured on the meta device;
        `schedule`: False emits each collective waited where it is lowered, without the overlap schedule
        (passes/schedule.py; default: the program's setting, on);
        `collective_matmul`: True runs collectives over a matmul's contracted or produced last dim as the
        paper's looped collective matmul (passes/collective_matmul.py; default: the program's setting, off).
        """
        if self.program is None:
            raise ShardwiseError(
                "this Plan has no program attached (it was loaded from JSON): re-plan with "
                "shardwise.plan(model, args, layouts=...) to emit"
            )
        return self.program.emit(rank, group_name=group_name, weights=weights, device=device, schedule=schedule,
                                 collective_matmul=collective_matmul, cpu_kernels=cpu_kernels)

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
            rows.append(f"{l.name:<{w}}  {l.kind:<9} {l.choice:<8}  comm {format_bytes(l.comm_bytes):>10}/chip{cost}{times}")
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
            rows += [f"  {u.node}: {u.target} in {u.module or '(top level)'}" for u in self.unknown_ops]
        m = self.memory
        mem = [("weights_total", m.weights_total), ("weights_per_chip", m.weights_per_chip),
               ("replicated_per_chip", m.replicated_per_chip)]
        if self.totals.latency:
            mem += [("kv_cache_per_chip", m.kv_cache_per_chip)]
        if m.hbm_per_chip is not None:
            mem += [("hbm_per_chip", m.hbm_per_chip)]
        rows += ["", "memory per chip: " + ", ".join(f"{k} {format_bytes(v)}" for k, v in mem)]
        if self.sharding is not None:
            rows.append(self.sharding.line())
            if self.sharding.unsharded:
                rows.append("matmuls of the blocks not sharded:")
                rows += [f"  {line}" for line in self.sharding.unsharded_lines()]
        if self.totals.latency:
            t = self.totals
            parts = [f"latency {t.latency * 1e3:.3f} ms", f"mfu {t.mfu * 100:.1f}%",
                     f"chip_ms_per_token {t.chip_ms_per_token:.4g} chip-ms/token", f"tokens_per_step {t.tokens_per_step}",
                     f"params {t.params:.4g}"]
            if t.transitions:
                parts.append(f"transitions {t.transitions * 1e3:.3f} ms")
            rows += ["totals: " + ", ".join(parts)]
        rows += [f"note: {n}" for n in self.notes]
        if self.runs:
            s = self.settings
            rows += [f"chosen: {self.chosen} ({self.family}), objective {s.objective}, weights {s.weights}"
                     + (f", context {s.context}" if s.context is not None else "")]
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.summary()

    # ------------------------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        d = asdict(replace(self, program=None))  # the attached program is not data: never copy it
        d.pop("program")
        d["mesh"] = str(self.mesh)
        d["memory"]["replicated"] = [list(r) for r in self.memory.replicated]
        return {"format": FORMAT, **d}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), indent=kw.pop("indent", 2), **kw)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """A Plan from its JSON form, checked against the schema: a ShardwiseError names what is wrong."""
        return load(cls, text, version=FORMAT, parts=(CollectiveRecord, LayerPlan, BlockRun, Memory, Totals, Settings,
                                                      UnknownOp, Sharding, ReplicatedParam, UnshardedOp))


# ------------------------------------------------------------------------------------ helpers
_NAME_CHECKS: list[Callable[[str], None]] = []


def check_member_names_with(check: Callable[[str], None]) -> None:
    """Have every BlockRun check its member name (the layout family registers its parser: ir cannot
    import it); `check` raises a ShardwiseError for a name that is not a member of the family."""
    if check not in _NAME_CHECKS:
        _NAME_CHECKS.append(check)


EXPERT_SPLITS = ("sliced", "parallel", "a2a", "replicated")  # a2a: expert parallel with all-to-all dispatch
_CORE_SPLITS = ("", "heads", "batch", "heads+batch", "replicated")
_EMBED_SPLITS = ("auto", "E", "vocab", "replicated")
_HEAD_SPLITS = ("auto", "E", "vocab", "tokens")


def _check_choice(kind: LayerKind, choice: str, where: str) -> None:
    """A layer's layout name must be one its kind has (family members are checked by the family)."""
    if kind == LayerKind.EXPERTS:  # "<member>[:parallel]" for a layer, "sliced"/"parallel" as a request
        member, _, mode = choice.partition(":")
        if mode not in ("", *EXPERT_SPLITS):
            raise ShardwiseError(f"{where}: experts layout {choice!r}: expected a member, then ':sliced', ':parallel', "
                                 f"':a2a' or ':replicated'")
        if not mode and member in EXPERT_SPLITS:
            return
        for check in _NAME_CHECKS:
            check(member)
    elif kind == LayerKind.FFN:
        for check in _NAME_CHECKS:
            check(choice)
    elif kind == LayerKind.ATTENTION:  # "heads"/"batch", ":split" when a latent attention's projections split
        mode, _, latent = choice.partition(":")
        AttentionMode.parse(mode, f"attention layout of {where}")
        if latent not in ("", "split"):
            raise ShardwiseError(f"{where}: attention layout {choice!r}: expected 'heads' or 'batch', then ':split' or nothing")
    elif kind == LayerKind.EMBEDDING and choice not in _EMBED_SPLITS:
        raise ShardwiseError(f"{where}: {kind} layout {choice!r}: expected one of {', '.join(_EMBED_SPLITS)}")
    elif kind == LayerKind.HEAD and choice not in _HEAD_SPLITS:
        raise ShardwiseError(f"{where}: {kind} layout {choice!r}: expected one of {', '.join(_HEAD_SPLITS)}")


def _non_negative(obj, *names: str) -> None:
    for name in names:
        v = getattr(obj, name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0 or v == float("inf"):
            raise ShardwiseError(f"{type(obj).__name__}.{name} = {v!r}: expected a finite number ≥ 0")


def _as_floats(obj, *names: str) -> None:
    """Numbers that are floats stay floats (a JSON round trip writes what it read)."""
    for name in names:
        if (v := getattr(obj, name)) is not None:
            setattr(obj, name, float(v))


def _percent(share: float) -> str:
    return f"{share * 100:.1f}%" if share >= 0.0005 or share == 0 else "<0.1%"


def _by_run(runs: list[BlockRun], name: Callable[[BlockRun], str]) -> str:
    if not runs:
        return ""
    if len(runs) == 1:
        return name(runs[0])
    return ", ".join(f"{r.count}×{name(r)}" for r in runs)
