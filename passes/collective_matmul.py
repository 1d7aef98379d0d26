"""collective_matmul: the paper's looped collective matmul on a rank program (a layout option).

Where one collective feeds matmuls (or one matmul feeds a collective) over the dim the matmul
contracts or produces, the collective is unrolled into a ring of g − 1 point-to-point steps, each
overlapping one partial matmul (Pope et al. §3.5; Wang et al. 2023, "Overlap communication with
dependent computation via decomposition"):

  all-gather → linear      x is this rank's block of the contracted dim E; the linears read the gathered
                           [.., E]. Instead: y = Σ_j linear(x_j, W[:, block j]), where x_j is member j's
                           block; the blocks travel round the ring (each step sends the block in hand to
                           the member before and receives the next from the member after), and the
                           partial product of the block in hand is computed while the next one travels.
  linear → reduce-scatter  y = linear(h, W) is a partial sum whose output dim E is scattered. Instead:
                           the accumulator of block c starts where it is furthest from its owner, and at
                           each step a member adds its partial product of that block (W's rows of block
                           c) to the accumulator it received and passes it on; after g − 1 steps each
                           member holds its own block, summed over the group.

Each ring step is an `all_to_all_single` whose split sizes send the whole tensor to one member
(runtime/lower.ring_splits), so the simulator and real process groups run it like any collective, and
passes/schedule.py overlaps step i + 1 with partial product i (one collective in flight per group).
Neither the gathered activation nor the full partial sum is ever materialised, and the copy the
lowering makes around a collective over the last dim (merging or splitting its blocks) disappears with them.

Bytes are unchanged: the g − 1 steps move what the collective's ring moves ((g − 1)/g of its charged
bytes each way). The steps carry `sw_loop` (the collective's kind, g): a trace charges the loop the
collective's bytes in the paper's accounting, spread over its steps, so `verify --bytes` compares with
the plan as before.

Matched only where the rewrite is exact in meaning: a collective over the *last* dim of a tensor whose
atoms are in mesh order (no block permutation), its gathered result read only by `aten.linear` as the
input (all-gather), or its input the sole use of one `aten.linear` without bias (reduce-scatter). The
sum's order changes (block by block instead of one GEMM), so results equal the unlooped program's to
float rounding, not bitwise.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..ir.mesh import Mesh
from ..ir.meta import GLOBAL, LOOP, RANK_BLOCKS, STEP
from ..runtime.lower import c10d, ring_splits
from .pipeline import graph_pass

aten = torch.ops.aten
WAIT = c10d.wait_tensor.default


@graph_pass(needs=(RANK_BLOCKS,))
def collective_matmul(gm: fx.GraphModule, mesh: Mesh, rank: int) -> fx.GraphModule:
    """Rewrite every matching all-gather → linear and linear → reduce-scatter of rank `rank`'s program."""
    g = gm.graph
    blocks = gm.meta[RANK_BLOCKS]
    looped = 0
    order = {n: i for i, n in enumerate(g.nodes)}
    for n in list(g.nodes):
        if n.op != "call_function":
            continue
        if n.target is c10d.all_gather_into_tensor.default and (m := _gather_into_linears(n, mesh)) is not None:
            _loop_gather(g, n, *m, mesh, rank, blocks, order)
            looped += 1
        elif n.target is c10d.reduce_scatter_tensor.default and (m := _linear_into_scatter(n, mesh)) is not None:
            _loop_scatter(g, n, *m, mesh, rank, blocks)
            looped += 1
    if looped:
        g.lint()
        gm.recompile()
    return gm


# ------------------------------------------------------------------------------------ matching
def _only_user(n: fx.Node) -> fx.Node | None:
    return next(iter(n.users)) if len(n.users) == 1 else None


def _is(n, target) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target is target


def over_last_dim(step, mesh: Mesh) -> bool:
    """A collective step over the last of its tensor's dims (not the only one), its atoms in mesh order (no
    block permutation): the steps a loop can replace. One rule for the rank programs and the cost model."""
    return (step is not None and step.dim is not None and 0 < step.dim == len(step.src.dims) - 1
            and tuple(step.atoms) == tuple(mesh.mesh_order(step.atoms)))


def _chain(start: fx.Node, targets: list, backwards: bool) -> fx.Node | None:
    """Follow exactly the ops `targets` from `start` (each the only user of the one before; backwards:
    through first arguments, each used only by the next): the node reached, or None where the chain differs.
    Only the relayout ops runtime/lower.py puts around a collective are followed, never the model's own."""
    n = start
    for t in targets:
        nxt = n.args[0] if backwards else _only_user(n)
        if not _is(nxt, t) or (backwards and len(nxt.users) != 1):
            return None
        n = nxt
    return n


