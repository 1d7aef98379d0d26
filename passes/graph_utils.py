"""Small helpers the passes share: the matmul table, explicit attention read off the graph, fake values for new
nodes, module paths, signatures."""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

try:  # torch's own graph module whose Python code is generated on first use (what Inductor's passes build)
    from torch.fx._lazy_graph_module import _LazyGraphModule
except ImportError:  # pragma: no cover — a torch without it: every graph module compiles its code at once
    _LazyGraphModule = fx.GraphModule

from ..ir.meta import BOUND, LAYERS, SIGNATURE

aten = torch.ops.aten


@dataclass(frozen=True)
class MatmulArgs:
    """Where a matmul op keeps its operands: positions and schema names of the activation and weight."""

    x: int
    w: int
    bias: int | None
    x_name: str
    w_name: str
    rows_out: bool  # the weight is [out, in] (nn.Linear) rather than [in, out] (mm, addmm: GPT-2's Conv1D)
    projection: bool  # a 2-D weight: can be a layer's projection (bmm multiplies batches of activations)


MATMULS = {  # the one table of matmul ops: find_layers, canonicalize and the cost model read it
    aten.linear.default: MatmulArgs(0, 1, 2, "input", "weight", rows_out=True, projection=True),
    aten.addmm.default: MatmulArgs(1, 2, 0, "mat1", "mat2", rows_out=False, projection=True),
    aten.mm.default: MatmulArgs(0, 1, None, "self", "mat2", rows_out=False, projection=True),
    aten.bmm.default: MatmulArgs(0, 1, None, "self", "mat2", rows_out=False, projection=False),
}
PROJECTIONS = {op: m for op, m in MATMULS.items() if m.projection}
# matmuls canonicalize rewrites into the table's forms when one operand is a 2-D weight (`x @ W.T`, `x @ W`)
WEIGHT_MATMULS = {aten.matmul.default, aten.mm.default, aten.addmm.default}
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_GROUPED_MM = re.compile(r"(^|[:_])grouped_mm")  # torch._grouped_mm, transformers' grouped_mm_fallback


def is_grouped_mm(node: fx.Node) -> bool:
    """A mixture of experts' grouped matmul: `(x [T, K], w [X, K, N], offs [X]) → [T, N]`, rows of x sorted
    by expert and expert i's rows ending at offs[i] (torch._grouped_mm, transformers.grouped_mm_fallback)."""
    t = node.target
    return node.op == "call_function" and isinstance(t, torch._ops.OpOverload) and bool(
        _GROUPED_MM.search(t._schema.name)) and len(node.args) >= 2


_FUSED_EXPERTS = ("shardwise::experts_ffn", "shardwise::moe_ffn")


def is_experts_ffn(node: fx.Node) -> bool:
    """canonicalize's fused experts (runtime/experts.py): `experts_ffn` over the routed rows, or `moe_ffn`
    over the tokens (routing and combine inside). Both take the weights, activation and biases at the same
    places (1–3, 6, 7–9); `moe_ffn` takes the tokens, router picks and weights at 0, 4, 5."""
    t = node.target
    return node.op == "call_function" and isinstance(t, torch._ops.OpOverload) and t._schema.name in _FUSED_EXPERTS


def is_moe_ffn(node: fx.Node) -> bool:
    """canonicalize's `moe_ffn`: a mixture after its router, over the tokens (runs on any subset of them)."""
    t = node.target
    return node.op == "call_function" and isinstance(t, torch._ops.OpOverload) and t._schema.name == _FUSED_EXPERTS[1]


def routed_rows(node: fx.Node) -> int:
    """The routed rows of a fused experts op: experts_ffn's rows, or moe_ffn's tokens × top-k."""
    rows = node.args[0].meta["val"].shape[0]
    return rows * node.args[4].meta["val"].shape[-1] if is_moe_ffn(node) else rows


def expert_weight(node: fx.Node, params: dict[str, str], arg: int = 1) -> tuple[fx.Node, bool] | None:
    """The stacked [X, ·, ·] expert weight a grouped matmul (or experts_ffn) reads as argument `arg`, and
    whether through a transpose of its last two dims: (placeholder, transposed), else None."""
    w = node.args[arg]
    if not isinstance(w, fx.Node):
        return None
    transposed = False
    if w.op == "call_function" and w.target is aten.transpose.int and \
            sorted(d % 3 for d in w.args[1:3]) == [1, 2] and isinstance(w.args[0], fx.Node):
        w, transposed = w.args[0], True
    if w.op == "placeholder" and w.name in params and w.meta["val"].ndim == 3:
        return w, transposed
    return None


