"""fuse_collectives: sibling conversions that need the same collective share one.

Two projections of one layer often leave the same collective to do on tensors of one shape and layout:
k and v (`all-reduce(x) BK_y LH {Σx}` each), gate and in (`reduce-scatter(x) BLF_y {Σx} → BLF_yx`
each). Done apart, each pays a collective's fixed latency; done together, one collective moves the
same bytes. `plan_fusions` decides which conversions (of `insert_collectives.plan_conversions`) share
their first step, and where it runs; `insert_collectives` builds it, and `planning/costing.py` prices
it as one collective (one latency, the bytes of all), so the cost model and the program agree.

A fusion group is conversions that
  - are owned by the same layer (so accounting per layer and kind is unchanged: fused bytes are the sum),
  - start with the same communicating step (kind, atoms, dims, source and target layouts) on tensors of
    the same shape and dtype,
  - are independent: the fused step runs right before the group's earliest first consumer `at`, and each
    member's source is ready there, or becomes so by moving the pure ops that make it (and are not yet
    computed at `at`) to just before `at` (`hoist`: a few ops, none a collective, none that needs a
    conversion placed after `at`). Whatever depends on a member's collective comes after `at`, so no
    member can depend on another's output.
Not fused: steps over the first dim (`_merges_when_fused`), which stacked would need a copy of the
whole fused tensor to merge the ranks' blocks, more than the fixed latency they would save.
In the global view the fused step is `stack` on a new leading dim (unsplit) → the same collective with
its dims shifted by one → `unbind`; its bytes are exactly the sum of the members' (the paper's
accounting is linear in the tensor), and every element is summed across the same ranks in the same
order as apart, so the numbers are bit-identical.

`SHARDWISE_FUSE=0` in the environment (or `with unfused():`) turns fusion off: the unfused program,
to compare against (numerics, step time), and its cost.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

import torch.fx as fx

from ..ir.collective import Collective
from ..ir.layout import Layout
from ..ir.meta import COLLECTIVE, LAYERS
from .attribute import Attribution

STACK = "fuse_stack"  # the name of the node stacking a fusion's tensors (fx may add a suffix)
MAX_HOIST = 32  # ops moved earlier for one member; beyond that the member is left unfused


def enabled() -> bool:
    return os.environ.get("SHARDWISE_FUSE", "1") != "0"


@contextmanager
def unfused() -> Iterator[None]:
    """Plan and build programs without fused collectives (the reference they are compared with)."""
    old = os.environ.get("SHARDWISE_FUSE")
    os.environ["SHARDWISE_FUSE"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SHARDWISE_FUSE", None)
        else:
            os.environ["SHARDWISE_FUSE"] = old


@dataclass
class Fusion:
    """Conversions (duck-typed `insert_collectives.Conversion`) whose first steps run as one collective."""

    members: list  # Conversion, in program order of their first consumers
    at: fx.Node  # the fused step is inserted right before this node
    hoist: list[fx.Node] = field(default_factory=list)  # moved, in program order, to just before `at`

    @property
    def step(self) -> Collective:
        return self.members[0].steps[0]


def plan_fusions(gm: fx.GraphModule, conversions: Sequence, *, owners: Sequence[str] | None = None,
                 positions: dict[fx.Node, int] | None = None) -> list[Fusion]:
    """The fusion groups (two members or more) among `conversions`, without touching the graph.
    `owners` (the layer each conversion is accounted to) and `positions` (node → its index in the graph),
    where the caller has them already: the cost model, which reads both for every candidate."""
    if not enabled() or LAYERS not in gm.meta or len(conversions) < 2:
        return []
    if owners is None:
        attribution = Attribution(gm.meta[LAYERS])
        owners = [attribution.owner(c.src, c.first_consumer) for c in conversions]
    pos = positions if positions is not None else {n: i for i, n in enumerate(gm.graph.nodes)}
    uses: dict[fx.Node, list] = {}
    for c in conversions:
        for node, _, _ in c.uses:
            uses.setdefault(node, []).append(c)

    buckets: dict[tuple, list] = {}
    for c, owner in zip(conversions, owners):
        if not c.steps or not c.steps[0].communicates or getattr(c, "inside", False) or _merges_when_fused(c.steps[0]):
            continue
        val = c.src.meta.get("val")
        if val is None:
            continue
        key = (owner, c.steps[0], tuple(val.shape), val.dtype)
        buckets.setdefault(key, []).append(c)

    out: list[Fusion] = []
    taken: set[fx.Node] = set()  # nodes some fusion moves or inserts before
    for group in buckets.values():
        if len(group) < 2:
            continue
        group = sorted(group, key=lambda c: pos[c.first_consumer])
        while len(group) >= 2:
            head, rest = group[0], group[1:]
            at = head.first_consumer
            P = pos[at]
            members, hoist, left = [head], [], []
            for c in rest:
                ids = {id(m) for m in members} | {id(c)}
                extra = _hoistable(c.src, P, pos, set(hoist), uses, taken, ids)
                if extra is None:
                    left.append(c)
                    continue
                members.append(c)
                hoist.extend(extra)
            if len(members) >= 2 and at not in taken:
                hoist.sort(key=pos.__getitem__)
                taken.update(hoist)
                taken.add(at)
                out.append(Fusion(members, at, hoist))
            group = left
    return out


def _merges_when_fused(step: Collective) -> bool:
    """Whether the fused step would need local copies the member's does not (`Collective.local_copies`,
    in mesh order): a member over the first dim needs none, but stacked it runs over the second, and the
    ranks' blocks must then be merged or moved, a copy of the whole fused tensor, to save one collective's
    fixed latency. A weight-gathered layout's gathers are such (a weight split over its first dim): fused,
    its q, k, v, o gathers copied 16 MiB per block here and its gate and up 32 MiB, 336 ms of a 1.6 s step
    (bench_layouts, 1024 tokens), against 3.5 ms of latency each saved. Those stay apart; steps over a
    later dim, or with no dim (all-reduce), copy as much apart as fused."""
    return fused_step(step, 2).local_copies() > step.local_copies()


def _hoistable(src: fx.Node, P: int, pos: dict, already: set, uses: dict, taken: set, group: set[int]
               ) -> list[fx.Node] | None:
    """The ops at or after position P that `src` needs (itself included), if all may move before P."""
    need: list[fx.Node] = []
    seen: set[fx.Node] = set()
    stack = [src]
    while stack:
        n = stack.pop()
        if n in seen or pos[n] < P or n in already:
            continue
        seen.add(n)
        if n.op != "call_function" or COLLECTIVE in n.meta or n in taken or _mutates(n) or len(seen) > MAX_HOIST:
            return None
        need.append(n)
        stack.extend(n.all_input_nodes)
    for n in need:  # a conversion read by a moved op is placed before its first consumer: that must move too
        for c in uses.get(n, ()):
            if id(c) in group:  # it reads a member's collective: the members are not independent
                return None
            if pos[c.first_consumer] >= P and c.first_consumer not in seen and c.first_consumer not in already:
                return None
    return need


def _mutates(n: fx.Node) -> bool:
    schema = getattr(n.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def stacked(layout: Layout) -> Layout:
    """The layout of `stack([...], 0)` of tensors in `layout`: a new leading dim, unsplit."""
    return Layout(((),) + layout.dims, layout.partial)


def fused_step(step: Collective, n: int) -> Collective:
    """The step on n stacked tensors: dims shifted past the new leading dim, n times the elements."""
    return replace(step, src=stacked(step.src), dst=stacked(step.dst),
                   dim=None if step.dim is None else step.dim + 1,
                   dst_dim=None if step.dst_dim is None else step.dst_dim + 1,
                   elements=step.elements * n)


def members_of(node: fx.Node) -> int:
    """How many conversions a collective node of the global view serves: n for a fused one (its input is
    the stack `insert_collectives` builds), else 1."""
    x = node.args[0] if node.args else None
    if isinstance(x, fx.Node) and x.name.startswith(STACK) and isinstance(x.args[0], (list, tuple)):
        return len(x.args[0])
    return 1


def member_step(step: Collective, n: int) -> Collective:
    """One member's step of a fused step over n stacked tensors (the inverse of `fused_step`)."""
    if n == 1:
        return step
    return replace(step, src=Layout(step.src.dims[1:], step.src.partial), dst=Layout(step.dst.dims[1:], step.dst.partial),
                   dim=None if step.dim is None else step.dim - 1,
                   dst_dim=None if step.dst_dim is None else step.dst_dim - 1,
                   elements=step.elements // n)
