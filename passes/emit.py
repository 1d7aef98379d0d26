"""emit: the per-rank program of one rank, from the global-view graph.

Every rank runs the same sequence of ops (SPMD); what differs is the weight shards it holds, and the
constants of its local slices. For each node of the global view:
  weight placeholder     → an attribute holding only this rank's shard of the stored layout
  program input          → a placeholder (the full tensor, or this rank's shard of a sharded input)
  collective node        → `_c10d_functional` ops on the group of its atoms (runtime/lower.py)
  view / expand / factory → the same op with its size arguments rewritten to local sizes
  mean over a split dim  → the local mean scaled to the global count (a partial sum)
  embedding split by V   → a lookup of this rank's vocab range, zero elsewhere (a partial sum)
  anything else          → the same op on local tensors
Reads `sw_layout`, `sw_collective`, `val`, `sw_signature`, `sw_state`.
"""

from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import TokenIdError
from ..ir.layout import Layout
from ..ir.mesh import Mesh
from ..ir.meta import COLLECTIVE, FUSED_NORM, LAYOUT, SIGNATURE, STATE
from ..runtime.lower import RankEnv, lower_step
from ..runtime.weights import StateSource, WeightSource, shard_index
from .graph_utils import signature
from .insert_collectives import REDISTRIBUTE_OPS
from .pipeline import graph_pass

aten = torch.ops.aten
_SIZE_ARG = {  # op → index of its size argument (replaced by the local output shape)
    aten.view.default: 1,
    aten.reshape.default: 1,
    aten._unsafe_view.default: 1,
    aten.expand.default: 1,
    aten.new_ones.default: 1,
    aten.new_zeros.default: 1,
    aten.new_empty.default: 1,
    aten.new_full.default: 1,
    aten.zeros.default: 0,
    aten.ones.default: 0,
    aten.empty.memory_format: 0,
    aten.full.default: 0,
}


def local_shape(node: fx.Node, mesh: Mesh) -> tuple[int, ...]:
    return node.meta[LAYOUT].local_shape(tuple(node.meta["val"].shape), mesh)


@graph_pass(needs=(SIGNATURE, STATE, LAYOUT))
def emit(
    gm: fx.GraphModule,
    mesh: Mesh,
    rank: int,
    *,
    group_name: Callable[[tuple[str, ...]], str],
    weights: WeightSource | None = None,
    device: torch.device | str | None = None,
) -> fx.GraphModule:
    """Build rank `rank`'s program: a GraphModule whose forward takes the flat user inputs.

    Weights are read slice by slice from `weights` (default: the tensors captured with the model).
    `device`: where the program runs, when it differs from where the model was captured (a capture on
    the meta device bakes `device="meta"` into factory and `.to` calls; those are rewritten).
    """
    sig = signature(gm)
    source = weights or StateSource(gm.meta[STATE])
    env = RankEnv(mesh, rank, group_name, torch.device(device) if device is not None else None)
    fused, skipped = _fusable_norms(gm)
    by_name = {n.name: n for n in gm.graph.nodes} if fused else {}
    root = nn.Module()
    g = fx.Graph()
    vals: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if node.name in sig.params:
                key = sig.params[node.name]
                attr = _attr_name(key)
                layout = node.meta.get(LAYOUT) or Layout.replicated(node.meta["val"].ndim)
                index = shard_index(tuple(node.meta["val"].shape), layout, mesh, rank)
                source.check(key, tuple(node.meta["val"].shape), node.meta["val"].dtype)
                if key in sig.derived:  # a slice of a fused weight: the whole of it must match too
                    base = gm.meta[STATE][sig.derived[key][0]]
                    source.check(sig.derived[key][0], tuple(base.shape), base.dtype)
                local = source.read(key, index).contiguous().clone()
                if env.device is not None:
                    local = local.to(env.device)
                if key in sig.buffers:
                    root.register_buffer(attr, local)
                else:
                    root.register_parameter(attr, nn.Parameter(local, requires_grad=False))
                vals[node] = g.get_attr(attr)
            else:
                vals[node] = g.placeholder(node.name)
        elif node.op == "call_function":
            if node.name in skipped:
                continue
            if node.name in fused:
                vals[node] = _fused_norm(g, node, fused[node.name], vals, by_name)
                continue
            vals[node] = _lower(g, node, vals, env)
        elif node.op == "output":
            vals[node] = g.output(fx.node.map_arg(node.args[0], vals.__getitem__))
        else:
            raise NotImplementedError(f"emit: unexpected {node.op} node {node.format_node()}")
    g.lint()
    program = fx.GraphModule(root, g, class_name="RankProgram")
    return program