def transposed_2d(node) -> fx.Node | None:
    """The 2-D tensor that `node` transposes (`t`, `numpy_T`, `transpose(0, 1)`, `permute([1, 0])`), else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    src = node.args[0] if node.args else None
    if not isinstance(src, fx.Node) or not isinstance(src.meta.get("val"), torch.Tensor) or src.meta["val"].ndim != 2:
        return None
    if node.target in (aten.t.default, aten.numpy_T.default, aten.mT.default, aten.adjoint.default):
        return src
    if node.target is aten.transpose.int and {d % 2 for d in node.args[1:3]} == {0, 1}:
        return src
    if node.target is aten.permute.default and [d % 2 for d in node.args[1]] == [1, 0]:
        return src
    return None


# ------------------------------------------------------------------------------------ explicit attention
_BATCHED = {aten.matmul.default, aten.bmm.default}
_PASS = {aten.clone.default, aten.alias.default, aten.contiguous.default, aten.lift_fresh_copy.default}
_CASTS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.type_as.default}
_SOFTMAX = {aten.softmax.int, aten._softmax.default}
MASK_FILL = -1e4  # a masked_fill / where value at most this is a mask: exp() of it is 0 next to the scores


@dataclass
class ExplicitAttention:
    """softmax(scale · q·kᵀ + Σ coef · term) · v written out with matmuls (what `eager` attention computes).

    `affine`: the scores reach the softmax through views, dtype-preserving casts, scalings by numbers and
    additions of other tensors (masks, ALiBi) only, so `scaled_dot_product_attention(q, k, v, attn_mask=Σ
    coef · term, scale=scale)` computes the same; else (logit soft-capping: tanh) it stays as written.
    `terms`: (coefficient, tensor, shape of the scores where it is added); a masked_fill / where on the
    scores with a fill of at most MASK_FILL is a mask, the term `where(mask, fill, 0)` for masked_fill
    and `where(mask, 0, fill)` for where (`masks`: (coefficient, mask, fill, fills_where_true, shape)).
    """

    softmax: fx.Node
    scores: fx.Node  # q·kᵀ: matmul, bmm or baddbmm
    out: fx.Node  # probabilities · v: matmul or bmm
    q: fx.Node
    kt: fx.Node  # kᵀ as the scores read it
    v: fx.Node
    scale: float = 1.0
    terms: list[tuple[float, fx.Node, tuple[int, ...]]] = field(default_factory=list)
    masks: list[tuple[float, fx.Node, float, bool, tuple[int, ...]]] = field(default_factory=list)
    affine: bool = True


def _same_dtype(node: fx.Node) -> bool:
    src = node.args[0]
    return isinstance(src, fx.Node) and src.meta["val"].dtype == node.meta["val"].dtype


def _is_activation(n) -> bool:
    return isinstance(n, fx.Node) and n.op != "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)


def explicit_attention(softmax: fx.Node) -> ExplicitAttention | None:
    """The attention a softmax over the last dim is the core of, read off the graph (None: not attention).

    Walking back from the softmax's input must reach q·kᵀ (a batched matmul of two activations), walking
    forward from its output must reach probabilities · v (the same, with the probabilities first)."""
    if softmax.op != "call_function" or softmax.target not in _SOFTMAX:
        return None
    x = softmax.args[0]
    dim = softmax.args[1] if len(softmax.args) > 1 else softmax.kwargs.get("dim")
    if not isinstance(x, fx.Node) or dim is None or dim % x.meta["val"].ndim != x.meta["val"].ndim - 1:
        return None
    found = ExplicitAttention(softmax, None, None, None, None, None)  # type: ignore[arg-type]
    dtype = softmax.args[2] if softmax.target is aten.softmax.int and len(softmax.args) > 2 else None
    if dtype is not None and dtype != x.meta["val"].dtype:
        found.affine = False
    if _scores(x, 1.0, found, 0) is None:
        return None
    out, v = _probs_times_v(softmax, found)
    if out is None:
        return None
    found.out, found.v = out, v
    return found


def _scores(n: fx.Node, coef: float, found: ExplicitAttention, depth: int):
    """Walk back from the softmax input to q·kᵀ, collecting the scale and the added terms into `found`."""
    if depth > 24 or not _is_activation(n) or n.op != "call_function":
        return None
    t, a = n.target, n.args
    if t in _BATCHED and n.meta["val"].ndim >= 3 and _is_activation(a[0]) and _is_activation(a[1]):
        found.scores, found.q, found.kt, found.scale = n, a[0], a[1], coef
        return n
    if t is aten.baddbmm.default and _is_activation(a[1]) and _is_activation(a[2]):
        beta, alpha = n.kwargs.get("beta", 1), n.kwargs.get("alpha", 1)
        found.terms.append((coef * beta, a[0], tuple(n.meta["val"].shape)))
        found.scores, found.q, found.kt, found.scale = n, a[1], a[2], coef * alpha
        return n
    if t in VIEWS or t in _PASS:
        return _scores(a[0], coef, found, depth + 1)
    if t in _CASTS:
        found.affine &= _same_dtype(n)
        return _scores(a[0], coef, found, depth + 1)
    if t in (aten.mul.Tensor, aten.div.Tensor):
        x, c = a[0], a[1]
        if t is aten.mul.Tensor and isinstance(x, (int, float)):
            x, c = c, x
        if isinstance(c, (int, float)) and not isinstance(c, bool):
            return _scores(x, coef * c if t is aten.mul.Tensor else coef / c, found, depth + 1)
        found.affine = False  # scaled by a tensor: read the structure, do not rewrite it
        return _scores(x, coef, found, depth + 1) or _scores(c, coef, found, depth + 1)
    if t in (aten.add.Tensor, aten.sub.Tensor):
        alpha = n.kwargs.get("alpha", 1)
        sign = -1 if t is aten.sub.Tensor else 1
        for i, (path, other) in enumerate(((a[0], a[1]), (a[1], a[0]))):
            if i == 1 and sign < 0:
                break
            mark = (len(found.terms), len(found.masks))
            if _is_activation(path) and _scores(path, coef, found, depth + 1) is not None:
                k = coef * (sign * alpha if i == 0 else 1)
                if isinstance(other, fx.Node):
                    found.terms.append((k, other, tuple(n.meta["val"].shape)))
                elif other != 0:
                    found.affine = False
                return found.scores
            del found.terms[mark[0]:], found.masks[mark[1]:]
        return None
    if t is aten.cat.default and (a[1] if len(a) > 1 else n.kwargs.get("dim", 0)) % n.meta["val"].ndim == \
            n.meta["val"].ndim - 1 and len(a[0]) == 2:
        found.affine = False  # the scores with one more column (attention sinks): structure only
        return _scores(a[0][0], coef, found, depth + 1)
    if t in (aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self, aten.where.ScalarOther):
        fills = t in (aten.masked_fill.Scalar, aten.masked_fill.Tensor)  # masked_fill(x, m, v); where(m, x, v)
        x, mask, fill = (a[0], a[1], a[2]) if fills else (a[1], a[0], a[2])
        fill = _scalar(fill)
        if fill is None or fill > MASK_FILL:
            found.affine = False  # not a mask: keep the structure, do not rewrite
        else:
            found.masks.append((coef, mask, fill, fills, tuple(n.meta["val"].shape)))
        return _scores(x, coef, found, depth + 1)
    if len(a) >= 1 and _is_activation(a[0]) and tuple(a[0].meta["val"].shape) == tuple(n.meta["val"].shape):
        found.affine = False  # an elementwise function of the scores (tanh soft-capping): structure only
        return _scores(a[0], coef, found, depth + 1)
    return None


def _scalar(x) -> float | None:
    """A Python number, or the value of a 0-d `full` / `scalar_tensor` node (how a mask value is often
    written), else None."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    if isinstance(x, fx.Node) and x.target is aten.full.default and list(x.args[0]) == [] and \
            isinstance(x.args[1], (int, float)):
        return float(x.args[1])
    if isinstance(x, fx.Node) and x.target is aten.scalar_tensor.default and isinstance(x.args[0], (int, float)):
        return float(x.args[0])
    return None


