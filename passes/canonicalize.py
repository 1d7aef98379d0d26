"""canonicalize: rewrite the captured graph into the forms the layout rules handle best.

- drops `_assert_tensor_metadata` nodes (dtype/device checks of the global tensors) and weights no op
  reads (the second name of a tied weight);
- decomposes `layer_norm` / `rms_norm` into mean, rsqrt and pointwise ops, so a norm over a split E
  costs a tiny all-reduce of the statistics rather than a gather of the activations (emit fuses it
  back where E turns out whole: `sw_fused_norm` on the decomposition's last node);
- unfuses projections whose output is immediately split along features (GPT-2's `c_attn` computes
  q, k and v with one [E, 3E] matmul): each piece becomes its own matmul on a slice of the weight, so
  q, k and v can each be split over heads.
Reads `val`, writes new placeholders into `sw_signature` (derived weights) and `sw_state`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..ir.meta import FUSED_NORM, SIGNATURE, STATE
from .graph_utils import PROJECTIONS, copy_meta, fake_mode_of, fake_run, shape, signature
from .pipeline import graph_pass

aten = torch.ops.aten


@dataclass(frozen=True)
class FusedNorm:
    target: object  # aten.layer_norm.default or aten.rms_norm.default
    normalized_shape: list[int]
    eps: float
    readers: dict[str, tuple[str, int]]  # input / weight / bias → (node reading it, argument index)
    members: list[str]  # the nodes of the decomposition, in order (the last is the output)


_ASSERTS = {aten._assert_tensor_metadata.default}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


@graph_pass(needs=(SIGNATURE, STATE))
def canonicalize(gm: fx.GraphModule) -> fx.GraphModule:
    mode = fake_mode_of(gm)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _ASSERTS and not node.users:
            gm.graph.erase_node(node)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in (aten.layer_norm.default, aten.rms_norm.default):
            _decompose_norm(gm, node, mode)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in PROJECTIONS:
            _unfuse(gm, node, mode)
    gm.graph.eliminate_dead_code()
    _drop_unused_weights(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def _drop_unused_weights(gm: fx.GraphModule) -> None:
    """A weight no op reads (the alias of a tied weight) is neither planned nor emitted."""
    sig = signature(gm)
    for node in list(gm.graph.nodes):
        if node.op == "placeholder" and node.name in sig.params and not node.users:
            del sig.params[node.name]
            gm.graph.erase_node(node)


# ------------------------------------------------------------------------------------ norms
def _decompose_norm(gm: fx.GraphModule, node: fx.Node, mode) -> None:
    g = gm.graph
    x = node.args[0]
    k = len(node.args[1])
    dims = list(range(-k, 0))
    is_ln = node.target is aten.layer_norm.default
    weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    if is_ln:
        bias = node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
        eps = node.args[4] if len(node.args) > 4 else node.kwargs.get("eps", 1e-5)
    else:
        bias = None
        eps = node.args[3] if len(node.args) > 3 else node.kwargs.get("eps")
        if eps is None:
            eps = torch.finfo(x.meta["val"].dtype).eps

    members: list[fx.Node] = []

    def add(target, *args):
        n = g.call_function(target, args)
        copy_meta(n, node)
        fake_run(n, mode)
        members.append(n)
        return n

    with g.inserting_before(node):
        if is_ln:
            mean = add(aten.mean.dim, x, dims, True)
            xc = add(aten.sub.Tensor, x, mean)
        else:
            xc = x
        sq = add(aten.mul.Tensor, xc, xc)
        var = add(aten.mean.dim, sq, dims, True)
        r = add(aten.rsqrt.default, add(aten.add.Tensor, var, eps))
        y = add(aten.mul.Tensor, xc, r)
        readers = {"input": (members[0].name, 0)}
        if weight is not None:
            y = add(aten.mul.Tensor, y, weight)
            readers["weight"] = (y.name, 1)
        if bias is not None:
            y = add(aten.add.Tensor, y, bias)
            readers["bias"] = (y.name, 1)
    # emit puts the fused op back where the normalized dims are whole on every rank (FUSED_NORM)
    y.meta[FUSED_NORM] = FusedNorm(node.target, list(node.args[1]), eps, readers, [m.name for m in members])
    node.replace_all_uses_with(y)
    g.erase_node(node)


# ------------------------------------------------------------------------------------ fused projections
def _feature_pieces(out: fx.Node, width: int):
    """If every use of `out` (through feature-preserving views) splits its last dim, the pieces.

    Returns (view chain, [(start, length, user node to replace)]) or None.
    """
    chain = []
    cur = out
    while len(cur.users) == 1:
        (u,) = cur.users
        if u.target in _VIEWS and shape(u)[-1] == width:
            chain.append(u)
            cur = u
        else:
            break
    pieces = []
    nd = len(shape(cur))
    for u in cur.users:
        if u.target in (aten.split.Tensor, aten.split_with_sizes.default):
            dim = (u.args[2] if len(u.args) > 2 else u.kwargs.get("dim", 0)) % nd
            if dim != nd - 1:
                return None
            sizes = u.args[1]
            sizes = [sizes] * (width // sizes) + ([width % sizes] if width % sizes else []) if isinstance(sizes, int) else list(sizes)
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            for get in u.users:
                if get.target is not operator.getitem:
                    return None
                i = get.args[1]
                pieces.append((starts[i], sizes[i], get))
        elif u.target is aten.slice.Tensor:
            dim = u.args[1] % nd
            start, end = (u.args[2] if len(u.args) > 2 else 0) or 0, u.args[3] if len(u.args) > 3 else width
            if dim != nd - 1 or (len(u.args) > 4 and u.args[4] != 1):
                return None
            end = min(end, width)
            pieces.append((start, end - start, u))
        else:
            return None
    return (chain, pieces) if len(pieces) > 1 else None


def _unfuse(gm: fx.GraphModule, mm: fx.Node, mode) -> None:
    sig = signature(gm)
    m = PROJECTIONS[mm.target]
    w = mm.args[m.w]
    if not (isinstance(w, fx.Node) and w.name in sig.params and len(w.users) == 1):
        return
    width = shape(mm)[-1]
    found = _feature_pieces(mm, width)
    if found is None:
        return
    chain, pieces = found
    bias = mm.args[m.bias] if m.bias is not None and m.bias < len(mm.args) else None
    g = gm.graph
    feat_dim = 0 if m.rows_out else 1
    first_ph = next(n for n in g.nodes if n.op == "placeholder")
    for start, length, user in pieces:
        new_w = _derived_param(gm, w, feat_dim, start, length, first_ph)
        new_b = None
        if isinstance(bias, fx.Node) and bias.name in sig.params and len(bias.users) == 1:
            new_b = _derived_param(gm, bias, bias.meta["val"].ndim - 1, start, length, first_ph)
        with g.inserting_before(user):
            if mm.target is aten.linear.default:
                args = (mm.args[0], new_w) + ((new_b,) if new_b is not None else ())
            elif mm.target is aten.addmm.default:
                args = (new_b if new_b is not None else bias, mm.args[1], new_w)
            else:
                args = (mm.args[0], new_w)
            piece = g.call_function(mm.target, args, dict(mm.kwargs))
            copy_meta(piece, mm)
            fake_run(piece, mode)
            for v in chain:
                size = list(v.args[1])
                size[-1] = length
                nv = g.call_function(v.target, (piece, size))
                copy_meta(nv, v)
                fake_run(nv, mode)
                piece = nv
        user.replace_all_uses_with(piece)
    g.eliminate_dead_code()
    for p in (w, bias):
        if isinstance(p, fx.Node) and not p.users and p.name in sig.params:
            del sig.params[p.name]
            g.erase_node(p)


def _derived_param(gm: fx.GraphModule, base: fx.Node, dim: int, start: int, length: int, before: fx.Node) -> fx.Node:
    sig = signature(gm)
    state = gm.meta[STATE]
    base_key = sig.params[base.name]
    key = f"{base_key}[{dim}:{start}+{length}]"
    state[key] = state[base_key].narrow(dim, start, length)
    sig.derived[key] = (base_key, dim, start, length)
    if base_key in sig.buffers:
        sig.buffers.add(key)
    with gm.graph.inserting_before(before):
        ph = gm.graph.placeholder(f"{base.name}_{start}")
    ph.meta["val"] = base.meta["val"].narrow(dim, start, length)
    copy_meta(ph, base)
    sig.params[ph.name] = key
    return ph
