"""Rules for ops that compute: pointwise, reductions, matmuls, attention, embedding.

Partial sums (`{Σx}`) flow through linear ops and are resolved before anything non-linear:
  neg, casts, dropout(eval)            keep the partial
  a + b, a - b                         keep it when every tensor operand is partial over the same atoms
  a * b, a / b                         keep it when exactly one operand (the numerator) is partial
  sum, mean over a split dim           create one: each rank reduces its chunk
  everything else                      reduce-scatter onto a dim that divides, else all-reduce
A matmul contracting a dim split over atoms S yields a partial over S (the paper's E_x × E_x F_yz →
F_yz {Σx}); its input is brought to the weight's split of the contracted dim.
"""

from __future__ import annotations

from ...errors import LayoutError
from ...ir.layout import Layout
from ...ir.meta import ATTENTION, DISPATCH
from .registry import (
    Decision,
    OpCall,
    aten,
    broadcast_map,
    clear_dims,
    drop_atoms,
    longest_dividing_prefix,
    project,
    register,
    register_named,
    scatter_partial,
)

# ------------------------------------------------------------------------------------ pointwise
_UNARY_LINEAR = {aten.neg, aten.to, aten._to_copy, aten.dropout, aten.type_as, aten.positive}
_ADDITIVE = {aten.add, aten.sub}
_MULTIPLICATIVE = {aten.mul, aten.div}

_POINTWISE = [
    aten.add, aten.sub, aten.mul, aten.div, aten.neg, aten.pow, aten.rsqrt, aten.sqrt, aten.exp,
    aten.log, aten.tanh, aten.sigmoid, aten.relu, aten.gelu, aten.silu, aten.sin, aten.cos, aten.abs,
    aten.reciprocal, aten.erf, aten.eq, aten.ne, aten.le, aten.lt, aten.ge, aten.gt, aten.logical_not,
    aten.logical_and, aten.logical_or, aten.bitwise_not, aten.bitwise_and, aten.bitwise_or,
    aten.__and__, aten.__or__, aten.where, aten.masked_fill, aten.maximum, aten.minimum, aten.clamp,
    aten.clamp_min, aten.clamp_max, aten._to_copy, aten.to, aten.type_as, aten.dropout,
    aten.floor_divide, aten.remainder, aten.fmod, aten.sign, aten.floor, aten.ceil, aten.round,
    aten.trunc, aten.log1p, aten.expm1, aten.softplus, aten.leaky_relu, aten.elu, aten.mish,
    aten.hardswish, aten.hardsigmoid, aten.hardtanh, aten.isnan, aten.isinf, aten.nan_to_num,
    aten.rsub, aten.positive, aten.exp2, aten.log2, aten.square,
]
_POINTWISE = list(dict.fromkeys(_POINTWISE))


def _packet(c: OpCall):
    return c.node.target.overloadpacket


def _kept_partial(c: OpCall, names: list[str]) -> tuple[frozenset[str], str | None]:
    """The partial the output may keep (and which input carries it), by the table in the module doc."""
    ls = c.layouts
    parts = {n: ls[n].partial for n in names}
    if not any(parts.values()):
        return frozenset(), None
    pkt = _packet(c)
    scalar_operand = len(names) < sum(1 for a in ("self", "other") if a in c.args)
    if pkt in _UNARY_LINEAR:
        if pkt is aten.dropout and c.args.get("train"):
            return frozenset(), None
        return parts[names[0]], "all"
    if pkt in _ADDITIVE:
        if not scalar_operand and len(set(parts.values())) == 1:
            return parts[names[0]], "all"
        return frozenset(), None
    if pkt in _MULTIPLICATIVE:
        carriers = [n for n in names if parts[n]]
        if len(carriers) == 1 and (pkt is aten.mul or carriers[0] == "self"):
            p = parts[carriers[0]]
            # the other factors must be whole along the partial's atoms, else the sum can't be deferred
            if not any(ls[n].used & p for n in names if n != carriers[0]):
                return p, carriers[0]
    return frozenset(), None