def _before(op: fx.Node) -> fx.Node | None:
    """The tensor a lowered collective over a dim > 0 prepares: all-gather: contiguous(x); reduce-scatter:
    contiguous(reshape(contiguous(permute(reshape(x)))))."""
    if op.target is c10d.all_gather_into_tensor.default:
        prep = _chain(op, [aten.contiguous.default], backwards=True)
    else:
        prep = _chain(op, [aten.contiguous.default, aten.reshape.default, aten.contiguous.default,
                           aten.permute.default, aten.reshape.default], backwards=True)
    return None if prep is None else prep.args[0]


def _after(op: fx.Node) -> fx.Node | None:
    """The node holding a lowered collective's result over a dim > 0: all-gather:
    contiguous(reshape(permute(view(wait))));
    reduce-scatter: its wait."""
    if op.target is c10d.all_gather_into_tensor.default:
        return _chain(op, [WAIT, aten.view.default, aten.permute.default, aten.reshape.default,
                           aten.contiguous.default], backwards=False)
    return _chain(op, [WAIT], backwards=False)


def _gather_into_linears(op: fx.Node, mesh: Mesh):
    """An all-gather over the last dim whose result is read only as the input of linears:
    (the tensor gathered, the node the linears read, the linears)."""
    if not over_last_dim(op.meta.get(STEP), mesh) or (whole := _after(op)) is None or not whole.users:
        return None
    if (x := _before(op)) is None:
        return None
    linears = list(whole.users)
    if not all(_is(u, aten.linear.default) and u.args[0] is whole and whole not in u.args[1:] and not u.kwargs
               for u in linears):
        return None
    return x, whole, linears


def _linear_into_scatter(op: fx.Node, mesh: Mesh):
    """A reduce-scatter over the last dim of a linear without bias read by nothing else:
    (the linear, the node holding the scattered result)."""
    lin = _before(op)
    if (not over_last_dim(op.meta.get(STEP), mesh) or lin is None or not _is(lin, aten.linear.default) or len(lin.users) != 1
            or (len(lin.args) > 2 and lin.args[2] is not None) or lin.kwargs):
        return None
    result = _after(op)
    return None if result is None else (lin, result)


# ------------------------------------------------------------------------------------ rewriting
class _Emit:
    """Creates nodes before `anchor`, named after the collective they replace, in its block."""

    def __init__(self, g: fx.Graph, anchor: fx.Node, tag: str, block, blocks: dict):
        self.g, self.anchor, self.tag, self.block, self.blocks = g, anchor, tag, block, blocks

    def __call__(self, target, *args) -> fx.Node:
        with self.g.inserting_before(self.anchor):
            n = self.g.create_node("call_function", target, args, name=self.tag)
        self.blocks[n.name] = self.block
        return n


def _shift(op: _Emit, t: fx.Node, step, origin: str, name: str, group: int, me: int, to: int, kind: str,
           first: bool) -> fx.Node:
    """One ring step: all of `t` to member me + `to`, the same shape back from member me − `to`."""
    splits = op(ring_splits, t, group, me, to)
    recv, send = op(operator.getitem, splits, 0), op(operator.getitem, splits, 1)
    a2a = op(c10d.all_to_all_single.default, op(aten.contiguous.default, t), recv, send, name)
    a2a.meta.update({STEP: step, GLOBAL: origin, LOOP: (kind, group, first)})
    return op(WAIT, a2a)


def _ring(op_node: fx.Node, mesh: Mesh, rank: int):
    step = op_node.meta[STEP]
    order = tuple(mesh.mesh_order(step.atoms))
    return step, mesh.group_size(order), mesh.index_in(order, rank), op_node.args[-1], op_node.meta.get(GLOBAL, "")


def _loop_gather(g: fx.Graph, op_node: fx.Node, x: fx.Node, whole: fx.Node, linears: list[fx.Node], mesh: Mesh,
                 rank: int, blocks: dict, order: dict[fx.Node, int]) -> None:
    step, G, me, name, origin = _ring(op_node, mesh, rank)
    linears = sorted(linears, key=order.__getitem__)
    first_user = linears[0]
    _hoist(first_user, [a for u in linears[1:] for a in u.all_input_nodes if a is not whole], order)
    op = _Emit(g, first_user, f"{op_node.name}_loop", blocks.get(first_user.name), blocks)
    weights = [op(aten.chunk.default, u.args[1], G, -1) for u in linears]
    acc: list[fx.Node | None] = [None] * len(linears)
    held = x
    for s in range(G):
        j = (me + s) % G  # the member whose block is in hand
        # the next block is sent for before this one is multiplied: in the program's order, the step is
        # issued first and its partial products run while it travels
        coming = _shift(op, held, step, origin, name, G, me, -1, "all_gather", s == 0) if s < G - 1 else None
        for k, u in enumerate(linears):
            w = op(operator.getitem, weights[k], j)
            bias = u.args[2] if len(u.args) > 2 and s == 0 else None
            part = op(aten.linear.default, held, w, bias) if bias is not None else op(aten.linear.default, held, w)
            acc[k] = part if acc[k] is None else op(aten.add.Tensor, acc[k], part)
        held = coming
    for u, y in zip(linears, acc):
        u.replace_all_uses_with(y)
    _erase_back(g, linears + [whole], stop=x)


