"""Lowering of redistribution steps to per-rank ops: `_c10d_functional` collectives and local slices.

A collective's group holds the ranks that differ only along its atoms, ordered by their index over the
atoms in *mesh* order (as torch.distributed groups and DeviceMesh order them). A layout lists a dim's
atoms major→minor, which can differ from mesh order (`F_yzx` after reduce-scattering x onto F_yz):
then blocks are permuted locally before or after the collective so the data lands where the layout says.
Every collective is followed by `wait_tensor`, as functional collectives require.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.fx as fx

from ..ir.collective import Collective
from ..ir.layout import Layout
from ..ir.mesh import Mesh
from ..ir.meta import GLOBAL, RAGGED, STEP

aten = torch.ops.aten
c10d = torch.ops._c10d_functional


@dataclass(frozen=True)
class RankEnv:
    mesh: Mesh
    rank: int
    group_name: Callable[[tuple[str, ...]], str]  # atoms in mesh order → registered process-group name
    device: torch.device | None = None  # where the program runs, if not where it was captured


def shard_tensor(t: torch.Tensor, layout: Layout, mesh: Mesh, rank: int) -> torch.Tensor:
    """This rank's piece of a global tensor (a contiguous copy, so the full tensor can be freed)."""
    from .weights import shard_index

    out = t[shard_index(tuple(t.shape), layout, mesh, rank)]
    if layout.partial and mesh.index_in(mesh.mesh_order(layout.partial), rank) != 0:
        out = torch.zeros_like(out)
    return out.clone(memory_format=torch.contiguous_format)




class _Builder:
    def __init__(self, g: fx.Graph, tag: str, meta: dict):
        self.g, self.tag, self.meta = g, tag, meta

    def __call__(self, target, *args) -> fx.Node:
        n = self.g.create_node("call_function", target, args, name=self.tag)
        if target in COLLECTIVE_OPS:
            n.meta.update(self.meta)
        return n


