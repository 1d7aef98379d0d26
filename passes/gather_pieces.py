"""gather_pieces: a large merging all-gather of a rank program run in pieces along its first dim.

emit lowers an all-gather over a dim d > 0 as one `all_gather_into_tensor` of the whole tensor (the
members' blocks stacked first) and one copy that merges the blocks into dim d (runtime/lower.py). Where
that output is large (above `ir.collective.PIECE_BYTES`: a head's logits gathered over the vocabulary,
64 MiB at 2048 tokens), this pass splits the tensor along its first dim into `Collective.pieces` pieces:
each is gathered on its own, viewed with its blocks in place, and one `cat` along the first dim merges
them all (the one copy the merge made before, now reading the pieces).

Why: on CPU ranks the whole gather's buffer is fresh memory each step. glibc serves an allocation above
its reuse range (32 MiB) with new pages from the kernel and returns them on free, so the 64 MiB buffer is
page-faulted in every step; 16 MiB pieces reuse the heap. On 4 gloo ranks here, a head's
[2048, 1024]·[1024, 2048] product gathered to [2048, 8192] took 440–450 ms whole and 360–380 ms in 4 or 8
pieces, median of 8 (the same bytes; the pieces waited one by one, so none of it is overlap).

Bytes are unchanged (the pieces move the whole tensor once); the cost model charges each piece its
collective's fixed latency (planning/costing.py reads the same `Collective.pieces`). Left whole: a gather
over the first dim (nothing to merge), a fused gather of stacked siblings (passes/fuse_collectives.py;
the stack is its first dim), and a gather a looped collective matmul has unrolled already (it runs
before this pass and leaves no merge behind).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..ir.meta import RANK_BLOCKS, STEP
from ..runtime.lower import c10d
from .fuse_collectives import STACK
from .pipeline import graph_pass

aten = torch.ops.aten
GATHER, WAIT = c10d.all_gather_into_tensor.default, c10d.wait_tensor.default


@graph_pass(needs=(RANK_BLOCKS,))
def gather_pieces(gm: fx.GraphModule) -> fx.GraphModule:
    """Split every large merging all-gather of a rank program into pieces (module doc)."""
    g, blocks = gm.graph, gm.meta[RANK_BLOCKS]
    changed = False
    for n in list(g.nodes):
        if n.op == "call_function" and n.target is GATHER and (chain := _merge_chain(n)) is not None:
            k = n.meta[STEP].pieces(chain[2][0])
            if k > 1:
                _split(g, n, chain, k, blocks)
                changed = True
    if changed:
        g.lint()
        gm.recompile()
    return gm


def _only_user(n: fx.Node, target) -> fx.Node | None:
    users = list(n.users)
    return users[0] if len(users) == 1 and users[0].op == "call_function" and users[0].target is target else None


def _merge_chain(gather: fx.Node):
    """The lowering's merge after an all-gather over a dim > 0 (runtime/lower.py: contiguous(x) → gather →
    wait → view [blocks, *local] → permute → reshape → contiguous): (x, the nodes from the gather's input to
    the merged result, the local shape, the block sizes, the permutation, the merged shape); None for any
    other shape of program."""
    step = gather.meta.get(STEP)
    prep = gather.args[0]
    if step is None or not step.dim or not isinstance(prep, fx.Node) or prep.target is not aten.contiguous.default:
        return None
    x = prep.args[0]
    if not isinstance(x, fx.Node) or x.name.startswith(STACK) or len(prep.users) != 1:
        return None
    wait = _only_user(gather, WAIT)
    view = wait and _only_user(wait, aten.view.default)
    perm = view and _only_user(view, aten.permute.default)
    reshape = perm and _only_user(perm, aten.reshape.default)
    out = reshape and _only_user(reshape, aten.contiguous.default)
    if out is None:
        return None
    merged = list(reshape.args[1])
    sizes = list(view.args[1])
    blocks, local = sizes[: len(sizes) - len(merged)], sizes[len(sizes) - len(merged):]
    return x, [prep, gather, wait, view, perm, reshape, out], local, blocks, list(perm.args[1]), merged


def _split(g: fx.Graph, gather: fx.Node, chain, k: int, blocks: dict) -> None:
    x, old, local, sizes, perm, merged = chain
    rows = local[0] // k
    views = []
    with g.inserting_before(old[0]):
        for i in range(k):
            piece = g.call_function(aten.contiguous.default, (g.call_function(aten.narrow.default, (x, 0, i * rows, rows)),))
            got = g.call_function(GATHER, (piece, *gather.args[1:]), dict(gather.kwargs))
            got.meta.update(gather.meta)
            got = g.call_function(WAIT, (got,))
            v = g.call_function(aten.view.default, (got, sizes + [rows] + local[1:]))
            views.append(g.call_function(aten.permute.default, (v, perm)))
        # blocks in place per piece; the one copy: cat along the first dim (the permute keeps it first)
        whole = g.call_function(aten.view.default, (g.call_function(aten.cat.default, (views, 0)), merged))
    out = old[-1]
    out.replace_all_uses_with(whole)
    if out.name in blocks:
        blocks[whole.name] = blocks.pop(out.name)
    for n in reversed(old):
        g.erase_node(n)
