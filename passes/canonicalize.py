"""canonicalize: rewrite the captured graph into the forms the layout rules handle best.

- drops `_assert_tensor_metadata` nodes (dtype/device checks of the global tensors) and weights no op
  reads (the second name of a tied weight);
- decomposes `layer_norm` / `rms_norm` into mean, rsqrt and pointwise ops, so a norm over a split E
  costs a tiny all-reduce of the statistics rather than a gather of the activations (emit fuses it
  back where E turns out whole: `sw_fused_norm` on the decomposition's last node);
- drops casts to a tensor's own dtype, and writes every matmul with a weight operand in the matmul
  table's forms (graph_utils.MATMULS): `x @ W.T` (Falcon's `input @ self.weight.T`: `numpy_T`, `t`,
  `transpose` or `permute`, then `matmul`) becomes `linear(x, W)`, `x @ W` becomes `mm` on the rows,
  `addmm(b, x, W.T)` becomes `linear(x, W, b)`: every projection, however written, is the same
  canonical op on its weight placeholder;
- writes attention spelled out with matmuls (softmax(scale·q·kᵀ + mask)·v, the `eager` implementations,
  ALiBi and masked_fill included) as `scaled_dot_product_attention(q, k, v, attn_mask, scale)`: the
  same numbers up to the order of float sums; soft-capped scores (tanh) cannot be, and stay as written;
- unfuses projections whose output is immediately split along features (GPT-2's `c_attn` computes
  q, k and v with one [E, 3E] matmul; Falcon's multiquery one is viewed as [.., H + 2, D] and sliced
  by heads): each piece becomes its own matmul on a slice of the weight, so q, k and v can each be
  split over heads; pieces interleaved per head ([.., H, 3, D]) stay fused, split by heads whole;
  a mixture of experts' fused gate_up weight ([X, 2F, D], a grouped matmul whose output is chunked
  along features into gate and up) is unfused the same way into two grouped matmuls on slices of the
  stacked weight, so each expert's F can be split (Llama 4's `bmm` over [X, T, E] likewise); then gate,
  up, activation, product and down over the same routed tokens become one `shardwise::experts_ffn`
  (runtime/experts.py), which can also run on a slice of the experts (expert parallel). Three forms
  are fused, each checked op for op: grouped matmuls with a SwiGLU (Mixtral, Qwen3-MoE), gpt-oss's
  (gate and up interleaved `[..., ::2]` in one weight, kept fused: a contiguous piece of its 2F columns
  is whole (gate, up) pairs; biases indexed by the sorted expert ids; its clamped GLU), and Llama 4's
  dense `bmm`s (every expert over every token); any other stays as it is and runs replicated;
- refuses a call that leaves part of the model's parameters unread (cross-attention over an encoder's
  states, a vision or audio tower): that model takes inputs a decoder-only step does not give.
Regions export wraps for `torch.no_grad()` are inlined first (they are plain ops at inference).
Reads `val`, writes new placeholders into `sw_signature` (derived weights) and `sw_state`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..errors import ShardwiseError
from ..ir.meta import FUSED_NORM, SIGNATURE, STATE
from .graph_utils import (
    PROJECTIONS,
    VIEWS,
    WEIGHT_MATMULS,
    ExplicitAttention,
    copy_meta,
    expert_weight,
    explicit_attention,
    fake_mode_of,
    fake_run,
    is_experts_ffn,
    is_grouped_mm,
    is_moe_ffn,
    shape,
    signature,
    transposed_2d,
)
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
UNREAD_LIMIT = 0.05  # of the parameter bytes: more than this left unread by the call is refused (a pooler is less)


@graph_pass(needs=(SIGNATURE, STATE))
def canonicalize(gm: fx.GraphModule) -> fx.GraphModule:
    mode = fake_mode_of(gm)
    _inline_grad_regions(gm)
    _refuse_data_dependent_shapes(gm)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _ASSERTS and not node.users:
            gm.graph.erase_node(node)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in (aten.layer_norm.default, aten.rms_norm.default):
            _decompose_norm(gm, node, mode)
    _skip_noop_casts(gm)
    _float_histograms(gm, mode)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in WEIGHT_MATMULS:
            _linearize(gm, node, mode)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and (att := explicit_attention(node)) is not None and att.affine:
            _to_sdpa(gm, att, mode)
    gm.graph.eliminate_dead_code()
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in PROJECTIONS:
            _unfuse(gm, node, mode)
        elif _stacked_matmul(gm, node):
            _unfuse_experts(gm, node, mode)
    for node in list(gm.graph.nodes):
        if _stacked_matmul(gm, node):
            _fuse_experts(gm, node, mode)
    for node in list(gm.graph.nodes):
        if is_experts_ffn(node) and not is_moe_ffn(node) and len(node.args) > 5:
            _fuse_dispatch(gm, node, mode)
    _fold_views(gm)
    gm.graph.eliminate_dead_code()
    _drop_unused_weights(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def _float_histograms(gm: fx.GraphModule, mode) -> None:
    """`histc` of integers (a router's expert ids counted per expert) as `histc` of their float values, cast
    back: the same counts. transformers counts in float on the CPU but in int elsewhere, so a model captured on the
    meta device (a real rank builds its model there) would hold an int histogram the CPU cannot run."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.histc.default:
            continue
        x = node.args[0]
        if x.meta["val"].is_floating_point():
            continue
        with gm.graph.inserting_before(node):
            cast = gm.graph.call_function(aten._to_copy.default, (x,), {"dtype": torch.float32})
        copy_meta(cast, node, "nn_module_stack")
        with mode:
            cast.meta["val"] = x.meta["val"].to(torch.float32)
        node.replace_input_with(x, cast)
        want = node.meta["val"]
        with mode:
            node.meta["val"] = want.to(torch.float32)
        with gm.graph.inserting_after(node):
            back = gm.graph.call_function(aten._to_copy.default, (node,), {"dtype": want.dtype})
        node.replace_all_uses_with(back, delete_user_cb=lambda u: u is not back)
        copy_meta(back, node, "nn_module_stack")
        back.meta["val"] = want


def _inline_grad_regions(gm: fx.GraphModule) -> None:
    """Regions run under `torch.no_grad()` (export wraps them in `wrap_with_set_grad_enabled` with a
    subgraph; a router's bookkeeping, a recurrence's early cycles) are plain ops at inference: their
    subgraph's nodes take their place, so every pass and rule sees the ops themselves."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or getattr(node.target, "__name__", "") != "wrap_with_set_grad_enabled":
            continue
        holder = node.args[1]
        sub = getattr(gm, holder.target)
        env = dict(zip([n for n in sub.graph.nodes if n.op == "placeholder"], node.args[2:]))
        outputs = None
        with gm.graph.inserting_before(node):
            for n in sub.graph.nodes:
                if n.op == "call_function":
                    env[n] = gm.graph.node_copy(n, env.__getitem__)
                elif n.op == "output":
                    outputs = fx.node.map_arg(n.args[0], env.__getitem__)
        for user in list(node.users):
            user.replace_all_uses_with(outputs[user.args[1]])
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        if not holder.users:
            gm.graph.erase_node(holder)
            delattr(gm, holder.target)


def _refuse_data_dependent_shapes(gm: fx.GraphModule) -> None:
    """A tensor whose shape depends on the values computed (tokens split per expert by a router's choice,
    JetMoE; tokens picked per language, X-MOD) cannot be planned: layouts and collectives are chosen for
    shapes known before the run."""
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and not all(_static(d) for d in val.shape):
            where = next((p for p in reversed([v[0] for v in (node.meta.get("nn_module_stack") or {}).values()]) if p),
                         "the model")
            raise ShardwiseError(
                f"{signature(gm).model} computes shapes from values: {node.name} in {where} has shape "
                f"{tuple(val.shape)}, which depends on the values computed (tokens picked by a computed index: a "
                f"router's choice of experts, a per-language adapter's selection): shardwise plans layouts and "
                f"collectives for shapes known before the run. Select with fixed-size groups (padded expert "
                f"capacity, a grouped matmul over all tokens, masks instead of indices) to shard this model")


def _static(d) -> bool:
    """Whether a size is known before the run: an int, or a symbol whose range pins it to one value
    (MPT's `1 - max(0, -pos - 7)` is 1 for every position)."""
    if isinstance(d, int):
        return True
    node = getattr(d, "node", None)
    if node is None or getattr(node, "shape_env", None) is None:
        return False
    bounds = node.shape_env.bound_sympy(node.expr)
    return bounds.lower == bounds.upper


def _drop_unused_weights(gm: fx.GraphModule) -> None:
    """A weight no op reads (the alias of a tied weight) is neither planned nor emitted.

    Parameters the call leaves unread that are no alias of a read one, more than UNREAD_LIMIT of the
    parameter bytes, are refused: they serve inputs this call does not give (an encoder's states for
    cross-attention, images or audio for a vision or audio tower), which a decoder-only step never will.
    """
    sig = signature(gm)
    state = gm.meta[STATE]
    params = [n for n in gm.graph.nodes if n.op == "placeholder" and n.name in sig.params]
    read = {_storage(state[sig.params[n.name]]) for n in params if n.users}
    unread = [sig.params[n.name] for n in params if not n.users and sig.params[n.name] not in sig.buffers
              and _storage(state[sig.params[n.name]]) not in read]
    total = sum(_nbytes(state[sig.params[n.name]]) for n in params if sig.params[n.name] not in sig.buffers)
    lost = sum(_nbytes(state[k]) for k in unread)
    if total and lost > UNREAD_LIMIT * total:
        modules = sorted({k.rsplit(".", 1)[0] for k in unread})
        shown = ", ".join(modules[:4]) + (f" and {len(modules) - 4} more" if len(modules) > 4 else "")
        raise ShardwiseError(
            f"{sig.model} is not a decoder-only model: the captured call reads none of {len(unread)} parameters "
            f"({lost / total:.0%} of the parameter bytes), in {shown}; they take inputs this call does not give (an "
            f"encoder's states for cross-attention, images or audio for an encoder tower). shardwise shards "
            f"decoder-only attention transformers called on token ids: shard the decoder alone (a model whose "
            f"every parameter the call reads), or call it with every input it needs")
    for node in params:
        if not node.users:
            del sig.params[node.name]
            gm.graph.erase_node(node)


def _storage(t: torch.Tensor) -> int:
    """Identity of a tensor's storage: tied weights share one (on the meta device too)."""
    return t.untyped_storage()._cdata


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ------------------------------------------------------------------------------------ matmuls with a weight
_NOOPS = {aten.to.dtype, aten.to.dtype_layout, aten.alias.default, aten.detach.default}  # return their input as is
_COPIES = {aten._to_copy.default, aten.clone.default, aten.contiguous.default}  # a contiguous copy: only of weights


def _skip_noop_casts(gm: fx.GraphModule) -> None:
    """A cast to a tensor's own dtype and device, or a copy, is the tensor itself: a weight read through
    one (a router's `self.weight.to(x.dtype)`) is read directly, so the op reading it is seen to read a
    weight; a KV cache returned through one (GPT-Neo's `key.to(float32)` after the update) is returned
    as updated, so the step's output is the cache it carries."""
    params = signature(gm).params
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not node.args:
            continue
        src, val = node.args[0], node.meta.get("val")
        if node.target not in _NOOPS and not (node.target in _COPIES and isinstance(src, fx.Node) and src.name in params):
            continue
        if isinstance(src, fx.Node) and isinstance(val, torch.Tensor) and isinstance(src.meta.get("val"), torch.Tensor) \
                and src.meta["val"].dtype == val.dtype and src.meta["val"].device == val.device \
                and tuple(src.meta["val"].shape) == tuple(val.shape) and not node.kwargs.get("memory_format"):
            node.replace_all_uses_with(src)


def _linearize(gm: fx.GraphModule, mm: fx.Node, mode) -> None:
    """`x @ W.T` → linear(x, W); `x @ W` → mm on the rows of x; `addmm(b, x, W.T)` → linear(x, W, b)."""
    params = signature(gm).params

    def weight(n) -> bool:
        return isinstance(n, fx.Node) and n.name in params and n.meta["val"].ndim == 2

    g = gm.graph
    if mm.target is aten.addmm.default:
        bias, x, w = mm.args[:3]
        W = transposed_2d(w)
        if not weight(W) or mm.kwargs.get("beta", 1) != 1 or mm.kwargs.get("alpha", 1) != 1 or \
                not isinstance(bias, fx.Node) or bias.meta["val"].ndim != 1:
            return
        new = [(aten.linear.default, (x, W, bias))]
    else:
        x, w = mm.args[:2]
        W = transposed_2d(w)
        if weight(W):
            new = [(aten.linear.default, (x, W))]
        elif mm.target is aten.matmul.default and weight(w) and x.meta["val"].ndim >= 2:
            rows = [-1, shape(w)[0]]
            new = [(aten.mm.default, (x, w))] if x.meta["val"].ndim == 2 else \
                [(aten.reshape.default, (x, rows)), (aten.mm.default, (None, w)), (aten.reshape.default, (None, list(shape(mm))))]
        else:
            return
    with g.inserting_before(mm):
        prev = None
        for target, args in new:
            args = tuple(prev if a is None else a for a in args)
            prev = g.call_function(target, args)
            copy_meta(prev, mm)
            fake_run(prev, mode)
    mm.replace_all_uses_with(prev)
    g.erase_node(mm)


# ------------------------------------------------------------------------------------ explicit attention
def _to_sdpa(gm: fx.GraphModule, att: ExplicitAttention, mode) -> None:
    """Replace softmax(scale·q·kᵀ + Σ terms)·v by scaled_dot_product_attention (see ExplicitAttention)."""
    heads = _batch_heads(att)
    if heads is None:
        return
    B, H = heads
    g = gm.graph
    made: list[fx.Node] = []

    def add(target, args, kwargs=None):
        n = g.call_function(target, tuple(args), kwargs or {})
        copy_meta(n, att.softmax)
        fake_run(n, mode)
        made.append(n)
        return n

    dtype = att.q.meta["val"].dtype
    with g.inserting_before(att.out):
        q = _as_4d(att.q, B, add)
        k = _untransposed(att.kt, add)
        k = _as_4d(k, B, add) if k is not None else None
        v = _as_4d(att.v, B, add)
        mask = _mask(att, B, H, dtype, add)
        if q is None or k is None or v is None or mask is False or shape(q)[1] != H or shape(q)[0] != B:
            for n in reversed(made):
                g.erase_node(n)
            return
        kv_shape = [B, H, shape(k)[2], shape(k)[3]]
        if shape(k)[1] != H:  # the matmul broadcast one KV head over the query heads: so does expand
            k = add(aten.expand.default, (k, kv_shape))
            v = add(aten.expand.default, (v, [B, H, shape(v)[2], shape(v)[3]]))
        kwargs = {"scale": att.scale} | ({"attn_mask": mask} if mask is not None else {})
        out = add(aten.scaled_dot_product_attention.default, (q, k, v), kwargs)
        if shape(out) != shape(att.out):
            out = add(aten.reshape.default, (out, list(shape(att.out))))
    att.out.replace_all_uses_with(out)


def _batch_heads(att: ExplicitAttention) -> tuple[int, int] | None:
    """(B, H) of an explicit attention: from the first 4-D tensor among q, the scores and the output's view."""
    around = [att.q, att.scores, att.softmax, *att.softmax.all_input_nodes, *att.out.users]
    for n in around:
        s = shape(n) if isinstance(n.meta.get("val"), torch.Tensor) else ()
        if len(s) == 4:
            return s[0], s[1]
    return None


def _as_4d(x: fx.Node, B: int, add) -> fx.Node | None:
    """`x` as [B, heads, rows, cols]: itself, the 4-D tensor a [B·heads, rows, cols] view was made from, or a view."""
    s = shape(x)
    if len(s) == 4:
        return x if s[0] == B else None
    if len(s) != 3 or s[0] % B:
        return None
    want = (B, s[0] // B, s[1], s[2])
    src = x
    while src.op == "call_function" and src.target in VIEWS:
        src = src.args[0]
        if shape(src) == want:
            return src
    return add(aten.reshape.default, (x, list(want)))


def _untransposed(kt: fx.Node, add) -> fx.Node:
    """k from the kᵀ the scores read: the tensor a swap of the last two dims was taken of, else that swap."""
    nd = len(shape(kt))
    if kt.op == "call_function":
        if kt.target is aten.transpose.int and sorted(d % nd for d in kt.args[1:3]) == [nd - 2, nd - 1]:
            return kt.args[0]
        if kt.target is aten.permute.default and [d % nd for d in kt.args[1]] == list(range(nd - 2)) + [nd - 1, nd - 2]:
            return kt.args[0]
    return add(aten.transpose.int, (kt, -2, -1))


def _mask(att: ExplicitAttention, B: int, H: int, dtype, add):
    """The sum of the scores' additive terms as one [B, H, L, S]-broadcastable mask (None: no terms;
    False: a term that cannot be brought to that shape)."""
    parts = []
    for coef, t, space in att.terms:
        parts.append((coef, t, space))
    for coef, m, fill, fills_where_true, space in att.masks:
        fill_at = (fill, 0.0) if fills_where_true else (0.0, fill)
        t = add(aten.where.Scalar, (m, *fill_at))
        if t.meta["val"].dtype != dtype:
            t = add(aten.to.dtype, (t, dtype))
        parts.append((coef, t, space))
    mask = None
    for coef, t, space in parts:
        if t.meta["val"].dtype != dtype:
            return False
        t4 = _term_4d(t, space, B, H, add)
        if t4 is None:
            return False
        if coef != 1:
            t4 = add(aten.mul.Tensor, (t4, coef))
        mask = t4 if mask is None else add(aten.add.Tensor, (mask, t4))
    return mask


def _term_4d(t: fx.Node, space: tuple[int, ...], B: int, H: int, add) -> fx.Node | None:
    """A term added to scores of shape `space` ([B, H, L, S] or [B·H, L, S]), as a 4-D broadcastable tensor."""
    s = [1] * (len(space) - len(shape(t))) + list(shape(t))
    if len(space) == 4:
        return t if len(shape(t)) == 4 else add(aten.reshape.default, (t, s))
    if len(space) != 3 or s[0] not in (1, B * H):
        return None
    return add(aten.reshape.default, (t, [B, H, *s[1:]] if s[0] == B * H else [1, 1, *s[1:]]))


def _fold_views(gm: fx.GraphModule) -> None:
    """A view of a view that gives back the first one's input is that input (left by the rewrites above)."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in VIEWS:
            src = node.args[0]
            while isinstance(src, fx.Node) and src.op == "call_function" and src.target in VIEWS:
                src = src.args[0]
                if shape(src) == shape(node) and src.meta["val"].dtype == node.meta["val"].dtype:
                    node.replace_all_uses_with(src)
                    break


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
def _feature_pieces(gm: fx.GraphModule, out: fx.Node, width: int):
    """If every use of `out` takes a contiguous range of its last dim (features), the pieces.

    The uses are read through views that keep the features (`[B, L, W]` → `[B·L, W]`) and one view
    that splits them into groups of whole heads (`[.., W]` → `[.., G, D]`, Falcon's multiquery
    `[.., H + 2, D]`): a `split`, `chunk`, `slice`, `select` or `index` by a constant along the features, or
    along the groups of such a view (`chunk` as a `split`). Returns [(start, length, user node to replace)]
    or None.
    """
    cur = out
    while len(cur.users) == 1:
        (u,) = cur.users
        if u.target in VIEWS and shape(u)[-1] == width:
            cur = u
        else:
            break
    nd = len(shape(cur))
    unit = 1  # features per index along the dim the pieces are cut from
    if len(cur.users) == 1 and (u := next(iter(cur.users))).target in VIEWS:
        s = shape(u)
        if len(s) == nd + 1 and s[:nd - 1] == shape(cur)[:-1] and s[-2] * s[-1] == width:
            cur, nd, unit = u, nd + 1, s[-1]  # [.., G, D]: pieces are whole groups
    along = nd - 1 if unit == 1 else nd - 2
    size = width // unit
    pieces = []
    for u in cur.users:
        got = _piece(gm, u, along, nd, size)
        if got is None:
            return None
        for start, length, user in got:
            pieces.append((start * unit, length * unit, user))
    return pieces if len(pieces) > 1 else None


def _piece(gm: fx.GraphModule, u: fx.Node, along: int, nd: int, size: int):
    """The ranges (start, length, node) one use takes along dim `along` (of `size`), or None."""
    if u.target in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default):
        dim = (u.args[2] if len(u.args) > 2 else u.kwargs.get("dim", 0)) % nd
        if dim != along:
            return None
        sizes = u.args[1] if u.target is not aten.chunk.default else -(-size // u.args[1])  # chunk: ceil(size / n)
        sizes = [sizes] * (size // sizes) + ([size % sizes] if size % sizes else []) if isinstance(sizes, int) else list(sizes)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        if any(get.target is not operator.getitem for get in u.users):
            return None
        return [(starts[get.args[1]], sizes[get.args[1]], get) for get in u.users]
    if u.target is aten.slice.Tensor:
        dim = (u.args[1] if len(u.args) > 1 else 0) % nd
        start = (u.args[2] if len(u.args) > 2 else 0) or 0
        end = u.args[3] if len(u.args) > 3 and u.args[3] is not None else size
        if dim != along or (len(u.args) > 4 and u.args[4] != 1):
            return None
        start, end = start % size if start < 0 else start, min(end + size if end < 0 else end, size)
        return [(start, end - start, u)]
    if u.target is aten.select.int:
        dim, i = u.args[1] % nd, u.args[2] % size
        return [(i, 1, u)] if dim == along else None
    if u.target is aten.index.Tensor:
        index = list(u.args[1])
        if len(index) != along + 1 or any(i is not None for i in index[:-1]):
            return None
        values = _constant(gm, index[-1])
        if values is None or values.ndim != 1 or not len(values):
            return None
        picks = [int(v) % size for v in values.tolist()]
        if picks != list(range(picks[0], picks[0] + len(picks))):
            return None
        return [(picks[0], len(picks), u)]
    return None


def _constant(gm: fx.GraphModule, n) -> torch.Tensor | None:
    """The value of a lifted constant tensor (through lift_fresh_copy / clone / detach), else None."""
    sig = signature(gm)
    while isinstance(n, fx.Node) and n.op == "call_function" and n.target in (
            aten.lift_fresh_copy.default, aten.clone.default, aten.detach.default, aten.alias.default):
        n = n.args[0]
    if isinstance(n, fx.Node) and n.op == "placeholder" and n.name in sig.params and sig.params[n.name] in sig.buffers:
        value = gm.meta[STATE][sig.params[n.name]]
        return None if value.device.type == "meta" else value
    return None


def _unfuse(gm: fx.GraphModule, mm: fx.Node, mode) -> None:
    sig = signature(gm)
    m = PROJECTIONS[mm.target]
    w = mm.args[m.w]
    if not (isinstance(w, fx.Node) and w.name in sig.params and len(w.users) == 1):
        return
    width = shape(mm)[-1]
    pieces = _feature_pieces(gm, mm, width)
    if pieces is None:
        return
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
            piece = _piece_for(g, mm, args, user, mode)
        user.replace_all_uses_with(piece)
    g.eliminate_dead_code()
    for p in (w, bias):
        if isinstance(p, fx.Node) and not p.users and p.name in sig.params:
            del sig.params[p.name]
            g.erase_node(p)


def _piece_for(g: fx.Graph, mm: fx.Node, args: tuple, user: fx.Node, mode) -> fx.Node:
    """`mm`'s op on `args` (one piece of its fused weight), in the shape `user` had the features it took."""
    piece = g.call_function(mm.target, args, dict(mm.kwargs))
    copy_meta(piece, mm)
    fake_run(piece, mode)
    if shape(piece) != shape(user):
        view = g.call_function(aten.reshape.default, (piece, list(shape(user))))
        copy_meta(view, user)
        fake_run(view, mode)
        piece = view
    return piece


def _unfuse_experts(gm: fx.GraphModule, mm: fx.Node, mode) -> None:
    """A grouped matmul on a fused stacked weight whose output is cut along features into contiguous pieces
    (gate and up: `chunk(grouped_mm(x, W.transpose(-2, -1)), 2, -1)`): one grouped matmul per piece, each
    on a slice of W along its stored feature dim (1 when read transposed, else 2)."""
    sig = signature(gm)
    found = expert_weight(mm, sig.params)
    if found is None:
        return
    w, transposed = found
    if len(w.users) != 1 or (transposed and len(mm.args[1].users) != 1):
        return
    pieces = _feature_pieces(gm, mm, shape(mm)[-1])
    if pieces is None:
        return
    g = gm.graph
    first_ph = next(n for n in g.nodes if n.op == "placeholder")
    for start, length, user in pieces:
        new_w = _derived_param(gm, w, 1 if transposed else 2, start, length, first_ph)
        with g.inserting_before(user):
            operand = new_w
            if transposed:
                operand = g.call_function(aten.transpose.int, (new_w, -2, -1))
                copy_meta(operand, mm.args[1])
                fake_run(operand, mode)
            piece = _piece_for(g, mm, (mm.args[0], operand, *mm.args[2:]), user, mode)
        user.replace_all_uses_with(piece)
    g.eliminate_dead_code()
    if not w.users and w.name in sig.params:
        del sig.params[w.name]
        g.erase_node(w)


_EXPERT_ACTS = {aten.silu.default: "silu", aten.gelu.default: "gelu", aten.relu.default: "relu"}
_ADDS = (aten.add.Tensor, aten.add_.Tensor)
_CASTS = (aten.to.dtype, aten._to_copy.default)


def _stacked_matmul(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A matmul of the routed tokens with a stacked [X, ·, ·] expert weight: a grouped matmul, or a `bmm`
    whose second operand is such a weight (Llama 4 runs every expert over every token with one)."""
    if is_grouped_mm(node):
        return True
    return node.op == "call_function" and node.target is aten.bmm.default and \
        expert_weight(node, signature(gm).params) is not None


def _fuse_experts(gm: fx.GraphModule, down: fx.Node, mode) -> None:
    """Gate, up, activation and down of a mixture's experts → one `experts_ffn` (runtime/experts.py), for
    the three forms it knows (`down` is the last matmul); any other form is left as it is (find_layers
    then reports the mixture as run replicated)."""
    from ..runtime import experts  # noqa: F401  (registers the op)

    if down.target is aten.bmm.default:
        _fuse_dense_experts(gm, down, mode)
    elif not _fuse_swiglu_experts(gm, down, mode):
        _fuse_gpt_oss_experts(gm, down, mode)


def _gated_product(m) -> tuple[fx.Node, fx.Node, str, fx.Node] | None:
    """`act(g) * u` (either order), the product and activation used once: (g, u, activation name, act node)."""
    if not (isinstance(m, fx.Node) and m.target is aten.mul.Tensor and len(m.users) == 1):
        return None
    a, u = m.args
    if not (isinstance(a, fx.Node) and isinstance(u, fx.Node)):
        return None
    if a.target not in _EXPERT_ACTS:
        a, u = u, a
    if a.target not in _EXPERT_ACTS or len(a.users) != 1 or len(a.args) != 1 or a.kwargs:
        return None
    return a.args[0], u, _EXPERT_ACTS[a.target], a


def _fuse_swiglu_experts(gm: fx.GraphModule, down: fx.Node, mode) -> bool:
    """`grouped(act(grouped(x, Wg, offs)) * grouped(x, Wu, offs), Wd, offs)`, offs = cumsum(counts), each
    intermediate used once → `experts_ffn(x, Wg, Wu, Wd, offs − counts, offs, act)`."""
    if down.op != "call_function" or len(down.args) != 3 or down.kwargs:
        return False
    m, w_down, offs = down.args
    found = _gated_product(m)
    if found is None:
        return False
    g, u, act, a = found
    same = lambda n: (isinstance(n, fx.Node) and is_grouped_mm(n) and n.target is down.target and len(n.args) == 3
                      and not n.kwargs and len(n.users) == 1 and n.args[2] is offs)
    if not (same(g) and same(u) and g.args[0] is u.args[0]) or _counts(offs) is None:
        return False
    _replace_by_experts_ffn(gm, down, mode, offs, (g.args[0], g.args[1], u.args[1], w_down), act,
                            erase=(down, m, a, g, u))
    return True


def _fuse_gpt_oss_experts(gm: fx.GraphModule, down: fx.Node, mode) -> bool:
    """gpt-oss's experts (transformers' GptOssExperts through grouped matmuls):

        h  = grouped(x, Wgu, offs) + bgu[ids]          gate and up interleaved: h[:, ::2], h[:, 1::2]
        g  = clamp(h[:, ::2], max=l);  u = clamp(h[:, 1::2], −l, l)
        y  = grouped((u + 1) · (g · σ(g · α)), Wd, offs) + bd[ids]

    with ids the routed rows' expert ids, sorted, and offs = cumsum(histc(ids, X bins)): then bgu[ids] on
    expert i's rows is bgu[i], and the whole is `experts_ffn(x, Wgu, None, Wd, starts, offs,
    "gpt_oss:α:l", bgu, None, bd)`. Each step is checked op for op; anything else is left as it is."""
    if down.op != "call_function" or len(down.args) != 3 or down.kwargs or len(down.users) != 1:
        return False
    h, w_down, offs = down.args
    out = next(iter(down.users))
    b_down = _indexed_bias(out, down)
    gated = _gpt_oss_gate(h)
    counts = _counts(offs)
    if b_down is None or gated is None or counts is None:
        return False
    (hb, alpha, limit), (bd, ids) = gated, b_down
    gu = next((a for a in hb.args if isinstance(a, fx.Node) and is_grouped_mm(a)), None)
    if not (gu is not None and gu.target is down.target and len(gu.args) == 3 and not gu.kwargs
            and gu.args[2] is offs and len(gu.users) == 1):
        return False
    b_gate = _indexed_bias(hb, gu)
    if b_gate is None:
        return False
    bgu, ids_gu = b_gate
    X = shape(w_down)[0]
    if ids_gu is not ids or not _histogram_of(counts, ids, X):
        return False
    from ..runtime.experts import gpt_oss_activation

    erase = [out, down, h, *_gate_nodes(h), hb, gu]
    _replace_by_experts_ffn(gm, out, mode, offs, (gu.args[0], gu.args[1], None, w_down),
                            gpt_oss_activation(alpha, limit), erase=erase, biases=(bgu, None, bd))
    return True


def _indexed_bias(add: fx.Node, mm: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """`add(mm, b[ids])` (either order, in place or not) with b a stacked [X, N] weight and `mm` used
    only here: (b, ids)."""
    sig = signature(add.graph.owning_module)
    if not (add.op == "call_function" and add.target in _ADDS and len(add.args) == 2 and not add.kwargs
            and mm in add.args and len(mm.users) == 1):
        return None
    other = add.args[1] if add.args[0] is mm else add.args[0]
    if not (isinstance(other, fx.Node) and other.target is aten.index.Tensor and len(other.users) == 1):
        return None
    b, index = other.args
    if not (isinstance(b, fx.Node) and b.op == "placeholder" and b.name in sig.params and b.meta["val"].ndim == 2
            and len(index) == 1 and isinstance(index[0], fx.Node) and index[0].meta["val"].ndim == 1):
        return None
    return b, index[0]


def _gpt_oss_gate(h) -> tuple[fx.Node, float, float] | None:
    """The interleaved clamped GLU of gpt-oss ending in `h`, each intermediate used only inside it:
    (the gate_up tensor it reads, α, limit), else None."""
    def one_use(n):
        return isinstance(n, fx.Node) and n.op == "call_function" and len(n.users) == 1

    if not (one_use(h) and h.target is aten.mul.Tensor and all(isinstance(a, fx.Node) for a in h.args)):
        return None
    plus_one, glu = h.args if h.args[0].target in _ADDS else h.args[::-1]
    if not (one_use(plus_one) and plus_one.target is aten.add.Tensor and plus_one.args[1] == 1 and not plus_one.kwargs
            and one_use(glu) and glu.target is aten.mul.Tensor and all(isinstance(a, fx.Node) for a in glu.args)):
        return None
    gate, sig = glu.args if glu.args[1].target is aten.sigmoid.default else glu.args[::-1]
    if not (one_use(sig) and sig.target is aten.sigmoid.default and one_use(sig.args[0])
            and sig.args[0].target is aten.mul.Tensor):
        return None
    scaled, alpha = sig.args[0].args if isinstance(sig.args[0].args[0], fx.Node) else sig.args[0].args[::-1]
    up = plus_one.args[0]
    if not (scaled is gate and isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and gate.target is aten.clamp.default and len(gate.users) == 2
            and one_use(up) and up.target is aten.clamp.default):
        return None
    g_lo, g_hi = (list(gate.args[1:]) + [None, None])[:2]
    u_lo, u_hi = (list(up.args[1:]) + [None, None])[:2]
    if gate.kwargs or up.kwargs or g_lo is not None or g_hi is None or u_hi != g_hi or u_lo != -g_hi:
        return None
    halves = [gate.args[0], up.args[0]]
    if not all(one_use(n) and n.target is aten.slice.Tensor for n in halves):
        return None
    src = halves[0].args[0]
    nd = src.meta["val"].ndim if isinstance(src, fx.Node) else 0
    for start, n in enumerate(halves):  # gate = [..., 0::2], up = [..., 1::2] of the same tensor's last dim
        dim, lo, hi, step = (list(n.args[1:]) + [0, None, None, 1][len(n.args) - 1:])[:4]
        if n.args[0] is not src or dim % nd != nd - 1 or lo != start or step != 2 or \
                (hi is not None and hi < shape(src)[-1]):
            return None
    if not (isinstance(src, fx.Node) and len(src.users) == 2 and src.target in _ADDS):
        return None
    return src, float(alpha), float(g_hi)


def _gate_nodes(h: fx.Node) -> list[fx.Node]:
    """The nodes of `_gpt_oss_gate`'s pattern ending in `h` (its reader excluded), consumers first."""
    plus_one, glu = h.args if h.args[0].target in _ADDS else h.args[::-1]
    gate, sig = glu.args if glu.args[1].target is aten.sigmoid.default else glu.args[::-1]
    up = plus_one.args[0]
    return [plus_one, glu, sig, sig.args[0], gate, up, gate.args[0], up.args[0]]


def _counts(offs) -> fx.Node | None:
    """The per-expert counts of `offs = cumsum(counts)` (offs[i]: where expert i's rows end), else None."""
    if isinstance(offs, fx.Node) and offs.target is aten.cumsum.default and isinstance(offs.args[0], fx.Node) \
            and offs.args[0].meta["val"].shape == offs.meta["val"].shape:
        counts = offs.args[0]
        while counts.target in _CASTS and isinstance(counts.args[0], fx.Node):  # counted in float, cast back
            counts = counts.args[0]
        return counts
    return None


def _histogram_of(counts: fx.Node, ids: fx.Node, X: int) -> bool:
    """Whether `counts` is `histc(ids, bins=X, min=0, max=X − 1)` (through casts): expert i's rows are
    then the rows whose id is i, so a bias indexed by `ids` is expert i's bias on those rows."""
    if counts.target is not aten.histc.default:
        return False
    src = counts.args[0]
    while isinstance(src, fx.Node) and src.target in _CASTS:
        src = src.args[0]
    bins, lo, hi = (list(counts.args[1:]) + [100, 0, 0][len(counts.args) - 1:])[:3]
    return src is ids and bins == X and lo == 0 and hi == X - 1


def _fuse_dense_experts(gm: fx.GraphModule, down: fx.Node, mode) -> bool:
    """Llama 4's experts: every expert over every token, `v` = the tokens repeated X times, each scaled by
    its router score for that expert (0 where not routed), viewed [X, T, E]:

        bmm(act(bmm(v, Wg)) * bmm(v, Wu), Wd)        → [X, T, E]

    Expert i's rows of v viewed [X·T, E] are i·T..(i + 1)·T, so it is `experts_ffn` on that view with
    starts = i·T and ends = (i + 1)·T, viewed back to [X, T, E]."""
    m, w_down = down.args
    found = _gated_product(m)
    if found is None or down.kwargs:
        return False
    g, u, act, a = found
    same = lambda n: (isinstance(n, fx.Node) and n.target is aten.bmm.default and not n.kwargs and len(n.users) == 1
                      and expert_weight(n, signature(gm).params) is not None)
    if not (same(g) and same(u) and g.args[0] is u.args[0]):
        return False
    X, T, E = shape(g.args[0])
    graph = gm.graph

    def add(target, args, kwargs=None, like=down):
        n = graph.call_function(target, args, kwargs or {})
        copy_meta(n, like)
        fake_run(n, mode)
        return n

    with graph.inserting_before(down):
        x = add(aten.reshape.default, (g.args[0], [X * T, E]), like=g)
        starts = add(aten.arange.start_step, (0, X * T, T), {"dtype": torch.int64})
        ends = add(aten.arange.start_step, (T, X * T + T, T), {"dtype": torch.int64})
        fused = add(torch.ops.shardwise.experts_ffn.default, (x, g.args[1], u.args[1], w_down, starts, ends, act))
        back = add(aten.reshape.default, (fused, list(shape(down))))
    down.replace_all_uses_with(back)
    for n in (down, m, a, g, u):
        graph.erase_node(n)
    return True


def _replace_by_experts_ffn(gm: fx.GraphModule, out: fx.Node, mode, offs: fx.Node, weights: tuple, act: str,
                            erase, biases: tuple = (None, None, None)) -> None:
    """Insert `experts_ffn(x, Wg, Wu, Wd, offs − counts, offs, act, *biases)` before `out`, use it for `out`,
    and erase the nodes it replaces (consumers first)."""
    graph = gm.graph
    with graph.inserting_before(out):
        starts = graph.call_function(aten.sub.Tensor, (offs, offs.args[0]))
        copy_meta(starts, offs)
        fake_run(starts, mode)
        args = (*weights, starts, offs, act)
        if any(b is not None for b in biases):
            args = args + tuple(biases)
        fused = graph.call_function(torch.ops.shardwise.experts_ffn.default, args)
        copy_meta(fused, out)
        fake_run(fused, mode)
    out.replace_all_uses_with(fused)
    for n in erase:
        graph.erase_node(n)


def _fuse_dispatch(gm: fx.GraphModule, ffn: fx.Node, mode) -> bool:
    """The routing around a fused `experts_ffn` → one `moe_ffn` over the tokens (runtime/experts.py), where it
    is transformers' grouped-experts forward, each step checked:

        _, perm = sort(ids.reshape(−1));  rows = x[perm // k];  offs = cumsum(histc(sorted ids, X, 0, X − 1))
        out = experts_ffn(rows, ..., offs − counts, offs, ...) · w.reshape(−1)[perm].unsqueeze(−1)
        inv = empty_like(perm); inv[perm] = arange(T·k);  y = out[inv].view(T, k, E).sum(1)

    with x [T, E] the tokens, ids and w [T, k] the router's picks and weights. y[t] then depends only on
    token t: the op runs on any subset of the tokens (all-to-all dispatch). Anything else is left as it is."""
    def op(n, *targets, users=None):
        return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets and \
            (users is None or len(n.users) == users)

    def flat(n):  # `t.reshape(-1)` of a [T, k] tensor: t
        if op(n, *VIEWS, users=1) and list(n.args[1]) == [-1] and n.args[0].meta["val"].ndim == 2:
            return n.args[0]
        return None

    gathered, starts, offs = ffn.args[0], ffn.args[4], ffn.args[5]
    counts = _counts(offs)
    if not (op(gathered, aten.index.Tensor, users=1) and len(gathered.args[1]) == 1 and len(ffn.users) == 1
            and op(starts, aten.sub.Tensor) and starts.args == (offs, offs.args[0]) and counts is not None):
        return False
    x, (div,) = gathered.args
    if not (op(div, aten.floor_divide.default, users=1) and op(div.args[0], operator.getitem)
            and div.args[0].args[1] == 1 and op(div.args[0].args[0], aten.sort.default)):
        return False
    perm, sort = div.args[0], div.args[0].args[0]
    ids = flat(sort.args[0]) if len(sort.args) == 1 and not sort.kwargs else None
    sorted_ids = next((u for u in sort.users if u.args[1] == 0), None)
    X = shape(ffn.args[3])[0]
    if ids is None or sorted_ids is None or x.meta["val"].ndim != 2 or shape(ids) != (shape(x)[0], div.args[1]) \
            or not _histogram_of(counts, sorted_ids, X):
        return False
    T, k, E = shape(x)[0], div.args[1], shape(ffn)[-1]
    scaled = next(iter(ffn.users))
    if not (op(scaled, aten.mul.Tensor, users=1) and ffn in scaled.args):
        return False
    unsq = scaled.args[1] if scaled.args[0] is ffn else scaled.args[0]
    if not (op(unsq, aten.unsqueeze.default, users=1) and unsq.args[1] in (-1, 1)
            and op(unsq.args[0], aten.index.Tensor, users=1) and list(unsq.args[0].args[1]) == [perm]):
        return False
    weights = flat(unsq.args[0].args[0])
    back = next(iter(scaled.users))
    if weights is None or shape(weights) != (T, k) or not (op(back, aten.index.Tensor, users=1)
                                                         and len(back.args[1]) == 1):
        return False
    inv = back.args[1][0]
    if not (op(inv, aten.index_put_.default, users=1) and op(inv.args[0], aten.empty_like.default, users=1)
            and inv.args[0].args[0] is perm and list(inv.args[1]) == [perm] and len(inv.args) == 3
            and op(inv.args[2], aten.arange.default, users=1) and list(inv.args[2].args) == [T * k]):
        return False
    view = next(iter(back.users))
    total = next(iter(view.users), None) if op(view, *VIEWS, users=1) and list(view.args[1]) == [T, k, E] else None
    if not (op(total, aten.sum.dim_IntList) and list(total.args[1]) in ([1], [-2]) and len(total.args) == 2
            and not total.kwargs):
        return False
    biases = tuple(ffn.args[7:10]) + (None,) * (3 - len(ffn.args[7:10]))
    graph = gm.graph
    with graph.inserting_before(total):
        fused = graph.call_function(torch.ops.shardwise.moe_ffn.default,
                                    (x, *ffn.args[1:4], ids, weights, ffn.args[6], *biases[:3], 0, 0, X))
        copy_meta(fused, total)
        fake_run(fused, mode)
    total.replace_all_uses_with(fused)
    for n in (total, view, back, inv, inv.args[2], inv.args[0], scaled, unsq, unsq.args[0], ffn, starts, gathered,
              div):
        graph.erase_node(n)
    return True


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
