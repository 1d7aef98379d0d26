"""Prefill and decode planned together, and the KV cache moved between them.

    pair = plan_pair("palm-540b", chips=64, batch=64, prompt=2048, weight_dtype="int8")
    pair.prefill, pair.decode          # two Plans on one mesh
    pair.bridge                        # the collectives that move the cache from prefill's layout to decode's

Both phases run on the same ranks, so they share one mesh: decode is planned first (over every mesh of
the chips, it is the phase that runs once per generated token) and prefill on decode's mesh. Prefill
leaves each block's KV cache split as its own attention split wants it (by KV heads, or by batch);
decode reads it as its split wants. Where the two differ the cache is redistributed once, between the
phases: `drivers.generate.CacheBridge` computes those collectives for the programs `generate` runs,
and here for one block of each run of blocks (the planner's prototypes), charged to every block of it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from ..drivers.generate import CacheBridge
from ..errors import ShardwiseError
from ..ir.collective import format_bytes
from ..ir.kinds import LayerKind
from ..ir.meta import LAYERS
from ..ir.plan import BlockRun, CollectiveRecord, Plan
from ..planning.apply import apply, choices_for
from ..planning.candidate import Candidate
from ..planning.planner import plan
from ..planning.program import Program
from ..strategies.family import parse_ffn
from .engine import Engine


@dataclass(frozen=True)
class BridgeStep:
    """One collective of the cache redistribution, for each block of blocks first..last."""

    first: int
    last: int
    record: CollectiveRecord  # bytes per chip for one block

    @property
    def blocks(self) -> int:
        return self.last - self.first + 1

    @property
    def bytes(self) -> int:
        """Per chip, for every block it stands for."""
        return self.record.bytes * self.blocks

    def line(self) -> str:
        where = f"blocks {self.first}–{self.last}" if self.last > self.first else f"block {self.first}"
        return f"{where} (×{self.blocks}): {self.record.line()}  → {format_bytes(self.bytes)}/chip in all"


@dataclass
class PlanPair:
    prefill: Plan
    decode: Plan
    bridge: list[BridgeStep] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def plans(self) -> list[Plan]:
        return [self.prefill, self.decode]

    @property
    def bridge_bytes(self) -> int:
        return sum(s.bytes for s in self.bridge)


def plan_pair(model: str, *, mesh=None, chips: int | None = None, batch: int = 8, prompt: int = 16,
              context: int | None = None, hardware: str = "tpu-v4", weight_dtype: str | None = None,
              objective: str = "latency", overlap: bool = False, layouts: str | dict | None = None,
              prefill_layouts: str | dict | None = None, decode_layouts: str | dict | None = None,
              engine: Engine | None = None) -> PlanPair:
    """Plan a preset's prefill (`prompt` tokens per sequence into a cache of `context`, default `prompt`,
    positions) and decode (one token at the end of that cache) on one mesh, and the cache bridge.
    `layouts` forces layouts in both phases, `prefill_layouts`/`decode_layouts` in one (as `generate`)."""
    if not isinstance(model, str):
        raise ShardwiseError(f"plan_pair({type(model).__name__}): expected a preset name; for a model object, "
                             f"shardwise.generate(model, ids, n, mesh=..., details=True) reports both plans and "
                             f"Generation.bridge")
    context = context or prompt
    common = {"hardware": hardware, "weight_dtype": weight_dtype, "objective": objective, "batch": batch,
              "context": context, "overlap": overlap}
    decode = plan(model, mesh=mesh, chips=chips, phase="decode", seq=1, layouts=decode_layouts or layouts, **common)
    prefill = plan(model, mesh=decode.mesh, phase="prefill", seq=prompt, layouts=prefill_layouts or layouts, **common)
    notes = [] if mesh is not None else [(f"decode chose mesh {decode.mesh} among the meshes of {chips} chips; "
                                         f"prefill is planned on the same mesh (one set of ranks runs both)")]
    engine = engine or Engine(hardware)
    pre = engine.prototype(model, "prefill", batch, prompt, context)
    dec = engine.prototype(model, "decode", batch, 1, context)
    return PlanPair(prefill, decode, kv_bridge(prefill, decode, pre.gm, dec.gm), notes)


def kv_bridge(prefill: Plan, decode: Plan, prefill_proto, decode_proto) -> list[BridgeStep]:
    """The cache redistribution between two plans of one mesh, from one-block prototypes of each phase's
    step: for every stretch of blocks where both phases keep one layout, the collectives CacheBridge
    inserts between prefill's cache outputs and decode's cache inputs."""
    if prefill.mesh != decode.mesh:
        raise ShardwiseError(f"prefill on mesh {prefill.mesh} and decode on mesh {decode.mesh}: expected one mesh "
                             f"(the same ranks run both phases); plan both with mesh=... or use plan_pair")
    mesh = prefill.mesh
    steps: list[BridgeStep] = []
    for first, last, a, b in _segments(_candidates(prefill), _candidates(decode)):
        for gm, cand, p in ((prefill_proto, a, prefill), (decode_proto, b, decode)):
            forced = {k: v for k, v in p.settings.requested.items() if k in (LayerKind.EMBEDDING, LayerKind.HEAD)}
            apply(gm, mesh, choices_for(gm.meta[LAYERS], [cand], forced))
        bridge = CacheBridge(Program(prefill_proto, mesh), Program(decode_proto, mesh), mesh)
        steps += [BridgeStep(first, last, r) for r in bridge.records]
    return steps


def _candidates(p: Plan) -> list[tuple[BlockRun, Candidate]]:
    """Each run of blocks with the candidate it was planned as: its member and the attention split asked
    for (the attention rows' choice; the run records the split as it acts, which can merge two)."""
    modes = [l.choice for l in p.layers if l.kind == LayerKind.ATTENTION]
    if len(modes) != len(p.runs):
        raise ShardwiseError(f"{p.model} {p.phase}: {len(p.runs)} runs of blocks but {len(modes)} attention rows; "
                             f"expected one row per run, as a plan of a preset (planned on one block) has: plan "
                             f"the model by name, or use shardwise.generate(..., details=True).bridge")
    return [(r, Candidate(parse_ffn(r.member), mode, p.mesh)) for r, mode in zip(p.runs, modes)]


def _segments(pre: list[tuple[BlockRun, Candidate]], dec: list[tuple[BlockRun, Candidate]]):
    """(first, last, prefill candidate, decode candidate) over the blocks, split wherever either changes."""
    cuts = sorted({r.first for r, _ in pre} | {r.first for r, _ in dec} | {pre[-1][0].last + 1})
    for first, nxt in itertools.pairwise(cuts):
        a = next(c for r, c in pre if r.first <= first <= r.last)
        b = next(c for r, c in dec if r.first <= first <= r.last)
        yield first, nxt - 1, a, b