@register(*_POINTWISE)
def _pointwise(c: OpCall) -> Decision:
    names = list(c.layouts)
    if _packet(c) is aten.type_as:  # `other` only lends its dtype
        names = ["self"]
    out_shape = c.out_shape
    shapes = {n: c.shape(n) for n in names}
    keep, carrier = _kept_partial(c, names)

    # the output takes each dim's split from the reference input, else from any input that has it
    def score(n):
        return (len(shapes[n]) == len(out_shape) and shapes[n] == out_shape, not c.layouts[n].partial, len(c.layouts[n].used))

    order = sorted(names, key=score, reverse=True)
    dims: list[tuple[str, ...]] = [()] * len(out_shape)
    taken: set[str] = set(keep)
    for n in order:
        for i, j in enumerate(broadcast_map(shapes[n], out_shape)):
            atoms = c.layouts[n].dims[i]
            if j is not None and not dims[j] and atoms and not taken & set(atoms):
                dims[j] = atoms
                taken |= set(atoms)
    out = Layout(tuple(dims), keep)
    if not keep and all(c.layouts[n].partial for n in names if shapes[n] == out_shape) and any(
        c.layouts[n].partial for n in names
    ):
        # every full-size operand is partial and the op is not linear: scatter the sum, don't replicate it
        ref = c.layouts[order[0]]
        out = scatter_partial(Layout(out.dims, ref.partial - out.used), out_shape, c.mesh)
    req = {}
    for n in names:
        part = keep if (carrier == "all" or carrier == n) else frozenset()
        req[n] = project(out, shapes[n], out_shape, part)
    if "other" in c.layouts and "other" not in req:
        req["other"] = c.layouts["other"]
    return Decision(req, out)


# ------------------------------------------------------------------------------------ reductions
def _reduced_dims(c: OpCall, ndim: int) -> list[int]:
    d = c.args.get("dim")
    if d is None or d == []:
        return list(range(ndim))
    d = [d] if isinstance(d, int) else list(d)
    return sorted({x % ndim for x in d})


def _reduce(c: OpCall, *, linear: bool) -> Decision:
    x = c.layouts["self"]
    dims = _reduced_dims(c, x.ndim)
    keepdim = bool(c.args.get("keepdim", False))
    if linear:
        req = x
        new_partial = {a for d in dims for a in x.dims[d]}
    else:
        req = clear_dims(x.without_partial(), dims)
        new_partial = set()
    out_dims = [() if i in dims else a for i, a in enumerate(req.dims)] if keepdim else [
        a for i, a in enumerate(req.dims) if i not in dims
    ]
    out = Layout(tuple(out_dims), req.partial | frozenset(new_partial))
    if isinstance(c.node.meta.get("val"), (list, tuple)):
        return Decision({"self": req}, (out, out.without_partial()))
    return Decision({"self": req}, out)


@register(aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.mean.default)
def _sum_mean(c: OpCall) -> Decision:
    return _reduce(c, linear=True)


@register(
    aten.amax.default, aten.amin.default, aten.max.dim, aten.min.dim, aten.argmax.default,
    aten.argmin.default, aten.var.correction, aten.var.dim, aten.std.correction, aten.std.dim,
    aten.any.dim, aten.all.dim, aten.prod.dim_int, aten.var_mean.correction, aten.logsumexp.default,
)
def _reduce_nonlinear(c: OpCall) -> Decision:
    return _reduce(c, linear=False)


@register(aten._softmax.default, aten.softmax.int, aten._log_softmax.default, aten.log_softmax.int)
def _softmax(c: OpCall) -> Decision:
    x = c.layouts["self"].without_partial()
    req = clear_dims(x, [c.args["dim"]])
    return Decision({"self": req}, req)


@register(aten.layer_norm.default, aten.rms_norm.default)
def _norm(c: OpCall) -> Decision:
    """A fused norm needs its normalized dims whole (canonicalize decomposes norms to avoid this)."""
    x = c.layouts["input"].without_partial()
    k = len(c.args["normalized_shape"])
    req = clear_dims(x, range(x.ndim - k, x.ndim))
    out = {"input": req}
    for w in ("weight", "bias"):
        if w in c.layouts:
            out[w] = Layout.replicated(k)
    return Decision(out, req)


# ------------------------------------------------------------------------------------ matmuls
def _weight_in_use(c: OpCall, name: str, k_dim: int, x_k_atoms: tuple[str, ...]) -> Layout:
    """A fixed weight keeps its planned in-use layout; any other adopts the input's contracted split."""
    spec = c.weight(name)
    if spec is not None and spec.fixed:
        return spec.in_use
    w = c.layouts[name].without_partial()
    return Layout.sharded(w.ndim, k_dim, x_k_atoms)