def lower_step(g: fx.Graph, x: fx.Node, step: Collective, local: Sequence[int], env: RankEnv,
               *, origin: str = "") -> fx.Node:
    """Append the ops of `step` on `x` (local shape `local`) for rank `env.rank`; returns the result.

    The collective op is tagged with the step and the global node it lowers (`origin`), so a trace of
    what ran can be compared with what was planned."""
    mesh = env.mesh
    op = _Builder(g, f"{step.kind}_{''.join(step.atoms)}", {STEP: step, GLOBAL: origin})
    local = list(local)
    chunk = list(step.atoms)
    order = list(mesh.mesh_order(chunk))
    G = mesh.group_size(chunk)
    sizes_chunk = [mesh.atom(a).size for a in chunk]
    sizes_mesh = [mesh.atom(a).size for a in order]
    to_chunk = [order.index(a) for a in chunk]  # permutes mesh-ordered block dims into chunk order
    to_mesh = [chunk.index(a) for a in order]
    reorder = chunk != order

    if step.kind == "slice":
        size = local[step.dim] // G
        y = op(aten.narrow.default, x, step.dim, mesh.index_in(chunk, env.rank) * size, size)
        return op(aten.contiguous.default, y) if step.dim else y
    if step.kind == "mask":
        keep = 1.0 if mesh.index_in(chunk, env.rank) == 0 else 0.0
        return op(aten.mul.Tensor, x, keep)

    name = env.group_name(tuple(order))
    if step.kind == "all_reduce":
        return op(c10d.wait_tensor.default, op(c10d.all_reduce.default, op(aten.contiguous.default, x), "sum", name))

    if step.kind == "all_gather":
        # every member's tensor as it is, stacked: [G·local[0], ...] viewed as [blocks in mesh order, *local];
        # then the blocks go in chunk order to just before dim d, and merge with it (one copy of the
        # output, in runs of whole rows below d, where d > 0; none for d = 0 in mesh order)
        d, k, n = step.dim, len(sizes_mesh), len(local)
        y = op(c10d.wait_tensor.default, op(c10d.all_gather_into_tensor.default, op(aten.contiguous.default, x), G,
                                            name))
        if not d and not reorder:
            return y
        v = op(aten.view.default, y, sizes_mesh + local)
        blocks = to_chunk if reorder else list(range(k))
        v = op(aten.permute.default, v, [k + i for i in range(d)] + blocks + [k + i for i in range(d, n)])
        # contiguous as the model's own tensor was (a reshape that could merge the blocks without copying
        # returns a strided view, which a view() downstream would refuse): then a no-op
        return op(aten.contiguous.default, op(aten.reshape.default, v, local[:d] + [G * local[d]] + local[d + 1 :]))

    if step.kind == "reduce_scatter":
        # dim d viewed as [blocks in chunk order, its rows per member]; the blocks moved to the front in mesh
        # order (one copy of the input, in runs of whole rows below d), so member i's sum is the i-th slab:
        # the result is this member's tensor as it is, no copy after
        d, k, n = step.dim, len(sizes_chunk), len(local)
        out = local[:d] + [local[d] // G] + local[d + 1 :]
        if d or reorder:
            v = op(aten.reshape.default, x, local[:d] + sizes_chunk + out[d:])  # x may be a strided view
            v = op(aten.permute.default, v, [d + to_mesh[i] for i in range(k)] + list(range(d))
                   + [d + k + i for i in range(n - d)])
            x = op(aten.reshape.default, op(aten.contiguous.default, v), [G * out[0]] + out[1:])
        t = op(aten.contiguous.default, x)
        return op(c10d.wait_tensor.default, op(c10d.reduce_scatter_tensor.default, t, "sum", G, name))

    if step.kind == "all_to_all":
        a, b = step.dim, step.dst_dim  # atoms leave dim a (it grows ×G) and join dim b (it shrinks ÷G)
        others = [s for i, s in enumerate(local) if i != b]
        blk = local[b] // G
        t = op(aten.movedim.int, x, b, 0) if b else x
        if reorder:
            t = _permute_blocks(op, t, sizes_chunk, to_mesh, [blk] + others)
        t = op(aten.contiguous.default, t)
        r = op(c10d.wait_tensor.default, op(c10d.all_to_all_single.default, t, [blk] * G, [blk] * G, name))
        r = op(aten.view.default, r, sizes_mesh + [blk] + others)
        k = len(sizes_mesh)
        if reorder:
            r = op(aten.permute.default, r, to_chunk + list(range(k, k + 1 + len(others))))
        r = op(aten.reshape.default, r, [G, blk] + others)
        ao = a if a < b else a - 1  # position of dim a among `others`
        perm = [1] + [2 + i for i in range(ao)] + [0] + [2 + i for i in range(ao, len(others))]
        r = op(aten.permute.default, r, perm)
        merged = others[:ao] + [G * others[ao]] + others[ao + 1 :]
        r = op(aten.reshape.default, r, [blk] + merged)
        return op(aten.contiguous.default, op(aten.movedim.int, r, 0, b)) if b else r

    raise AssertionError(step.kind)


def _permute_blocks(op, t: fx.Node, block_sizes: list[int], perm: list[int], inner: list[int]) -> fx.Node:
    """View dim 0 as blocks of sizes `block_sizes` (major first), permute them by `perm`, flatten back."""
    k = len(block_sizes)
    v = op(aten.view.default, op(aten.contiguous.default, t), block_sizes + inner)
    v = op(aten.permute.default, v, perm + list(range(k, k + len(inner))))
    return op(aten.reshape.default, v, [math.prod(block_sizes) * inner[0]] + inner[1:])


COLLECTIVE_OPS = {
    c10d.all_gather_into_tensor.default: "all_gather",
    c10d.reduce_scatter_tensor.default: "reduce_scatter",
    c10d.all_reduce.default: "all_reduce",
    c10d.all_reduce_.default: "all_reduce",  # passes/in_place.py: a buffer nothing else reads
    c10d.all_to_all_single.default: "all_to_all",
}


def ring_splits(t: torch.Tensor, group: int, me: int, to: int) -> tuple[list[int], list[int]]:
    """One step of a ring as an all-to-all over dim 0: (rows received from each member, rows sent to each)
    for member `me` sending all of `t` to member me + `to` and receiving as much from member me − `to`
    (every member of a ring holds a tensor of the same shape). Read at run time: a rank program has no
    static shapes."""
    n = t.size(0)
    send, recv = [0] * group, [0] * group
    send[(me + to) % group] = n
    recv[(me - to) % group] = n
    return recv, send


def lower_dispatch(g: fx.Graph, args: tuple, steps: Sequence[Collective], atoms: tuple[str, ...], top_k: int,
                   env: RankEnv, *, origin: str) -> fx.Node:
    """A moe_ffn with all-to-all dispatch over `atoms` (runtime/experts.py), as this rank runs it: route its
    own tokens; all-gather every rank's per-expert counts (`steps[0]`); send each routed row to the rank
    of its expert (`steps[1]`: the experts are split in equal runs over the group, in group order); run
    this rank's experts over what arrived; send the results back (`steps[2]`) and combine them."""
    from . import experts

    x, w_gate, w_up, w_down, ids, weights, act, b_gate, b_up, b_down, bias_at, _, num_experts = args
    order = tuple(env.mesh.mesh_order(atoms))
    G, me, name = env.mesh.group_size(order), env.mesh.index_in(order, env.rank), env.group_name(order)

    def call(target, *a, step=None, ragged=False):
        n = g.create_node("call_function", target, a, name=f"{origin}_dispatch")
        if step is not None:
            n.meta.update({STEP: step, GLOBAL: origin, RAGGED: ragged})
        return n

    def parts(n, k):
        return [call(operator.getitem, n, i) for i in range(k)]

    rows, counts, perm, w_sorted = parts(call(experts.route, x, ids, weights, num_experts), 4)
    every = call(c10d.wait_tensor.default, call(c10d.all_gather_into_tensor.default, counts, G, name, step=steps[0]))
    send, recv, mine = parts(call(experts.dispatch_splits, every, G, me), 3)
    got = call(c10d.wait_tensor.default, call(c10d.all_to_all_single.default, rows, recv, send, name, step=steps[1]))
    out = call(experts.run_received, got, mine, w_gate, w_up, w_down, act, b_gate, b_up, b_down, bias_at)
    back = call(c10d.wait_tensor.default,
                call(c10d.all_to_all_single.default, out, send, recv, name, step=steps[2], ragged=True))
    return call(experts.combine, back, perm, w_sorted, top_k)
