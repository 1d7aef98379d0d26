"""What a report shows, read off a Plan: no drawing here, only data the HTML, traces and figures share.

    explained(plan)     the candidates of the chosen mesh (time per step, chosen / why it lost /
                        refused) and the other meshes' best, parsed from `plan.explain`, which
                        planning/record.py writes in one fixed format
    axis_roles(plan)    which role (batch, E, F) each mesh axis plays in the plan's main run
    time_parts(layer)   compute / memory / communication seconds of one layer row, and its step time
    block_names(layer)  the layer names a row standing for a run of blocks stands for
    memory_parts(plan)  bytes per chip: the 1/n share of the weights, what is replicated beyond it, the
                        KV cache, and the hardware's capacity
    sharded_parts(plan) the fractions of parameter bytes and matmul FLOPs split over the chips, and what
                        is not (parameters held whole, a block's matmuls left unsharded)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import ShardwiseError
from ..ir.plan import LayerPlan, Plan
from ..strategies.family import parse_ffn

_RANGE = re.compile(r"\[(\d+)-(\d+)\]")
PARTS = ("compute", "memory", "comm")  # the cost model's three terms, in the order reports show them
PART_NAMES = {"compute": "compute", "memory": "memory", "comm": "communication"}
_REASON = {"compute": "compute", "memory traffic": "memory", "communication": "comm"}


@dataclass(frozen=True)
class CandidateLine:
    """One candidate of the chosen mesh: a family member and an attention split (`ws2d+batch`)."""

    name: str
    ms: float | None  # predicted milliseconds per step (None when refused)
    chosen: bool
    verdict: str  # "chosen", "tie", "+3.784 ms: +16% communication", or why it was refused
    refused: bool = False
    part: str = ""  # the cost term that lost it the most: compute, memory or comm ("" if none)


@dataclass(frozen=True)
class MeshLine:
    """Another mesh of the same chips and its best candidate (or why it had none)."""

    mesh: str
    ms: float | None
    best: str


@dataclass
class Explained:
    mesh: str = ""
    blocks: int = 0
    candidates: list[CandidateLine] = field(default_factory=list)
    meshes: list[MeshLine] = field(default_factory=list)


_HEAD = re.compile(r"candidates on mesh (\S+) \(per step; blocks ×(\d+)\):")
_REFUSED = re.compile(r"\s+(\S+)\s+refused: (.*)")
_TIMED = re.compile(r"\s+(\S+)\s+([\d.]+) ms\s+(.*)")
_LOST = re.compile(r"\+[\d.]+ ms: \+(?:\d+|inf)% (compute|memory traffic|communication)")
_OTHER = re.compile(r"\s+(\S+)\s+(?:([\d.]+) ms\s+(\S+)|no plan: (.*))")


def explained(plan: Plan) -> Explained:
    """The plan's `explain` lines as data. A line that is not in the recorder's format is an error, not
    skipped: the report would otherwise show fewer candidates than the planner weighed."""
    out = Explained()
    section = None
    for line in plan.explain:
        if m := _HEAD.fullmatch(line):
            out.mesh, out.blocks, section = m[1], int(m[2]), "candidates"
        elif line == "other meshes (best candidate):":
            section = "meshes"
        elif section == "candidates" and (m := _REFUSED.fullmatch(line)):
            out.candidates.append(CandidateLine(m[1], None, False, m[2], refused=True))
        elif section == "candidates" and (m := _TIMED.fullmatch(line)):
            lost = _LOST.fullmatch(m[3])
            out.candidates.append(CandidateLine(m[1], float(m[2]), m[3] == "chosen", m[3],
                                                part=_REASON[lost[1]] if lost else ""))
        elif section == "meshes" and (m := _OTHER.fullmatch(line)):
            out.meshes.append(MeshLine(m[1], float(m[2]) if m[2] else None, m[3] or f"no plan: {m[4]}"))
        else:
            raise ShardwiseError(f"plan.explain line {line!r} is not in the format planning/record.py writes "
                                 f"(candidates on mesh ..., one candidate or mesh per line); expected the "
                                 f"explanation of an unmodified Plan: re-plan, or drop plan.explain")
    return out


def axis_roles(plan: Plan) -> dict[str, str]:
    """Mesh axis → the role it plays in the plan's main run ("batch", "E", "F"; "" for none or size 1)."""
    roles = dict.fromkeys("xyz", "")
    if plan.main is None:
        return roles
    member = parse_ffn(plan.main.member).effective(plan.mesh)
    for role, axes in (("batch", member.batch), ("E", member.e), ("F", member.f)):
        for a in axes:
            roles[a] = role
    return roles


def time_parts(layer: LayerPlan) -> dict[str, float]:
    """Seconds per step of one row (one block when the row stands for many): compute, memory, comm, time."""
    return {k: float(layer.cost.get(k, 0.0)) for k in (*PARTS, "time")}


def memory_parts(plan: Plan) -> dict[str, float | None]:
    """Bytes per chip: weights' 1/n share, weights replicated beyond it, KV cache, their total, capacity."""
    m = plan.memory
    share = m.weights_per_chip - m.replicated_per_chip
    return {"weights": share, "replicated": m.replicated_per_chip, "kv_cache": m.kv_cache_per_chip,
            "total": m.weights_per_chip + m.kv_cache_per_chip, "capacity": m.hbm_per_chip}


def block_names(layer: LayerPlan) -> list[str]:
    """The layers a row stands for, one name per block: blocks.[0-116].attn → blocks.0.attn … blocks.116.attn
    (a row standing for several without a range in its name: "name (i/count)")."""
    if layer.count == 1:
        return [layer.name]
    m = _RANGE.search(layer.name)
    if m and int(m[2]) - int(m[1]) + 1 == layer.count:
        return [layer.name[:m.start()] + str(i) + layer.name[m.end():] for i in range(int(m[1]), int(m[2]) + 1)]
    return [f"{layer.name} ({i + 1}/{layer.count})" for i in range(layer.count)]


def step_label(plan: Plan) -> str:
    """What one step of the plan is: "decode: 64 sequences, 1 token each, KV cache 2048"."""
    ctx = f", KV cache {plan.settings.context}" if plan.settings.context else ""
    tokens = "token" if plan.seq == 1 else "tokens"
    return f"{plan.phase}: {plan.batch} sequence{'s' if plan.batch != 1 else ''}, {plan.seq} {tokens} each{ctx}"


@dataclass(frozen=True)
class ShardedParts:
    """How much of the model a plan splits over the chips (`Plan.sharding`, as a report shows it)."""

    params: float  # fraction of the parameter bytes split over more than one chip
    flops: float  # fraction of the matmul FLOPs each chip computes only a part of
    line: str  # "sharded: 96.3% of parameter bytes, 98.1% of matmul FLOPs (replicated: ...)"
    replicated: list[tuple[str, float]]  # (parameter, share of the parameter bytes), largest first
    unsharded: list[str]  # a block's matmuls left unsharded, one line each
    experts: str  # "experts run replicated (...)", or ""


def sharded_parts(plan: Plan) -> ShardedParts | None:
    """The plan's sharded fractions and what stays whole (None: the plan records none, an older plan)."""
    s = plan.sharding
    if s is None:
        return None
    return ShardedParts(params=s.param_fraction, flops=s.flops_fraction, line=s.line(),
                        replicated=[(r.name, r.share) for r in s.replicated],
                        unsharded=[u.describe() for u in s.unsharded], experts=s.experts_note())
