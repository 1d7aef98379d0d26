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
With `quantize="int8"`, each projection weight (find_layers' q/k/v/o, feed-forward in/gate/out, the head)
whose placeholder feeds only its matmul is held as int8 with per-output-row scales of the whole weight
(runtime/quantize.py), and its matmul (linear, Conv1D's addmm, mm) becomes `int8_linear` on them.
A weight gathered before its matmul (weight-gathered layouts) is gathered as int8, and its rank holds the
scales of the rows it multiplies after the gather ([out, in] weights; a gathered Conv1D weight stays
float). A weight shared with another op (GPT-2's head tied to its embedding) stays in the captured dtype.
Reads `sw_layout`, `sw_collective`, `val`, `sw_signature`, `sw_state` (and `sw_layers` to quantize).
"""

from __future__ import annotations

import copy
import operator
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import InputError, TokenIdError
from ..ir.layout import Layout
from ..ir.mesh import Mesh
from ..ir.meta import COLLECTIVE, DISPATCH, FUSED_NORM, LAYERS, LAYOUT, RANK_BLOCKS, SIGNATURE, STATE
from ..runtime.lower import RankEnv, lower_dispatch, lower_step
from ..runtime.quantize import (
    check_quantize,
    dequantized_weight,
    int8_addmm,
    int8_linear,
    int8_mm,
    quantize_rows,
    row_scales,
    scales_of,
)
from ..runtime.weights import StateSource, WeightSource, resolve, shard_index
from .find_layers import block_of
from .fold_constants import fold_constants, keep_out_of_state
from .graph_utils import graph_module, is_experts_ffn, is_moe_ffn, signature
from .in_place import reduce_in_place
from .insert_collectives import REDISTRIBUTE_OPS, dispatch_steps
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


@graph_pass(needs=(SIGNATURE, STATE, LAYOUT), makes=(RANK_BLOCKS,))
def emit(
    gm: fx.GraphModule,
    mesh: Mesh,
    rank: int,
    *,
    group_name: Callable[[tuple[str, ...]], str],
    weights: WeightSource | None = None,
    device: torch.device | str | None = None,
    quantize: str | None = None,
    scales: dict | None = None,
    fold: bool = True,
) -> fx.GraphModule:
    """Build rank `rank`'s program: a GraphModule whose forward takes the flat user inputs.

    Weights are read slice by slice from `weights` (default: the tensors captured with the model).
    `device`: where the program runs, when it differs from where the model was captured (a capture on
    the meta device bakes `device="meta"` into factory and `.to` calls; those are rewritten).
    `quantize="int8"`: projection weights held and multiplied as int8 (see the module's docstring);
    `scales`: a cache of per-row scales shared by the ranks emitted in one process ({(key, rows): scales}).
    `fold`: values computed from shapes alone (a causal mask, rotary angles) computed once, here, and held
    as buffers (passes/fold_constants.py); False keeps every op in the program.
    """
    sig = signature(gm)
    quantized = quantizable(gm) if check_quantize(quantize) else {}
    scales = {} if scales is None else scales
    qvals: dict[str, tuple[fx.Node, fx.Node]] = {}  # matmul → (the node feeding it the int8 weight, its scales)
    gm_nodes = {n.name: n for n in gm.graph.nodes} if quantized else {}
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
                if node.name in quantized:
                    mm, out_dim, fed = quantized[node.name]
                    shape = tuple(node.meta["val"].shape)
                    rows = shard_index(shape, gm_nodes[fed].meta[LAYOUT], mesh, rank)[out_dim]
                    q, s_ = _quantized_shard(source, key, shape, index, rows, out_dim, scales)
                    if env.device is not None:
                        q, s_ = q.to(env.device), s_.to(env.device)
                    root.register_parameter(attr, nn.Parameter(q, requires_grad=False))
                    root.register_buffer(attr + "_scale", s_)
                    vals[node] = g.get_attr(attr)
                    qvals[mm] = (gm_nodes[fed], g.get_attr(attr + "_scale"))
                    continue
                local = source.read(key, index).clone(memory_format=torch.contiguous_format)  # its own bytes, one copy
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
            if node.name in qvals:
                fed, scale = qvals[node.name]
                vals[node] = _int8_matmul(g, node, vals, vals[fed], scale)
                continue
            vals[node] = _lower(g, node, vals, env)
        elif node.op == "output":
            vals[node] = g.output(fx.node.map_arg(node.args[0], vals.__getitem__))
        else:
            raise NotImplementedError(f"emit: unexpected {node.op} node {node.format_node()}")
    folded = fold_constants(g, root, _value_bytes(vals)) if fold else []
    reduce_in_place(g)
    g.lint()
    program = graph_module(root, g, class_name="RankProgram")
    keep_out_of_state(program, folded)
    program.meta[RANK_BLOCKS] = {v.name: block_of(n) for n, v in vals.items()
                                 if n.op == "call_function" and isinstance(v, fx.Node)}
    return program


def _value_bytes(vals: dict[fx.Node, fx.Node]) -> dict[fx.Node, int]:
    """Rank node → the bytes of the global value it lowers (its own is that or a piece of it): what constant
    folding may compute without computing it first."""
    out = {}
    for n, v in vals.items():
        val = n.meta.get("val")
        if isinstance(v, fx.Node) and isinstance(val, torch.Tensor) and isinstance(val.numel(), int):
            out[v] = val.numel() * val.element_size()
    return out


_MATMUL_WEIGHT = {aten.linear.default: (1, 0), aten.addmm.default: (2, 1), aten.mm.default: (1, 1)}
# matmul op → (index of its weight argument, the weight's output dim)


def quantizable(gm: fx.GraphModule) -> dict[str, tuple[str, int, str]]:
    """Weight placeholder name → (its matmul node's name, the weight's output dim, the node the matmul
    reads it from): the projections of find_layers' layers whose 2-D float weight placeholder feeds nothing
    but that matmul's weight argument, directly or (an [out, in] weight) through nodes that only move it
    (collectives; a fused gather's stack → collective → unbind → getitem, if all it stacks are int8)."""
    layers = gm.meta.get(LAYERS)
    if layers is None:
        return {}
    nodes = {n.name: n for n in gm.graph.nodes}
    sig = signature(gm)
    out = {}
    for layer in layers.layers:
        for proj in layer.projections.values():
            w, mm = nodes.get(proj.weight), nodes.get(proj.node)
            if w is None or mm is None or w.op != "placeholder" or w.name not in sig.params:
                continue
            if sig.params[w.name] in sig.buffers or mm.target not in _MATMUL_WEIGHT:
                continue
            i, out_dim = _MATMUL_WEIGHT[mm.target]
            if w.meta["val"].ndim != 2 or not w.meta["val"].dtype.is_floating_point or len(mm.args) <= i \
                    or len(w.users) != 1:
                continue
            fed = mm.args[i]
            if not isinstance(fed, fx.Node) or set(fed.users) != {mm} \
                    or any(a is fed for j, a in enumerate(mm.args) if j != i):
                continue
            path = _path_to(w, fed) if out_dim == 0 else ([] if fed is w else None)
            if path is not None:
                out[w.name] = (mm.name, out_dim, fed.name, path)
    # a stack of weights (fused gathers) is int8 only if every weight stacked is
    while bad := [k for k, v in out.items() if any(n.target is aten.stack.default and
                                                    any(a.name not in out for a in n.args[0]) for n in v[3])]:
        for k in bad:
            del out[k]
    return {k: v[:3] for k, v in out.items()}


def dequantized_model(model: nn.Module, gm: fx.GraphModule) -> tuple[nn.Module, set[str]]:
    """What int8 rank programs of `gm` (a plan's program graph, captured from `model`) compute, as a float
    model: a copy of `model` with every weight they hold as int8 replaced by q · s (its quantized rows times
    their scales, `dequantized_weight`), and the names of the weights replaced. A weight several
    projections slice (GPT-2's c_attn) is replaced once, whole. A model without one of those weights, or
    holding it in another shape than the graph captured, is refused (InputError)."""
    sig = signature(gm)
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    done: set[str] = set()
    for ph, (_, out_dim, _) in quantizable(gm).items():
        base = resolve(sig.params[ph], (slice(0, 1), slice(0, 1)))[0]  # a slice of a weight: the weight
        if base in done:
            continue
        captured = tuple(placeholders[ph].meta["val"].shape) if sig.params[ph] == base else None
        if base not in params or captured not in (None, tuple(params[base].shape)):
            found = "does not have" if base not in params else f"holds as {tuple(params[base].shape)}"
            raise InputError(f"dequantized_model: the plan's graph multiplies weight {base}"
                             f"{f' of shape {captured}' if captured else ''}, which the model given {found}: "
                             f"pass the model the plan was made from")
        done.add(base)
        with torch.no_grad():
            params[base].copy_(dequantized_weight(params[base], out_dim))
    return ref, done


_MOVES = (aten.unbind.int, operator.getitem)  # with REDISTRIBUTE_OPS and stack: what a gathered weight passes


def _path_to(w: fx.Node, fed: fx.Node) -> list[fx.Node] | None:
    """The nodes from weight `w` to the node `fed` the matmul reads it from, when they only move it:
    collectives, or a fused gather's stack → collectives → unbind → getitem (None otherwise)."""
    path, cur = [], fed
    while cur is not w:
        path.append(cur)
        if cur.target is aten.stack.default:
            if w not in cur.args[0] or any(not isinstance(a, fx.Node) or a.op != "placeholder" for a in cur.args[0]):
                return None
            break
        if cur.target not in REDISTRIBUTE_OPS and cur.target not in _MOVES:
            return None
        ok_users = all(u.target is operator.getitem for u in cur.users) if cur.target is aten.unbind.int \
            else len(cur.users) == 1
        if not ok_users or not isinstance(cur.args[0], fx.Node):
            return None
        cur = cur.args[0]
    return path


def _quantized_shard(source: WeightSource, key: str, shape: tuple[int, ...], index: tuple[slice, ...],
                     rows: slice, out_dim: int, cache: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's int8 shard [out_local, in_local] of `key` (`index`: its slices at rest) and the global
    scales of the rows `rows` it multiplies (its own, or more after a gather)."""
    in_dim = 1 - out_dim
    local = source.read(key, index)
    dtype = local.dtype
    held, cols = index[out_dim], index[in_dim]
    span = slice(min(held.start, rows.start), max(held.stop, rows.stop))  # the rows it holds and multiplies
    ck = (key, span.start, span.stop)
    s = cache.get(ck)
    if s is None:
        if cols.stop - cols.start == shape[in_dim] and held == span:  # whole rows, its own: their absmax
            s = scales_of(local.detach().float().abs().amax(dim=in_dim), dtype)
        else:  # the rest of those rows, read a shard's size at a time
            s = row_scales(lambda idx: source.read(key, idx), shape, out_dim, span, cols.stop - cols.start, dtype,
                           held.stop - held.start)
        cache[ck] = s
    q = quantize_rows(local, s[held.start - span.start: held.stop - span.start], out_dim)
    return q, s[rows.start - span.start: rows.stop - span.start].clone(memory_format=torch.contiguous_format)


def _int8_matmul(g: fx.Graph, node: fx.Node, vals: dict, q: fx.Node, s: fx.Node) -> fx.Node:
    args = fx.node.map_arg(node.args, vals.__getitem__)
    if node.target is aten.linear.default:
        bias = args[2] if len(args) > 2 else fx.node.map_arg(node.kwargs.get("bias"), vals.__getitem__)
        return g.create_node("call_function", int8_linear, (args[0], q, s, bias), name=node.name)
    if node.target is aten.addmm.default:
        kw = {k: v for k, v in node.kwargs.items() if k in ("beta", "alpha")}
        return g.create_node("call_function", int8_addmm, (args[0], args[1], q, s), kw, name=node.name)
    return g.create_node("call_function", int8_mm, (args[0], q, s), name=node.name)


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
    elif is_experts_ffn(node):
        args = _experts_args(node, args, env)
        if node.meta.get(DISPATCH):
            steps = dispatch_steps(node, mesh)
            return lower_dispatch(g, args, steps, node.meta[DISPATCH], node.args[4].meta["val"].shape[-1], env,
                                  origin=node.name)
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


def _experts_args(node: fx.Node, args: tuple, env: RankEnv) -> tuple:
    """A fused experts op's rank-dependent arguments: the down bias's `down_bias_at` (below) and, for a
    moe_ffn, `first_expert`: the first of the experts this rank holds."""
    args = tuple(args)
    if len(node.args) > 9 and node.args[9] is not None:
        args = args[:10] + (_down_bias_at(node, env),) + args[11:]
    if is_moe_ffn(node):
        wd = node.args[3]
        held = wd.meta[LAYOUT].local_shape(tuple(wd.meta["val"].shape), env.mesh)[0]
        args = args[:11] + (env.mesh.index_in(wd.meta[LAYOUT].dims[0], env.rank) * held,) + args[12:]
    return args


def _down_bias_at(node: fx.Node, env: RankEnv) -> int:
    """experts_ffn's down bias [X, E] is added once per partial sum (runtime/experts.py): this rank adds its
    columns of it where they sit in the output (E split over atoms A of the sum), or, where it repeats
    the columns of other ranks of the sum (its atoms R beyond A and the experts' atoms), only the rank
    first along R does; down_bias_at = −1 tells the others to skip it."""
    mesh, bias = env.mesh, node.args[9]
    layout = bias.meta[LAYOUT]
    along = layout.dims[1]
    cols = layout.local_shape(tuple(bias.meta["val"].shape), mesh)[1]
    repeats = [a for a in mesh.mesh_order(node.meta[LAYOUT].partial) if a not in along and a not in layout.dims[0]]
    return mesh.index_in(along, env.rank) * cols if mesh.index_in(repeats, env.rank) == 0 else -1


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