def _contract(c: OpCall, x_name: str, w_name: str, *, w_k: int, w_n: int, bias: str | None) -> Decision:
    x = c.layouts[x_name]
    w = _weight_in_use(c, w_name, w_k, c.layouts[x_name].dims[-1])
    busy = w.used | w.partial
    x_req = drop_atoms(Layout(x.dims[:-1] + ((),), x.partial), busy).with_dim(x.ndim - 1, w.dims[w_k])
    out_dims = x_req.dims[:-1] + (w.dims[w_n],)
    out = Layout(out_dims, frozenset(w.dims[w_k]) | x_req.partial | w.partial)
    req = {x_name: x_req, w_name: w}
    if bias is not None and bias in c.layouts:
        req[bias] = project(out.without_partial(), c.shape(bias), c.out_shape, out.partial)
    return Decision(req, out)


@register(aten.linear.default)
def _linear(c: OpCall) -> Decision:
    return _contract(c, "input", "weight", w_k=1, w_n=0, bias="bias")


@register(aten.addmm.default)
def _addmm(c: OpCall) -> Decision:
    return _contract(c, "mat1", "mat2", w_k=0, w_n=1, bias="self")


@register(aten.mm.default)
def _mm(c: OpCall) -> Decision:
    return _contract(c, "self", "mat2", w_k=0, w_n=1, bias=None)


@register(aten.bmm.default)
def _bmm(c: OpCall) -> Decision:
    a = c.layouts["self"].without_partial()
    b_dims = (a.dims[0], a.dims[2], ())
    b = Layout(b_dims)
    out = Layout((a.dims[0], a.dims[1], ()), frozenset(a.dims[2]))
    return Decision({"self": a, "mat2": b}, out)


@register_named(r"(^|[:_])grouped_mm")
def _grouped_mm(c: OpCall) -> Decision:
    """A mixture of experts' grouped matmul `(x [T, K], w [X, K, N], offs [X]) → [T, N]` (torch._grouped_mm,
    transformers.grouped_mm_fallback): the rows of x are the routed tokens sorted by expert, so they stay
    whole (the routing is replicated), and so do the experts (X) and offs; the weight keeps its split of K
    and N (each expert's F, expert-sliced): K split over S makes the output a partial sum over S, like a
    linear. With a bias, K is whole (a bias added on every rank would be summed n times)."""
    names = list(c.args)
    x_name, w_name = names[0], names[1]
    w = c.layouts[w_name].without_partial()
    k_atoms = () if "bias" in c.layouts else w.dims[1]
    n_atoms = tuple(a for a in w.dims[2] if a not in k_atoms)
    w_req = Layout(((), k_atoms, n_atoms))
    req = {x_name: Layout(((), k_atoms)), w_name: w_req}
    for name in names[2:]:
        if name in c.layouts and c.layouts[name] is not None and not isinstance(c.layouts[name], list):
            req[name] = Layout.replicated(c.layouts[name].ndim)
    return Decision(req, Layout(((), n_atoms), frozenset(k_atoms)))


def _expert_weights(c: OpCall) -> tuple[tuple[str, ...], tuple[str, ...], dict[str, Layout]]:
    """(S, T, the weights' and biases' layouts) of a fused experts op: the experts split over S (dim X of the
    weights) and each expert's F over T, as the gate weight is split (gpt-oss's interleaved gate_up
    [X, E, 2F] splits its 2F like F: whole (gate, up) pairs). The gate and up biases [X, F] split like F;
    the down bias [X, E] over S and its E over some of T's atoms (it keeps those: each column's bias is
    then added by the one rank holding it, emit)."""
    wg = c.layouts["w_gate"].without_partial()
    S, T = wg.dims[0], tuple(a for a in wg.dims[2] if a not in wg.dims[0])
    w_in = Layout((S, (), T))
    req = {"w_gate": w_in, "w_down": Layout((S, T, ()))}
    if c.layouts.get("w_up") is not None:
        req["w_up"] = w_in
    for name in ("b_gate", "b_up"):
        if c.layouts.get(name) is not None:
            req[name] = Layout((S, T))
    if c.layouts.get("b_down") is not None:
        req["b_down"] = Layout((S, tuple(a for a in c.layouts["b_down"].dims[1] if a in T)))
    return S, T, req


@register_named(r"^shardwise::experts_ffn$")
def _experts_ffn(c: OpCall) -> Decision:
    """`experts_ffn(x [T, E], Wg [X, E, F], Wu [X, E, F], Wd [X, F, E], starts [X], ends [X], act, bg, bu, bd)`
    (runtime/experts.py): the experts split over S (the weights' X, starts and ends alike: each rank runs
    its experts' rows, the others stay 0) and each expert's F over T make the output a partial sum over
    S and T; the routed rows x are read whole (routing is replicated)."""
    S, T, req = _expert_weights(c)
    req |= {"x": Layout(((), ())), "starts": Layout((S,)), "ends": Layout((S,))}
    return Decision(req, Layout(((), ()), frozenset(S + T)))


