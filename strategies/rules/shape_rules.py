"""Rules for ops that move data without arithmetic: views, slicing, joining, factories, indexing.

Views split and merge dims. A split dim stays a contiguous chunk per rank when its atoms fill the new
major dims first ((HD)_yz → H_yz D); a merge keeps chunks contiguous when only the first non-unit dim
of the merged group is split ((B_x, L) → (BL)_x). Anything else gathers the offending atoms first.
"""

from __future__ import annotations

from typing import Sequence

from ...ir.layout import Layout
from ...ir.mesh import Mesh
from .registry import Decision, OpCall, aten, broadcast_map, clear_dims, register, replicated_like

INT_MAX = 2**63 - 1


# ------------------------------------------------------------------------------------ view algebra
def view_groups(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Pair up dims of two shapes of equal numel into groups with equal products."""
    groups, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        gi, gj, pa, pb = [], [], 1, 1
        if i < len(a):
            gi.append(i)
            pa *= a[i]
            i += 1
        if j < len(b):
            gj.append(j)
            pb *= b[j]
            j += 1
        while pa != pb:
            if (pa < pb and i < len(a)) or j >= len(b):
                gi.append(i)
                pa *= a[i]
                i += 1
            else:
                gj.append(j)
                pb *= b[j]
                j += 1
        groups.append((gi, gj))
    return groups


def _map_group(in_dims, out_dims, layout: Layout, a, b, mesh: Mesh):
    """Atoms for each output dim of one group, or None if the input split is not a contiguous chunk."""
    flat: list[str] = []
    for k, d in enumerate(in_dims):
        atoms = layout.dims[d]
        if atoms and any(a[e] // mesh.group_size(layout.dims[e]) != 1 for e in in_dims[:k]):
            return None  # an earlier dim still has several rows per rank: the chunk would be strided
        flat.extend(atoms)
    out: list[tuple[str, ...]] = []
    rest = list(flat)
    for d in out_dims:
        if not rest:
            out.append(())
            continue
        n = b[d]
        if n % mesh.group_size(rest) == 0:
            out.append(tuple(rest))
            rest = []
            continue
        k = next((k for k in range(1, len(rest) + 1) if mesh.group_size(rest[:k]) == n), None)
        if k is None:
            return None
        out.append(tuple(rest[:k]))
        rest = rest[k:]
    return out if not rest else None


def view_layout(layout: Layout, a: Sequence[int], b: Sequence[int], mesh: Mesh) -> tuple[Layout, Layout]:
    """(required input layout, output layout) of reshaping shape `a` to `b`."""
    required = layout
    dims_out: list[tuple[str, ...]] = [()] * len(b)
    for gi, gj in view_groups(a, b):
        while True:
            mapped = _map_group(gi, gj, required, a, b, mesh)
            if mapped is not None:
                break
            # gather the minor-most atom of the last split dim of the group, then retry
            last = max(d for d in gi if required.dims[d])
            required = required.with_dim(last, required.dims[last][:-1])
        for d, atoms in zip(gj, mapped):
            dims_out[d] = atoms
    return required, Layout(tuple(dims_out), required.partial)


@register(aten.view.default, aten.reshape.default, aten._unsafe_view.default)
def _view(c: OpCall) -> Decision:
    req, out = view_layout(c.layouts["self"], c.shape("self"), c.out_shape, c.mesh)
    return Decision({"self": req}, out)


@register(aten.flatten.using_ints, aten.unflatten.int)
def _flatten(c: OpCall) -> Decision:
    return _view(c)


@register(aten.unsqueeze.default)
def _unsqueeze(c: OpCall) -> Decision:
    x = c.layouts["self"]
    d = c.args["dim"] % (x.ndim + 1)
    dims = list(x.dims)
    dims.insert(d, ())
    return Decision({"self": x}, Layout(tuple(dims), x.partial))


@register(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def _squeeze(c: OpCall) -> Decision:
    x, shape = c.layouts["self"], c.shape("self")
    if "dim" in c.args and c.args["dim"] is not None:
        dims = c.args["dim"]
        dims = [dims] if isinstance(dims, int) else list(dims)
        gone = {d % x.ndim for d in dims if shape[d % x.ndim] == 1}
    else:
        gone = {d for d, s in enumerate(shape) if s == 1}
    return Decision({"self": x}, Layout(tuple(a for i, a in enumerate(x.dims) if i not in gone), x.partial))


@register(aten.transpose.int)
def _transpose(c: OpCall) -> Decision:
    x = c.layouts["self"]
    d0, d1 = c.args["dim0"] % x.ndim, c.args["dim1"] % x.ndim
    dims = list(x.dims)
    dims[d0], dims[d1] = dims[d1], dims[d0]
    return Decision({"self": x}, Layout(tuple(dims), x.partial))


@register(aten.t.default)
def _t(c: OpCall) -> Decision:
    x = c.layouts["self"]
    return Decision({"self": x}, Layout(tuple(reversed(x.dims)), x.partial))


@register(aten.permute.default)
def _permute(c: OpCall) -> Decision:
    x = c.layouts["self"]
    perm = [p % x.ndim for p in c.args["dims"]]
    return Decision({"self": x}, Layout(tuple(x.dims[p] for p in perm), x.partial))


@register(aten.expand.default)
def _expand(c: OpCall) -> Decision:
    # Growing a partial would multiply what must later be summed: resolve partials first.
    x = c.layouts["self"].without_partial()
    in_shape, out_shape = c.shape("self"), c.out_shape
    off = len(out_shape) - len(in_shape)
    dims: list[tuple[str, ...]] = [()] * len(out_shape)
    for i, s in enumerate(in_shape):
        if not (s == 1 and out_shape[i + off] != 1):
            dims[i + off] = x.dims[i]
    return Decision({"self": x}, Layout(tuple(dims)))


@register(
    aten.alias.default,
    aten.detach.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.lift_fresh_copy.default,
)
def _identity(c: OpCall) -> Decision:
    x = c.layouts["self"]
    return Decision({"self": x}, x)


# ------------------------------------------------------------------------------------ slicing
@register(aten.slice.Tensor)
def _slice(c: OpCall) -> Decision:
    x, shape = c.layouts["self"], c.shape("self")
    d = c.args["dim"] % x.ndim
    start, end, step = c.args["start"] or 0, c.args["end"], c.args["step"]
    whole = start == 0 and (end is None or end >= shape[d]) and step == 1
    req = x if whole else clear_dims(x, [d])
    return Decision({"self": req}, req)


@register(aten.narrow.default, aten.cumsum.default)
def _whole_along_dim(c: OpCall) -> Decision:
    """narrow, cumsum: each output element depends on the whole of `dim`, so it must not be split."""
    x = c.layouts["self"]
    req = clear_dims(x, [c.args["dim"]])
    return Decision({"self": req}, req)


@register(aten.select.int)
def _select(c: OpCall) -> Decision:
    x = c.layouts["self"]
    d = c.args["dim"] % x.ndim
    req = clear_dims(x, [d])
    return Decision({"self": req}, Layout(tuple(a for i, a in enumerate(req.dims) if i != d), req.partial))


@register(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int)
def _split(c: OpCall) -> Decision:
    x = c.layouts["self"]
    d = c.args["dim"] % x.ndim
    req = clear_dims(x, [d])
    n = len(c.node.meta["val"])
    if c.node.target is aten.unbind.int:
        piece = Layout(tuple(a for i, a in enumerate(req.dims) if i != d), req.partial)
    else:
        piece = req
    return Decision({"self": req}, tuple([piece] * n))


# ------------------------------------------------------------------------------------ joining
def _reference(layouts: list[Layout]) -> Layout:
    """The input whose layout others follow: a non-partial one with the most atoms."""
    plain = [l for l in layouts if not l.partial]
    pool = plain or layouts
    return max(pool, key=lambda l: len(l.used))


@register(aten.cat.default)
def _cat(c: OpCall) -> Decision:
    nodes = c.args["tensors"]
    ls = c.layouts["tensors"]
    d = c.args["dim"]
    shapes = [tuple(n.meta["val"].shape) for n in nodes]
    nd = max(len(s) for s in shapes)
    d %= nd
    full = [l for l, s in zip(ls, shapes) if len(s) == nd]
    ref = clear_dims(_reference(full), [d])
    same_partial = len({l.partial for l in full}) == 1
    if not same_partial:
        ref = ref.without_partial()
    req = [ref if len(s) == nd else l for l, s in zip(ls, shapes)]  # legacy empty 1-D tensors pass as is
    return Decision({"tensors": req}, ref)


@register(aten.stack.default)
def _stack(c: OpCall) -> Decision:
    ls = c.layouts["tensors"]
    ref = _reference(ls)
    if len({l.partial for l in ls}) != 1:
        ref = ref.without_partial()
    d = c.args["dim"] % (ref.ndim + 1)
    dims = list(ref.dims)
    dims.insert(d, ())
    return Decision({"tensors": [ref] * len(ls)}, Layout(tuple(dims), ref.partial))


# ------------------------------------------------------------------------------------ factories
@register(
    aten.arange.default,
    aten.arange.start,
    aten.arange.start_step,
    aten.full.default,
    aten.zeros.default,
    aten.ones.default,
    aten.empty.memory_format,
    aten.scalar_tensor.default,
)
def _factory(c: OpCall) -> Decision:
    return Decision({}, Layout.replicated(len(c.out_shape)))


@register(aten.new_ones.default, aten.new_zeros.default, aten.new_full.default, aten.new_empty.default)
def _new_factory(c: OpCall) -> Decision:
    """`self` only lends its dtype and device; the result is fresh, its values one constant (or unset), so
    it may be split any way for free. It is split as `self` on the dims of the same size (a buffer
    assembled from `self`'s pieces, as DeepSeek builds its keys: `k.new_empty(...)[..., :d].copy_(k)`,
    is then written shard by shard instead of gathered whole), whole on the others."""
    x = c.layouts["self"]
    shape = c.shape("self")
    if len(shape) != len(c.out_shape):
        return Decision({"self": x}, Layout.replicated(len(c.out_shape)))
    dims = tuple(a if n == m else () for a, n, m in zip(x.dims, shape, c.out_shape))
    return Decision({"self": x}, Layout(dims))


@register(aten.zeros_like.default, aten.ones_like.default, aten.full_like.default, aten.empty_like.default)
def _like(c: OpCall) -> Decision:
    x = c.layouts["self"].without_partial()
    return Decision({"self": c.layouts["self"]}, x)


# ------------------------------------------------------------------------------------ indexing
@register(aten.index.Tensor)
def _index(c: OpCall) -> Decision:
    """Advanced indexing: replicated (it appears on small mask and position tensors), except rows picked
    from a partial sum by one 1-D index (a mixture of experts' combine, putting expert outputs back in
    token order): picking rows is linear, so the partial and the other dims' splits are kept."""
    x, idx = c.layouts["self"], c.layouts["indices"]
    if x.partial and len(idx) == 1 and idx[0] is not None and idx[0].ndim == 1 and not x.dims[0]:
        return Decision({"self": x, "indices": [replicated_like(idx[0])]},
                        Layout(((),) + x.dims[1:], x.partial))
    req = {"self": replicated_like(c.layouts["self"])}
    req["indices"] = [None if l is None else replicated_like(l) for l in c.layouts["indices"]]
    return Decision(req, Layout.replicated(len(c.out_shape)))


@register(aten.index_select.default, aten.gather.default)
def _index_select(c: OpCall) -> Decision:
    x = c.layouts["self"].without_partial()
    d = c.args["dim"] % x.ndim
    req = clear_dims(x, [d])
    idx = c.layouts["index"]
    if c.node.target is aten.gather.default:
        return Decision({"self": req, "index": req}, req)
    return Decision({"self": req, "index": replicated_like(idx)}, req)


@register(aten.index_copy.default)
def _index_copy(c: OpCall) -> Decision:
    x = c.layouts["self"].without_partial()
    d = c.args["dim"] % x.ndim
    req = clear_dims(x, [d])
    return Decision({"self": req, "index": replicated_like(c.layouts["index"]), "source": req}, req)


@register(aten.index_put.default, aten.index_put_.default)
def _index_put(c: OpCall) -> Decision:
    """`self[indices] = values`: indexed dims replicated, the rest keep self's split."""
    x = c.layouts["self"].without_partial()
    idx = c.args["indices"]
    indexed = [i for i, n in enumerate(idx) if n is not None]
    req = clear_dims(x, indexed)
    vshape = tuple(c.args["values"].meta["val"].shape)
    # values broadcast against self[indices]: the non-indexed dims keep their split
    kept = [d for d in range(x.ndim) if d not in indexed]
    off = len(vshape) - len(kept)
    vdims = [()] * len(vshape)
    for i, d in enumerate(kept):
        if 0 <= i + off < len(vshape) and vshape[i + off] != 1:
            vdims[i + off] = req.dims[d]
    req_idx = [None if l is None else replicated_like(l) for l in c.layouts["indices"]]
    return Decision({"self": req, "indices": req_idx, "values": Layout(tuple(vdims))}, req)


@register(aten.copy.default, aten.copy_.default)
def _copy(c: OpCall) -> Decision:
    """The result is laid out as `self`, `src` brought to it. In place (`copy_`), `self` keeps its layout:
    converting it would write into a converted copy and lose the write; a partial `self` (never seen: a
    buffer being written is not a pending sum) is refused by asking for it whole, as before."""
    if c.node.target is aten.copy_.default and c.layouts["self"].partial:
        whole = replicated_like(c.layouts["self"])
        return Decision({"self": whole, "src": replicated_like(c.layouts["src"])}, whole)
    x = c.layouts["self"].without_partial()
    src_shape = c.shape("src")
    dims = tuple(() if j is None else x.dims[j] for j in broadcast_map(src_shape, c.shape("self")))
    return Decision({"self": x, "src": Layout(dims)}, x)


@register(aten.tril.default, aten.triu.default)
def _tri(c: OpCall) -> Decision:
    x = c.layouts["self"].without_partial()
    req = clear_dims(x, [x.ndim - 2, x.ndim - 1])
    return Decision({"self": req}, req)


@register(aten.diff.default)
def _diff(c: OpCall) -> Decision:
    x = c.layouts["self"].without_partial()
    d = c.args["dim"] % x.ndim
    req = clear_dims(x, [d])
    out = {"self": req}
    for k in ("prepend", "append"):
        if k in c.layouts:
            out[k] = req
    return Decision(out, req)


@register(aten.repeat.default)
def _repeat(c: OpCall) -> Decision:
    x = c.layouts["self"].without_partial()
    reps = c.args["repeats"]
    off = len(reps) - x.ndim
    req = clear_dims(x, [i for i in range(x.ndim) if reps[i + off] != 1])
    dims = [()] * off + list(req.dims)
    return Decision({"self": req}, Layout(tuple(dims)))

