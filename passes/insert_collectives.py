"""insert_collectives: every change of layout becomes explicit nodes in the global-view graph.

Where a node's input is needed in another layout than its producer makes, the steps of
`strategies.redistribute` are inserted right before the first consumer (a weight gathered for a
weight-gathered layout is thus gathered just before its matmul, not at program start) and shared by
later consumers needing the same layout: the parallel block's one input all-gather. Sibling
conversions of one layer that start with the same collective on tensors of one shape (k and v's
all-reduce, gate and in's reduce-scatter) share it (`passes/fuse_collectives.py`): the tensors are
stacked on a new leading dim, the collective runs once, and `unbind` gives each its piece back.

In the global view a collective does not change the tensor's value, only where its pieces live, so
the graph still computes the model: each inserted op is the identity on the global tensor.

Reads  `sw_layout`, `sw_in_layouts`, `val`. Writes the new nodes with `sw_layout`, `sw_collective`
(a fused collective's names the stacked step: its bytes are its members' together).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..ir.collective import Collective
from ..ir.layout import Layout
from ..ir.mesh import Mesh
from ..ir.meta import COLLECTIVE, CONVERSION, DISPATCH, IN_LAYOUTS, LAYERS, LAYOUT, SIGNATURE
from ..strategies.redistribute import dispatch, redistribute
from ..strategies.rules import bind
from .attribute import Attribution
from .fuse_collectives import STACK, Fusion, fused_step, member_step, members_of, plan_fusions, stacked
from .graph_utils import copy_meta
from .pipeline import graph_pass


# Global-view collectives: identities on the global tensor (the layout lives in node.meta).
def all_gather(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    return x


def reduce_scatter(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    return x


def all_reduce(x: torch.Tensor, group: str) -> torch.Tensor:
    return x


def all_to_all(x: torch.Tensor, src_dim: int, dst_dim: int, group: str) -> torch.Tensor:
    return x


def local_slice(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    return x


def partial_mask(x: torch.Tensor, group: str) -> torch.Tensor:
    return x


OPS = {
    "all_gather": all_gather,
    "reduce_scatter": reduce_scatter,
    "all_reduce": all_reduce,
    "all_to_all": all_to_all,
    "slice": local_slice,
    "mask": partial_mask,
}
REDISTRIBUTE_OPS = frozenset(OPS.values())


@dataclass
class Conversion:
    """A producer needed in another layout: the steps, and every use that reads the converted tensor."""

    src: fx.Node
    want: Layout
    steps: list[Collective]
    uses: list[tuple[fx.Node, str, int | None]] = field(default_factory=list)  # (consumer, arg name, list index)
    inside: bool = False  # run inside its consumer by emit (all-to-all dispatch): priced and listed, not inserted

    @property
    def first_consumer(self) -> fx.Node:
        return self.uses[0][0]


def plan_conversions(gm: fx.GraphModule, mesh: Mesh) -> list[Conversion]:
    """Every layout change the propagated graph needs, without touching it (the cost model reads this)."""
    made: dict[tuple[str, Layout], Conversion] = {}
    memo = gm.__dict__.setdefault(_ARGS, {})
    dispatched = []  # moe_ffns with an all-to-all dispatch, in order
    for node in gm.graph.nodes:
        meta = node.meta
        if meta.get(DISPATCH):
            dispatched.append(node)
        req = meta.get(IN_LAYOUTS)
        if not req:
            continue
        positions = _positions(node, memo)
        for name in (("outputs",) if node.op == "output" else req):
            for idx, src in positions.get(name, ()):
                want = req[name][idx] if idx is not None else req[name]
                have = src.meta.get(LAYOUT)
                if want is None or have is None or want is have or want == have:
                    continue
                key = (src.name, want)
                conversion = made.get(key)
                if conversion is None:
                    val = src.meta["val"]
                    steps = redistribute(have, want, tuple(val.shape), mesh, itemsize=val.element_size())
                    conversion = made[key] = Conversion(src, want, steps)
                conversion.uses.append((node, name, idx))
    return list(made.values()) + [_dispatch(n, mesh) for n in dispatched]


# The planner plans the conversions of hundreds of candidates on one prototype graph: where each
# argument's tensors sit (argument name → its (list index or None, source node) pairs) is the same for
# all of them, so it is remembered per node while the node keeps its argument objects (a pass that
# rewires a node replaces them), in a dict on the graph module (an attribute, like propagate's memo).
_ARGS = "_shardwise_tensor_args"


def _positions(node: fx.Node, memo: dict) -> dict[str, tuple[tuple[int | None, fx.Node], ...]]:
    got = memo.get(node)
    if got is None or got[0] is not node.args or got[1] is not node.kwargs:
        positions: dict[str, list] = {}
        for name, idx, src in _tensor_args(node):
            positions.setdefault(name, []).append((idx, src))
        got = memo[node] = (node.args, node.kwargs, {k: tuple(v) for k, v in positions.items()})
    return got[2]


def _dispatch(node: fx.Node, mesh: Mesh) -> Conversion:
    """A moe_ffn's all-to-all dispatch (`sw_dispatch`): its tokens' collectives, which emit runs inside it."""
    x = node.args[0]
    return Conversion(x, x.meta[LAYOUT], list(dispatch_steps(node, mesh)), [(node, "x", None)], inside=True)


def dispatch_steps(node: fx.Node, mesh: Mesh) -> tuple[Collective, ...]:
    """The collectives of a moe_ffn's all-to-all dispatch over its `sw_dispatch` atoms (strategies.dispatch)."""
    atoms = node.meta[DISPATCH]
    x, ids = node.args[0], node.args[4]
    T, E = x.meta["val"].shape
    return dispatch(atoms, T // mesh.group_size(atoms), ids.meta["val"].shape[-1], E,
                    node.args[3].meta["val"].shape[0], mesh, x.meta["val"].element_size())