@register_named(r"^shardwise::moe_ffn$")
def _moe_ffn(c: OpCall) -> Decision:
    """`moe_ffn(x [T, E], Wg, Wu, Wd, ids [T, k], weights [T, k], act, bg, bu, bd, ·, first, X)`: a mixture
    after its router, over the tokens. Its weights split as experts_ffn's (S, T). With `sw_dispatch` = D
    (all-to-all dispatch, D = S: the experts over the chips the tokens are split over), the tokens, their
    picks and weights stay split over D, each routed row travels to the rank of its expert and back
    inside the op, and the output is split like the tokens, a partial sum over T only. Otherwise the
    tokens are read whole (every rank routes them all) and the output is a partial sum over S and T."""
    S, T, req = _expert_weights(c)
    D = c.node.meta.get(DISPATCH)
    if D:
        if D != S:
            raise LayoutError(f"all-to-all dispatch over {c.mesh.format_atoms(D)} needs the experts split over the "
                              f"same chips; they are split over {c.mesh.format_atoms(S) if S else 'nothing'}")
        rows = Layout((D, ()))
        return Decision(req | {"x": rows, "ids": rows, "weights": rows}, Layout((D, ()), frozenset(T)))
    whole = Layout(((), ()))
    return Decision(req | {"x": whole, "ids": whole, "weights": whole}, Layout(((), ()), frozenset(S + T)))


# ------------------------------------------------------------------------------------ routing
@register(aten.topk.default, aten.sort.default, aten.sort.stable)
def _select(c: OpCall) -> Decision:
    """top-k and sort along one dim (a router picking experts, sorting the routed tokens by expert): that dim
    whole and the sum resolved; the other dims keep their split; values and indices alike."""
    x = c.layouts["self"].without_partial()
    d = c.args.get("dim")
    req = clear_dims(x, [-1 if d is None else d])
    return Decision({"self": req}, (req, req))


@register(aten.histc.default)
def _histc(c: OpCall) -> Decision:
    """Counts of values in bins (tokens per expert): over the whole input, so it reads it replicated."""
    return Decision({"self": Layout.replicated(c.layouts["self"].ndim)}, Layout.replicated(1))


# ------------------------------------------------------------------------------------ attention
@register(aten.scaled_dot_product_attention.default)
def _sdpa(c: OpCall) -> Decision:
    q = c.layouts["query"]
    B, H = c.shape("query")[0], c.shape("query")[1]
    Hk = c.shape("key")[1]
    spec = c.node.meta.get(ATTENTION)
    if spec is not None:
        bq, hq = spec.batch, spec.heads
    else:
        resolved = scatter_partial(Layout(q.dims, q.partial), c.shape("query"), c.mesh) if q.partial else q
        bq, hq = resolved.dims[0], resolved.dims[1]
        if resolved.dims[2] or resolved.dims[3]:
            bq, hq = q.dims[0], q.dims[1]
    bq = longest_dividing_prefix(bq, B, c.mesh)
    hq = tuple(a for a in longest_dividing_prefix(hq, H, c.mesh) if a not in bq)
    hk = hq if Hk == H else longest_dividing_prefix(hq, Hk, c.mesh)
    if hk != hq:
        raise LayoutError(
            f"{c.node.format_node()}: grouped-query attention with {H} query heads and {Hk} KV heads "
            f"cannot split KV heads {c.mesh.group_size(hq)} ways; expand K/V to {H} heads before "
            f"attention (repeat_kv), or plan attention='batch'"
        )
    q_req = Layout((bq, hq, (), ()))
    kv_req = Layout((bq, hk, (), ()))
    req = {"query": q_req, "key": kv_req, "value": kv_req}
    if "attn_mask" in c.layouts:
        mshape = c.shape("attn_mask")
        req["attn_mask"] = project(q_req, mshape, (B, H) + tuple(c.out_shape[2:3]) + tuple(mshape[-1:]))
    return Decision(req, Layout((bq, hq, (), ())))


# ------------------------------------------------------------------------------------ embedding
@register(aten.embedding.default)
def _embedding(c: OpCall) -> Decision:
    """Rows split over V give a partial (each rank looks up its vocab range); columns split E."""
    spec = c.weight("weight")
    w = spec.in_use if spec is not None and spec.fixed else c.layouts["weight"].without_partial()
    ids = drop_atoms(c.layouts["indices"].without_partial(), w.used)
    out = Layout(ids.dims + (w.dims[1],), frozenset(w.dims[0]))
    return Decision({"weight": w, "indices": ids}, out)