def _fusable_norms(gm: fx.GraphModule) -> tuple[dict[str, tuple], set[str]]:
    """Decomposed norms whose normalized dims are whole and unsplit everywhere inside: fuse them back.

    Returns {output node name: FusedNorm} and the names of the members it replaces.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    fused, skipped = {}, set()
    for n in gm.graph.nodes:
        spec = n.meta.get(FUSED_NORM)
        if spec is None or not all(m in nodes for m in spec.members):
            continue
        members = [nodes[m] for m in spec.members]
        k = len(spec.normalized_shape)
        feeds = {nodes[r].args[i] for r, i in spec.readers.values()}
        whole = all(
            not m.meta[LAYOUT].partial and not any(m.meta[LAYOUT].dims[-k:]) for m in members
        )
        closed = all(a in feeds or a in members for m in members for a in m.all_input_nodes)
        if whole and closed:
            fused[n.name] = spec
            skipped.update(m.name for m in members[:-1])
    return fused, skipped


def _fused_norm(g: fx.Graph, node: fx.Node, spec, vals: dict, nodes: dict[str, fx.Node]) -> fx.Node:
    fed = {role: vals[nodes[r].args[i]] for role, (r, i) in spec.readers.items()}
    if spec.target is torch.ops.aten.layer_norm.default:
        args = (fed["input"], spec.normalized_shape, fed.get("weight"), fed.get("bias"), spec.eps)
    else:
        args = (fed["input"], spec.normalized_shape, fed.get("weight"), spec.eps)
    return g.create_node("call_function", spec.target, args, name=node.name)


def _attr_name(key: str) -> str:
    return "w_" + "".join(c if c.isalnum() else "_" for c in key)


def _lower(g: fx.Graph, node: fx.Node, vals: dict, env: RankEnv) -> fx.Node:
    mesh = env.mesh
    if node.target in REDISTRIBUTE_OPS:
        src = node.args[0]
        return lower_step(g, vals[src], node.meta[COLLECTIVE], local_shape(src, mesh), env, origin=node.name)
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), vals.__getitem__)
    if env.device is not None:
        args, kwargs = fx.node.map_aggregate(
            (args, kwargs), lambda a: env.device if isinstance(a, torch.device) else a
        )
    if node.target is operator.getitem:
        return g.call_function(operator.getitem, args)
    target = node.target
    if target in _SIZE_ARG:
        i = _SIZE_ARG[target]
        args = list(args)
        args[i] = list(local_shape(node, mesh))
        args = tuple(args)
    elif target is aten.unflatten.int:
        dim = node.args[1] % len(node.meta["val"].shape)
        out = local_shape(node, mesh)
        args = (args[0], args[1], list(out[dim : dim + len(node.args[2])]))
    elif target in (aten.mean.dim, aten.mean.default):
        return _mean(g, node, args, kwargs, mesh)
    elif target is aten.embedding.default:
        return _embedding(g, node, args, env)
    new = g.create_node("call_function", target, tuple(args), dict(kwargs), name=node.name)
    return new


def _mean(g: fx.Graph, node: fx.Node, args, kwargs, mesh: Mesh) -> fx.Node:
    """Mean over a split dim: each rank's local mean, scaled so that the partial sums add to the mean."""
    x = node.args[0]
    layout = x.meta[LAYOUT]
    ndim = layout.ndim
    dims = node.args[1] if node.target is aten.mean.dim and len(node.args) > 1 else None
    dims = range(ndim) if not dims else [d % ndim for d in ([dims] if isinstance(dims, int) else dims)]
    split = 1
    for d in dims:
        split *= mesh.group_size(layout.dims[d])
    m = g.create_node("call_function", node.target, tuple(args), dict(kwargs), name=node.name)
    if split == 1:
        return m
    return g.create_node("call_function", aten.div.Tensor, (m, float(split)), name=f"{node.name}_partial")


def check_token_ids(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Ids outside [0, vocab) raise, as the unsharded embedding does (a split table would only see zeros)."""
    if ids.numel() and (bool((ids < 0).any()) or bool((ids >= vocab).any())):
        raise TokenIdError(f"index out of range in self: token ids must lie in [0, {vocab}) for this model's "
                           f"vocabulary, found ids from {int(ids.min())} to {int(ids.max())}")
    return ids


def _embedding(g: fx.Graph, node: fx.Node, args, env: RankEnv) -> fx.Node:
    """V split over atoms S: look up ids in [lo, lo + V/|S|), zero for the others (a partial over S)."""
    weight = node.args[0]
    atoms = weight.meta[LAYOUT].dims[0]
    if not atoms:
        return g.create_node("call_function", node.target, tuple(args), name=node.name)
    rows = weight.meta[LAYOUT].local_shape(tuple(weight.meta["val"].shape), env.mesh)[0]
    lo = env.mesh.index_in(atoms, env.rank) * rows
    table, ids = args[0], args[1]

    def op(target, *a):
        return g.create_node("call_function", target, a, name=f"{node.name}_vocab")

    ids = op(check_token_ids, ids, weight.meta["val"].shape[0])  # the masked lookup would hide them
    shifted = op(aten.sub.Tensor, ids, lo)
    outside = op(aten.logical_or.default, op(aten.lt.Scalar, shifted, 0), op(aten.ge.Scalar, shifted, rows))
    safe = op(aten.masked_fill.Scalar, shifted, outside, 0)
    rows_out = op(aten.embedding.default, table, safe)
    return op(aten.masked_fill.Scalar, rows_out, op(aten.unsqueeze.default, outside, -1), 0.0)