@graph_pass(needs=(SIGNATURE, LAYOUT), makes=(LAYOUT,))
def insert_collectives(gm: fx.GraphModule, mesh: Mesh) -> fx.GraphModule:
    conversions = plan_conversions(gm, mesh)
    owners = _owners(gm, conversions)
    fusions = plan_fusions(gm, conversions)
    fused: dict[int, Fusion] = {id(c): f for f in fusions for c in f.members}
    for f in fusions:  # first every move, so that no step inserted below is left behind by one
        for n in f.hoist:
            f.at.prepend(n)
    done: set[int] = set()
    for conv in conversions:
        if conv.inside:  # the op runs them itself; what it lowers to is accounted to this conversion
            conv.first_consumer.meta[CONVERSION] = (conv.src.name, conv.first_consumer.name, owners[id(conv)])
            continue
        if id(conv) in done:
            continue
        f = fused.get(id(conv))
        if f is None:
            _insert(gm, conv, conv.src, conv.steps, mesh, owners[id(conv)])
            continue
        firsts = _insert_fused(gm, f, mesh, owners[id(f.members[0])])
        for member, first in zip(f.members, firsts):
            _insert(gm, member, first, member.steps[1:], mesh, owners[id(member)])
            done.add(id(member))
    gm.graph.lint()
    gm.recompile()
    return gm


def _owners(gm: fx.GraphModule, conversions: list[Conversion]) -> dict[int, str | None]:
    """The layer each conversion is accounted to, decided on the graph before anything is inserted (as the
    plan's records are): inserting reorders a node's users, and with them where "first consumer" leads."""
    if LAYERS not in gm.meta:
        return {id(c): None for c in conversions}
    attribution = Attribution(gm.meta[LAYERS])
    return {id(c): attribution.owner(c.src, c.first_consumer) for c in conversions}


def _insert(gm: fx.GraphModule, conv: Conversion, cur: fx.Node, steps: list[Collective], mesh: Mesh,
            owner: str | None) -> None:
    with gm.graph.inserting_before(conv.first_consumer):
        for step in steps:
            cur = _step_node(gm, cur, step, mesh, conv.first_consumer)
            cur.meta[CONVERSION] = (conv.src.name, conv.first_consumer.name, owner)
    for node, name, idx in conv.uses:
        _replace(node, name, idx, cur)