def _probs_times_v(softmax: fx.Node, found: ExplicitAttention):
    """Walk forward from the softmax to probabilities · v: (that matmul, v), or (None, None)."""
    n = softmax
    for _ in range(8):
        if len(n.users) != 1:
            return None, None
        (u,) = n.users
        if u.target in _BATCHED and u.args[0] is n and _is_activation(u.args[1]):
            return u, u.args[1]
        if u.target in _CASTS:
            found.affine &= _same_dtype(u)
        elif u.target is aten.dropout.default:
            found.affine &= not (u.args[2] if len(u.args) > 2 else u.kwargs.get("train", False)) or u.args[1] == 0
        elif u.target is aten.slice.Tensor and u.args[1] % u.meta["val"].ndim == u.meta["val"].ndim - 1:
            found.affine = False  # the sink column dropped again
        elif u.target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self, aten.where.ScalarOther,
                          aten.where.ScalarSelf) and u.args.count(n) == 1:
            found.affine = False  # fully masked rows zeroed after the softmax (CPM-Ant): structure only
        elif u.target not in VIEWS and u.target not in _PASS:
            return None, None
        n = u
    return None, None



@dataclass
class Signature:
    """How the captured graph's placeholders map to weights and to the user's call."""

    params: dict[str, str]  # placeholder name → state key (parameters, buffers, lifted constants)
    inputs: list[str]  # user-input placeholder names, in flat call order
    in_spec: Any  # pytree spec of (args, kwargs)
    out_spec: Any  # pytree spec of the outputs
    model: str = ""
    buffers: set[str] = field(default_factory=set)  # state keys that are buffers or constants, not parameters
    derived: dict[str, tuple[str, int, int, int]] = field(default_factory=dict)  # key → (base key, dim, start, length)