def _loop_scatter(g: fx.Graph, op_node: fx.Node, lin: fx.Node, result: fx.Node, mesh: Mesh, rank: int,
                  blocks: dict) -> None:
    step, G, me, name, origin = _ring(op_node, mesh, rank)
    op = _Emit(g, lin, f"{op_node.name}_loop", blocks.get(lin.name), blocks)
    h, w = lin.args[0], lin.args[1]
    rows = op(aten.chunk.default, w, G, 0)
    acc = None
    for s in range(G):
        c = (me - 1 - s) % G  # the block whose accumulator this member adds to at step s: its own at the last
        # the accumulator so far is sent on before this step's partial product is computed (it runs meanwhile)
        moving = _shift(op, acc, step, origin, name, G, me, 1, "reduce_scatter", s == 1) if s else None
        part = op(aten.linear.default, h, op(operator.getitem, rows, c))
        acc = part if moving is None else op(aten.add.Tensor, moving, part)
    result.replace_all_uses_with(acc)
    _erase_back(g, [result], stop=h)


def _hoist(before: fx.Node, needed: list[fx.Node], order: dict[fx.Node, int]) -> None:
    """Move the nodes `needed` that come after `before`, with the inputs they need that also do, to just
    before it (in their order): the loop computes every linear where the first one was, and a later
    linear's weight may be prepared (a weight gathered, cast) between them. Only a weight's preparation
    is found there: it depends on nothing the linears compute."""
    here = order[before]
    move, todo = set(), [a for a in needed if order.get(a, -1) > here]
    while todo:
        n = todo.pop()
        if n in move:
            continue
        move.add(n)
        todo.extend(a for a in n.all_input_nodes if order.get(a, -1) > here)
    for n in sorted(move, key=order.__getitem__):
        before.prepend(n)


def _erase_back(g: fx.Graph, nodes: list[fx.Node], stop: fx.Node) -> None:
    """Erase `nodes` and, walking back through their inputs, every node left without users (the
    collective replaced and its preparation), up to `stop`."""
    todo = list(nodes)
    while todo:
        n = todo.pop()
        if n is stop or n.users or n.op != "call_function":
            continue
        inputs = n.all_input_nodes
        g.erase_node(n)
        todo.extend(inputs)


# ------------------------------------------------------------------------------------ for the cost model
def looped_steps(conversions, mesh: Mesh, fused: set[int]) -> dict[int, set[int]]:
    """id(conversion) → which of its steps the rewrite above loops once lowered, for the conversions of a
    planned global graph (passes/insert_collectives.plan_conversions; `fused`: ids of those fused with a
    sibling's, whose collective stacks its inputs and is not looped). The conditions the rank program is
    matched by, on the global graph:
      its last step, an all-gather over the last dim in mesh order, when every use reads the result as
      a linear's input;
      its first, a reduce-scatter over the last dim in mesh order of a linear without bias read by
      nothing else, unless that linear's input is looped (the gather's loop replaces the linear first)."""

    out: dict[int, set[int]] = {}
    gathered_into: set[fx.Node] = set()  # linears whose input arrives by a looped gather
    for c in conversions:
        s = c.steps[-1] if c.steps else None
        if (s is not None and s.kind == "all_gather" and over_last_dim(s, mesh) and id(c) not in fused
                and all(u.target is aten.linear.default and name == "input" for u, name, _ in c.uses)):
            out.setdefault(id(c), set()).add(len(c.steps) - 1)
            gathered_into.update(u for u, _, _ in c.uses)
    for c in conversions:
        s, src = (c.steps[0] if c.steps else None), c.src
        if (s is not None and s.kind == "reduce_scatter" and over_last_dim(s, mesh) and id(c) not in fused
                and src.op == "call_function" and src.target is aten.linear.default and len(src.users) == 1
                and (len(src.args) < 3 or src.args[2] is None) and src not in gathered_into):
            out.setdefault(id(c), set()).add(0)
    return out