def _insert_fused(gm: fx.GraphModule, f: Fusion, mesh: Mesh, owner: str | None) -> list[fx.Node]:
    """stack → the one collective → unbind, before `f.at`; each member's tensor after the shared step."""
    head, step, n = f.members[0], f.step, len(f.members)
    conversion = (head.src.name, head.first_consumer.name, owner)  # one layer owns them all (accounting)
    g = gm.graph
    with g.inserting_before(f.at):
        pack = g.create_node("call_function", torch.ops.aten.stack.default, ([c.src for c in f.members], 0),
                             name=STACK)
        pack.meta["val"] = torch.stack([c.src.meta["val"] for c in f.members], 0)
        pack.meta[LAYOUT] = stacked(step.src)
        out = _step_node(gm, pack, fused_step(step, n), mesh, f.at)
        parts = g.create_node("call_function", torch.ops.aten.unbind.int, (out, 0), name="fuse_unbind")
        parts.meta["val"] = tuple(c.src.meta["val"] for c in f.members)
        parts.meta[LAYOUT] = tuple(step.dst for _ in f.members)
        firsts = []
        for i, c in enumerate(f.members):
            x = g.create_node("call_function", operator.getitem, (parts, i), name="fuse_part")
            x.meta["val"] = c.src.meta["val"]
            x.meta[LAYOUT] = step.dst
            firsts.append(x)
        for m in (pack, out, parts, *firsts):
            m.meta[CONVERSION] = conversion
            copy_meta(m, f.at, "nn_module_stack")
    return firsts


def _tensor_args(node: fx.Node):
    """(argument name, list index or None, source) of every node among the arguments, in order."""
    if node.op == "output":
        for i, src in enumerate(node.args[0]):
            if isinstance(src, fx.Node):
                yield "outputs", i, src
        return
    for name, v in bind(node).items():
        if isinstance(v, fx.Node):
            yield name, None, v
        elif isinstance(v, (list, tuple)):
            for i, s in enumerate(v):
                if isinstance(s, fx.Node):
                    yield name, i, s


def _replace(node: fx.Node, name: str, idx: int | None, new: fx.Node) -> None:
    if node.op == "output":
        outs = list(node.args[0])
        outs[idx] = new
        node.args = (type(node.args[0])(outs),)
        return
    schema = node.target._schema
    pos = next(i for i, a in enumerate(schema.arguments) if a.name == name)
    if pos < len(node.args) and not schema.arguments[pos].kwarg_only:
        args = list(node.args)
        args[pos] = _put(args[pos], idx, new)
        node.args = tuple(args)
    else:
        kwargs = dict(node.kwargs)
        kwargs[name] = _put(kwargs[name], idx, new)
        node.kwargs = kwargs


def _put(old, idx, new):
    if idx is None:
        return new
    seq = list(old)
    seq[idx] = new
    return type(old)(seq) if isinstance(old, tuple) else seq


def _step_node(gm: fx.GraphModule, x: fx.Node, step: Collective, mesh: Mesh, consumer: fx.Node) -> fx.Node:
    group = mesh.format_atoms(step.atoms)
    if step.kind in ("all_gather", "reduce_scatter", "slice"):
        args = (x, step.dim, group)
    elif step.kind == "all_to_all":
        args = (x, step.dim, step.dst_dim, group)
    else:
        args = (x, group)
    n = gm.graph.create_node("call_function", OPS[step.kind], args, name=f"{step.kind}_{''.join(step.atoms)}")
    n.meta["val"] = x.meta["val"]
    n.meta[LAYOUT] = step.dst
    n.meta[COLLECTIVE] = step
    copy_meta(n, consumer, "nn_module_stack")
    return n


def collectives(gm: fx.GraphModule, *, fused: bool = False) -> list[tuple[fx.Node, Collective]]:
    """Every redistribution step on the graph, in program order: a fused collective stands for one step
    per member (what each conversion needs, as the plan lists them), or with `fused=True` for itself."""
    out = []
    for n in gm.graph.nodes:
        if COLLECTIVE in n.meta:
            k = 1 if fused else members_of(n)
            out.extend([(n, member_step(n.meta[COLLECTIVE], k))] * k)
    return out