def signature(gm: fx.GraphModule) -> Signature:
    return gm.meta[SIGNATURE]


def fake_mode_of(gm: fx.GraphModule):
    vals = [n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    return detect_fake_mode(vals)


def fake_run(node: fx.Node, mode) -> None:
    """Fill `node.meta["val"]` by running its target on its inputs' fake values."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta["val"])
    with mode:
        node.meta["val"] = node.target(*args, **kwargs)


def module_path(node: fx.Node) -> str:
    """Innermost module that produced the node ('' at top level)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def module_paths(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [v[0] for v in stack.values()]


# ------------------------------------------------------------------------------------ a fixed structure
# The planner applies hundreds of candidates to one prototype graph: it rewrites the layouts in its nodes'
# meta, never its nodes or their arguments. For that while (`fixed_structure`), what the passes and the
# cost model read off the structure alone (which nodes are weights, which ops can cost anything, ...) is
# worked out once (`structure_fact`) and forgotten at the end; outside it, every caller works it out anew.
_FIXED = "_shardwise_fixed_structure"


@contextmanager
def fixed_structure(gm: fx.GraphModule) -> Iterator[None]:
    """Promise that, inside, nothing adds, removes or rewires a node of `gm` (only meta changes)."""
    if _FIXED in gm.__dict__:  # nested: the outer one keeps the facts
        yield
        return
    gm.__dict__[_FIXED] = {}
    try:
        yield
    finally:
        del gm.__dict__[_FIXED]


def structure_fact(gm: fx.GraphModule, name: str, build: Callable[[fx.GraphModule], Any]) -> Any:
    """`build(gm)`: a fact of the graph's structure alone, made once inside `fixed_structure`."""
    facts = gm.__dict__.get(_FIXED)
    if facts is None:
        return build(gm)
    if name not in facts:
        facts[name] = build(gm)
    return facts[name]


def shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["val"].shape)


def copy_meta(dst: fx.Node, src: fx.Node, *keys: str) -> None:
    for k in keys or ("nn_module_stack", "stack_trace"):
        if k in src.meta:
            dst.meta[k] = src.meta[k]


def graph_module(root, graph: fx.Graph, class_name: str = "GraphModule") -> fx.GraphModule:
    """A GraphModule of `graph` whose forward's Python code is generated when first called or read, not
    at construction nor at each `recompile()`. Most graphs shardwise builds are never called as Python:
    planning copies, and rank programs the simulator interprets node by node. Generating their code was
    a third of the time of a simulated sharded run of a tiny model (each rank program is built by emit,
    then rewritten by the schedule). A program that is called compiles then, once."""
    return _LazyGraphModule(root, graph, class_name=class_name)


def copy_program(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of a captured graph that later passes can annotate and rewrite without touching `gm`:
    new nodes (same names) with their own meta dicts, the same weights and fake values (never mutated),
    and copies of the whole-graph records. Planning a copy gives what planning a fresh capture gives."""
    import copy

    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = g.graph_copy(gm.graph, env)
    old_out = next(n for n in gm.graph.nodes if n.op == "output")
    new_out = g.output(out)
    new_out.meta = dict(old_out.meta)
    for old, new in env.items():
        new.meta = {k: v for k, v in old.meta.items() if k != BOUND}  # the cache holds the old arguments
    copied = graph_module(gm, g)
    copied.meta = {k: dict(v) if isinstance(v, dict) else v for k, v in gm.meta.items()}
    sig = gm.meta[SIGNATURE]  # its specs are immutable; its tables are copied
    copied.meta[SIGNATURE] = replace(sig, params=dict(sig.params), inputs=list(sig.inputs), buffers=set(sig.buffers),
                                     derived=dict(sig.derived))
    if LAYERS in gm.meta:
        copied.meta[LAYERS] = copy.deepcopy(gm.meta[LAYERS])
    return copied
