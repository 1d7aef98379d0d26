"""find_layers: the layer regions of a captured transformer, from dataflow and `nn_module_stack`.

A *projection* is a matmul (`linear`, `addmm`, `mm`) whose weight is a parameter (canonicalize has
written every other spelling, `x @ W.T` included, as one of these). From there:
  attention   a core that computes softmax(q·kᵀ)·v: `scaled_dot_product_attention` (canonicalize writes
              explicit attention as one), or the softmax of an explicit attention it could not rewrite
              (soft-capped scores); q/k/v are the projections found walking back from its inputs
              (through views, RoPE, repeat_kv), o the first projection walking forward, gate a projection
              of the same input that gates the output before o (Qwen3-Next, Beam); H, D from the
              core's query, K = k features / D (MHA when K = H, MQA when K = 1, else GQA), or, when k
              shares a fused projection split per head with q or v (BLOOM, MLA), the KV heads the core reads
  ffn         the other projections of a block: inputs (one, or two multiplied together: gated,
              SwiGLU) and the output projection that consumes them
  embedding   `aten.embedding` on a parameter (token and position tables)
  head        the projection outside every block whose result reaches the output (the LM head)
  block       the repeated module (`layers.3`, `h.3`, `blocks.3`) holding an attention and an ffn;
              its input is the residual stream entering it; *parallel* when attention and ffn read
              the same tensor (PaLM, GPT-J)
  experts     a mixture of experts: a projection (the router) whose scores pick experts (`topk`, `max`,
              `argmax`, `sort`). Where its experts are grouped matmuls over stacked [X, ·, ·] weights
              (transformers' grouped_mm_fallback, torch._grouped_mm; canonicalize has unfused a fused
              gate_up) they form a layer of kind `experts` (roles w_gate, w_in, w_out like a feed-forward;
              X experts, E, F, top-k; canonicalize's fused `experts_ffn` also gpt-oss's interleaved
              w_gate_up and biases b_gate_up, b_out, and Llama 4's dense experts, k = X there since every
              expert runs every token); `Layers.experts` names the mixtures whose experts no such layer
              holds (looped experts, ...): they run replicated
A block whose projections feed no attention (a state-space scan, a convolution, linear attention) is
refused with a ShardwiseError: the model is not a decoder-only attention transformer; so is a model that
runs one layer's weights several times in a call (recurrent depth).
Writes `gm.meta["sw_layers"]`: a `Layers` record. Reads `val`, `nn_module_stack`, `sw_signature`.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..errors import ShardwiseError
from ..ir.meta import BLOCK, LAYERS, SIGNATURE
from .graph_utils import (
    PROJECTIONS,
    expert_weight,
    explicit_attention,
    is_experts_ffn,
    is_grouped_mm,
    is_moe_ffn,
    module_path,
    module_paths,
    routed_rows,
    shape,
    signature,
)
from .pipeline import graph_pass

aten = torch.ops.aten
_BLOCK = re.compile(r"^(.*?)(\d+)$")
_ACTS = {
    aten.silu.default: "silu",
    aten.gelu.default: "gelu",
    aten.relu.default: "relu",
    aten.tanh.default: "gelu_tanh",
    aten.sigmoid.default: "sigmoid",
}


@dataclass
class Projection:
    node: str  # the matmul node
    weight: str  # weight placeholder
    bias: str | None
    input: str  # the activation it reads
    out_features: int
    in_features: int
    rows_out: bool  # weight stored [out, in] (nn.Linear) rather than [in, out] (Conv1D, mm)


@dataclass
class Layer:
    name: str  # module path, e.g. "model.layers.0.mlp"
    kind: str  # embedding | attention | ffn | head
    block: int | None
    projections: dict[str, Projection] = field(default_factory=dict)  # role → projection
    params: dict[str, str] = field(default_factory=dict)  # role → placeholder (embedding tables)
    dims: dict[str, int] = field(default_factory=dict)
    info: dict[str, object] = field(default_factory=dict)
    core: str | None = None  # sdpa node or explicit attention's softmax (attention), or embedding node


@dataclass
class Block:
    index: int
    name: str
    input: str  # node carrying the residual stream into the block
    attention: Layer | None
    ffn: Layer | None
    parallel: bool
    experts: Layer | None = None  # a mixture of experts (with `ffn` its shared experts, if any)


@dataclass
class Layers:
    layers: list[Layer]
    blocks: list[Block]
    dims: dict[str, int]  # model-level: B, L, E, V
    experts: list[str] = field(default_factory=list)  # mixture-of-experts modules run replicated (no experts layer)

    def by_kind(self, kind: str) -> list[Layer]:
        return [l for l in self.layers if l.kind == kind]



@graph_pass(needs=(SIGNATURE,), makes=(LAYERS,))
def find_layers(gm: fx.GraphModule) -> fx.GraphModule:
    sig = signature(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    projs = {n.name: p for n in gm.graph.nodes if (p := _projection(n, sig.params))}
    claimed: set[str] = set()
    layers: list[Layer] = []

    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is aten.embedding.default and n.args[0].name in sig.params:
            V, E = shape(n.args[0])
            layers.append(Layer(module_path(n) or n.name, "embedding", None, params={"table": n.args[0].name},
                                dims={"V": V, "E": E}, core=n.name))

    before = set(claimed)
    experts = _experts(gm, projs, claimed)  # routers first: a mixture of attention heads (JetMoE) is no q/o
    routers = {block_of(nodes[n]): projs[n] for n in claimed - before}
    expert_layers = _expert_layers(gm, experts, routers, nodes)
    layers.extend(expert_layers)
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target is aten.scaled_dot_product_attention.default:
            q, k, v = n.args[:3]
            layer = _attention(n, q, k, v, n, projs, claimed)
        elif (att := explicit_attention(n)) is not None:
            layer = _attention(n, att.q, att.kt, att.v, att.out, projs, claimed)
        else:
            continue
        if layer is not None:
            layers.append(layer)
    _refuse_repeated_weights(gm, projs, layers)

    by_block: dict[str, list[Projection]] = {}
    for name, p in projs.items():
        if name not in claimed:
            by_block.setdefault(block_of(nodes[name]) or "", []).append(p)
    head = _head(gm, projs, claimed, by_block.get("", []))
    for block, ps in by_block.items():
        ps = [p for p in ps if head is None or p.node != head.projections["w"].node]
        if block and ps:
            ffn = _ffn(ps, nodes, claimed)
            if ffn is not None:
                layers.append(ffn)
    if head is not None:
        layers.append(head)

    _refuse_other_mixers(gm, projs, claimed, layers, experts, nodes, head)
    blocks = _blocks(gm, layers, nodes)
    for l in layers:
        if l.kind in ("attention", "ffn", "experts"):
            l.block = next((b.index for b in blocks if l in (b.attention, b.ffn, b.experts)), None)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    layers.sort(key=lambda l: order[l.core or next(iter(l.projections.values())).node])
    _unique_names(layers)
    dims = _model_dims(layers, blocks, nodes)
    planned = {l.name for l in expert_layers if l.block is not None}
    gm.meta[LAYERS] = Layers(layers, blocks, dims, sorted(experts - planned))
    return gm


# ------------------------------------------------------------------------------------ pieces
def _projection(n: fx.Node, params: dict[str, str]) -> Projection | None:
    if n.op != "call_function" or n.target not in PROJECTIONS:
        return None
    m = PROJECTIONS[n.target]
    w = n.args[m.w]
    if not (isinstance(w, fx.Node) and w.name in params and w.meta["val"].ndim == 2):
        return None
    b = n.args[m.bias] if m.bias is not None and m.bias < len(n.args) else None
    bias = b.name if isinstance(b, fx.Node) else None
    out_f, in_f = shape(w) if m.rows_out else tuple(reversed(shape(w)))
    return Projection(n.name, w.name, bias, n.args[m.x].name, out_f, in_f, m.rows_out)


def _walk(start: fx.Node, projs: dict[str, Projection], forward: bool, limit: int = 64) -> list[str]:
    """Projections reachable from `start` through non-projection ops (not past another attention)."""
    seen, found = {start.name}, []
    q = deque([start])
    while q and len(seen) < limit:
        n = q.popleft()
        nxt = list(n.users) if forward else list(n.all_input_nodes)
        for m in nxt:
            if m.name in seen or m.op == "placeholder":
                continue
            seen.add(m.name)
            if m.name in projs:
                found.append(m.name)
                continue
            if m.op == "call_function" and m.target is not aten.scaled_dot_product_attention.default:
                q.append(m)
        if forward and found:
            break
    return found


def _attention(core: fx.Node, q_arg: fx.Node, k_arg: fx.Node, v_arg: fx.Node, out: fx.Node,
               projs: dict[str, Projection], claimed: set[str]) -> Layer | None:
    """The attention layer around `core` (its q, k and v inputs as the core reads them; `out` the
    tensor it produces): q/k/v projections walking back, o walking forward, heads from the shapes."""
    found = {}
    for role, arg in (("q", q_arg), ("k", k_arg), ("v", v_arg)):
        hits = [h for h in _walk(arg, projs, forward=False) if h not in claimed]
        if len(hits) != 1:
            return None
        found[role] = projs[hits[0]]
    outs = _walk(out, projs, forward=True)
    if outs:
        found["o"] = projs[outs[0]]
        gate = _output_gate(core, found, projs, claimed)
        if gate is not None:
            found["gate"] = gate
    qs, ks = shape(q_arg), shape(k_arg)
    D = qs[-1]
    H = qs[1] if len(qs) == 4 else found["q"].out_features // D
    if found["k"].node in (found["q"].node, found["v"].node):  # fused and split per head: the KV heads read
        K = ks[1] if len(ks) == 4 else H
    else:
        K = found["k"].out_features // D
    kind = "MHA" if K == H else ("MQA" if K == 1 else "GQA")
    for p in found.values():
        claimed.add(p.node)
    latent = _latents(core, found, projs, claimed)
    claimed.update(latent)
    name = module_path(core) or core.name
    E = found["o"].out_features if "o" in found else found["q"].in_features  # q may read a low-rank code (MLA)
    info = {"variant": kind, "fused_qkv": len({p.weight for p in found.values()}) < len(found)}
    if latent:
        info["latent"] = latent
    return Layer(name, "attention", None, projections=found, dims={"H": H, "K": K, "D": D, "E": E}, info=info,
                 core=core.name)


def _latents(core: fx.Node, found: dict[str, Projection], projs: dict[str, Projection],
             claimed: set[str]) -> dict[str, Projection]:
    """Multi-head latent attention's low-rank projections (DeepSeek's q_a_proj and kv_a_proj_with_mqa, the
    rotary key piece included): unclaimed projections of the block that read the hidden state (in
    features = the attention's E, where it has an output projection to say it) and whose output reaches
    q, k or v's projection, or the core itself, without passing another projection. Not split per head:
    their outputs are codes (normalized over the whole code) shared by every head. (Gemma 3n's AltUp
    `prediction_coefs`, 4 → 16, also reaches q: mixing weights of its 4 streams, not a code of the hidden
    state.)"""
    nodes = {n.name: n for n in core.graph.nodes}
    block = block_of(core)
    targets = {core.name} | {p.node for r, p in found.items() if r in ("q", "k", "v")}
    hidden = found["o"].out_features if "o" in found else None
    out = {}
    for name, p in projs.items():
        if name in claimed or block_of(nodes[name]) != block or block is None:
            continue
        if hidden is not None and p.in_features != hidden:
            continue
        if _feeds(nodes[name], targets, set(projs), block):
            out[name] = p
    return out


_VIEWS = {aten.slice.Tensor, aten.view.default, aten.select.int, aten.narrow.default}


def _feeds(src: fx.Node, dst_names: set[str], stop: set[str], within: str) -> bool:
    """`_reaches`, following writes too: a value copied into a slice of a buffer (`buf[..., a:b] = x`,
    how DeepSeek assembles its keys) reaches whatever reads the buffer."""
    seen, q = set(), deque([src])
    while q:
        n = q.popleft()
        nxt = list(n.users)
        if n.op == "call_function" and n.target is aten.copy_.default:
            base = n.args[0]
            while isinstance(base, fx.Node) and base.op == "call_function" and base.target in _VIEWS:
                base = base.args[0]
            nxt += list(base.users)
        for u in nxt:
            if u.name in dst_names:
                return True
            if u.name in seen or u.name in stop or block_of(u) != within:
                continue
            seen.add(u.name)
            q.append(u)
    return False


def _output_gate(core: fx.Node, found: dict[str, Projection], projs: dict[str, Projection],
                 claimed: set[str]) -> Projection | None:
    """A projection of the attention's input that gates its output (o_proj(attn · σ(gate(x))), Qwen3-Next,
    Beam): it reads what q reads and reaches o's input without passing another projection or the core."""
    nodes = {n.name: n for n in core.graph.nodes}
    o, q = found["o"], found["q"]
    block = block_of(core)
    taken = claimed | {p.node for p in found.values()}
    for name, p in projs.items():
        if name in taken or block_of(nodes[name]) != block or p.out_features != q.out_features:
            continue
        if _strip_views(nodes[p.input]) == _strip_views(nodes[q.input]) and \
                _reaches(nodes[name], {o.input}, set(projs) | {core.name}, block):
            return p
    return None


_SELECT = {aten.topk.default, aten.max.dim, aten.argmax.default, aten.sort.default}  # picking experts per token
_ROUTING = {aten.softmax.int, aten._softmax.default, aten.sigmoid.default, aten.to.dtype, aten._to_copy.default,
            aten.view.default, aten.reshape.default, aten.add.Tensor, aten.mul.Tensor, aten.div.Tensor}


def _experts(gm: fx.GraphModule, projs: dict[str, Projection], claimed: set[str]) -> set[str]:
    """Mixture-of-experts modules: a projection (the router) in a block whose scores reach a selection
    (`topk`, `max`, `argmax`, `sort`) through softmax, sigmoid, casts and scalings. The router is
    claimed; the block's child holding it (its mlp, or its attention for a mixture of attention heads)
    is returned by path."""
    found = set()
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in _SELECT:
            continue
        seen, todo = set(), [n.args[0]]
        while todo:
            m = todo.pop()
            if not isinstance(m, fx.Node) or m.name in seen or len(seen) > 16:
                continue
            seen.add(m.name)
            if m.name in projs and m.name not in claimed and block_of(m):
                claimed.add(m.name)
                path, block = module_path(m), block_of(m)
                if block and path.startswith(block + "."):  # the block's child that holds the router (its mlp)
                    path = block + "." + path[len(block) + 1:].split(".")[0]
                found.add(path or m.name)
            elif m.op == "call_function" and m.target in _ROUTING:
                todo.extend(m.all_input_nodes)
    return found


def _expert_layers(gm: fx.GraphModule, experts: set[str], routers: dict[str | None, Projection],
                   nodes: dict[str, fx.Node]) -> list[Layer]:
    """The experts of each mixture found by its router: the block's grouped matmuls over stacked [X, ·, ·]
    weights. The output projection (w_out) is the one whose input comes from the others; of two inputs
    the gate is the one an activation reads (SwiGLU). Anything else (a third input, experts whose
    weights differ in X, a grouped matmul with a bias) is left unplanned: the mixture runs replicated."""
    params = signature(gm).params
    by_block: dict[str, list[fx.Node]] = {}
    out = []
    for n in gm.graph.nodes:
        if is_grouped_mm(n) and (b := block_of(n)) in routers and expert_weight(n, params) is not None:
            by_block.setdefault(b, []).append(n)
        if is_experts_ffn(n) and (b := block_of(n)) in routers and (layer := _fused_experts(n, b, experts, routers,
                                                                                            nodes, params)):
            out.append(layer)
    for block, mms in by_block.items():
        path = next((e for e in experts if e == block or e.startswith(block + ".")), None)
        if path is None or len(mms) not in (2, 3) or any(len(m.args) > 3 or m.kwargs.get("bias") is not None
                                                          for m in mms):
            continue
        names = {m.name for m in mms}
        outs = [m for m in mms if not _reaches(m, names, set(), block)]
        ins = [m for m in mms if m not in outs]
        if len(outs) != 1 or not all(_reaches(m, {outs[0].name}, set(), block) for m in ins):
            continue
        out_mm = outs[0]
        weights = {m.name: expert_weight(m, params) for m in mms}
        X = {shape(w)[0] for w, _ in weights.values()}
        D = shape(out_mm)[-1]
        F = shape(out_mm.args[0])[-1]
        if len(X) != 1 or any(shape(m)[-1] != F or shape(m.args[0])[-1] != D for m in ins):
            continue
        roles = {"w_out": out_mm}
        if len(ins) == 2:
            gate = next((m for m in ins if any(u.target in _ACTS for u in m.users)), ins[0])
            roles.update(w_gate=gate, w_in=next(m for m in ins if m is not gate))
        else:
            roles["w_in"] = ins[0]
        # the dim of each stored weight that holds F: read transposed ([X, N, K]) or not ([X, K, N])
        f_dims = {}
        for role, m in roles.items():
            w, transposed = weights[m.name]
            f_dims[w.name] = (1 if transposed else 2) if role != "w_out" else (2 if transposed else 1)
        router = routers[block]
        tokens = shape(nodes[router.node])[0] if len(shape(nodes[router.node])) == 2 else None
        info = {"gated": len(ins) == 2, "activation": _activation(ins[0], out_mm), "router": router.weight,
                "f_dims": f_dims, "grouped_mm": {r: m.name for r, m in roles.items()}}
        dims = {"X": X.pop(), "E": D, "F": F}
        if tokens:
            dims["k"] = shape(out_mm)[0] // tokens
        out.append(Layer(path, "experts", None, params={r: weights[m.name][0].name for r, m in roles.items()},
                         dims=dims, info=info, core=out_mm.name))
    return out


def _fused_experts(n: fx.Node, block: str, experts: set[str], routers: dict[str | None, Projection],
                   nodes: dict[str, fx.Node], params: dict[str, str]) -> Layer | None:
    """The experts layer of canonicalize's fused `experts_ffn(x, Wg, Wu, Wd, starts, ends, act, bg?, bu?, bd?)`.

    Roles: w_gate, w_in, w_out (stacked [X, ·, ·]); gpt-oss's gate and up interleaved in one weight
    (Wu None) are one role, w_gate_up, of [X, E, 2F]; biases b_gate, b_in (b_gate_up), b_out ([X, F]
    or [X, 2F], [X, E]). `f_dims` names the dim of each that holds F (of the down bias: E, split with F)."""
    path = next((e for e in experts if e == block or e.startswith(block + ".")), None)
    interleaved = n.args[2] is None
    slots = (("w_gate_up", 1), ("w_out", 3)) if interleaved else (("w_gate", 1), ("w_in", 2), ("w_out", 3))
    found = {role: expert_weight(n, params, i) for role, i in slots}
    if path is None or None in found.values():
        return None
    f_dims = {w.name: ((1 if t else 2) if role != "w_out" else (2 if t else 1)) for role, (w, t) in found.items()}
    roles = {r: w.name for r, (w, _) in found.items()}
    bias_roles = (("b_gate_up", 7), ("b_out", 9)) if interleaved else (("b_gate", 7), ("b_in", 8), ("b_out", 9))
    for role, i in bias_roles:
        b = n.args[i] if len(n.args) > i else None
        if b is None:
            continue
        if not (isinstance(b, fx.Node) and b.name in params and b.meta["val"].ndim == 2):
            return None
        roles[role] = b.name
        f_dims[b.name] = 1
    router = routers[block]
    tokens = shape(nodes[router.node])[0] if len(shape(nodes[router.node])) == 2 else None
    X, F = shape(n.args[3])[0], shape(n.args[3])[1]
    dims = {"X": X, "E": shape(n)[-1], "F": F}
    if tokens:
        dims["k"] = routed_rows(n) // tokens
    info = {"gated": True, "activation": n.args[6].partition(":")[0], "router": router.weight, "f_dims": f_dims,
            "fused": True, "interleaved": interleaved, "biases": [r for r in roles if r.startswith("b_")],
            "dispatch": is_moe_ffn(n)}
    return Layer(path, "experts", None, params=roles, dims=dims, info=info, core=n.name)


def _refuse_repeated_weights(gm: fx.GraphModule, projs: dict[str, Projection], layers: list[Layer]) -> None:
    """Refuse a model that runs the same layer several times in one call (recurrent depth, a block shared
    across positions in the stack): one weight read by the projections of several attention layers."""
    readers: dict[str, set[str]] = {}
    for l in layers:
        for p in l.projections.values():
            readers.setdefault(p.weight, set()).add(l.core or l.name)
    again = {w: r for w, r in readers.items() if len(r) > 1}
    if again:
        w, r = next(iter(again.items()))
        key = signature(gm).params[w]
        raise ShardwiseError(
            f"{signature(gm).model} runs its layers more than once per call: weight {key} is read by {len(r)} attention "
            f"layers (recurrent depth, or one block shared by several positions of the stack). shardwise plans "
            f"every layer once, so it does not shard such a model; unroll it into distinct layers, or shard a "
            f"model whose every layer has weights of its own")


def _refuse_other_mixers(gm: fx.GraphModule, projs: dict[str, Projection], claimed: set[str], layers: list[Layer],
                         experts: set[str], nodes: dict[str, fx.Node], head: Layer | None) -> None:
    """Refuse a block whose projections feed no attention (and that no feed-forward or router explains):
    it mixes tokens another way (a state-space scan, a convolution, linear attention, a recurrence)."""
    attended = {block_of(nodes[l.core]) for l in layers if l.kind == "attention"}
    used = set(claimed) | {p.node for l in layers for p in l.projections.values()}
    if head is not None:
        used.add(head.projections["w"].node)
    loose: dict[str, list[Projection]] = {}
    for name, p in projs.items():
        block = block_of(nodes[name])
        if block and name not in used and block not in attended and not any(
                e == block or e.startswith(block + ".") for e in experts):
            loose.setdefault(block, []).append(p)
    loose = {b: ps for b, ps in loose.items() if len(ps) > 1}  # a list of lone projections (AltUp's) is no block
    if not loose:
        return
    block, ps = next(iter(loose.items()))
    keys = list(dict.fromkeys(signature(gm).params[p.weight].split("[")[0] for p in ps))  # derived: their base
    weights = ", ".join(keys[:4]) + (" …" if len(keys) > 4 else "")
    raise ShardwiseError(
        f"{signature(gm).model} is not a decoder-only attention transformer: block {block} has {len(ps)} projections "
        f"({weights}) that feed no attention: no scaled_dot_product_attention and no softmax(q·kᵀ)·v reads "
        f"them, and they are not a feed-forward "
        f"(in → activation → out). The block mixes tokens another way (a state-space scan, a convolution, linear "
        f"attention or a recurrence; {len(loose)} such block{'s' if len(loose) > 1 else ''}), which shardwise does not "
        f"shard; hybrids of attention and such blocks are not supported either")


def block_of(n: fx.Node) -> str | None:
    """The repeated module holding `n`: the outermost module path ending in an index (layers.3)."""
    if BLOCK not in n.meta:
        n.meta[BLOCK] = next(
            (p for p in module_paths(n) if p.rsplit(".", 1)[-1].isdigit() and _BLOCK.match(p)), None
        )
    return n.meta[BLOCK]


def _reaches(src: fx.Node, dst_names: set[str], stop: set[str], within: str | None = None) -> bool:
    """Whether a node in `dst_names` is downstream of `src` (not through `stop`, nor out of block `within`)."""
    seen, q = set(), deque([src])
    while q:
        n = q.popleft()
        for u in n.users:
            if u.name in dst_names:
                return True
            if u.name in seen or u.name in stop or (within is not None and block_of(u) != within):
                continue
            seen.add(u.name)
            q.append(u)
    return False


def _ffn(ps: list[Projection], nodes: dict[str, fx.Node], claimed: set[str]) -> Layer | None:
    """The feed-forward among a block's unclaimed projections: an output projection fed directly by one
    or two input projections (two: gated, SwiGLU) of its output width, with nothing between them that
    mixes positions, and whose output does not feed a router (a router's own MLP is no feed-forward).
    Where a block has more than one such pair (Gemma 3n and 4 gate a per-layer input after the MLP, E → 256
    → E), the largest is the feed-forward; the others run replicated, reported as such. Other projections
    of the block (an attention's extra gates, a router's parts) are left out of it."""
    names = {p.node for p in ps}
    block = block_of(nodes[ps[0].node])
    routers = {n for n in claimed if n in nodes and block_of(nodes[n]) == block and n not in names}
    ps = [p for p in ps if not _reaches(nodes[p.node], routers, set(), block)] if routers else ps
    if not ps:
        return None
    names = {p.node for p in ps}
    feeds = {p.node: {q.node for q in ps if q.node != p.node and _reaches(nodes[p.node], {q.node}, names, block)}
             for p in ps}
    candidates = []
    for out in ps:
        ins = [p for p in ps if out.node in feeds[p.node] and p.in_features == out.out_features]
        if 1 <= len(ins) <= 2 and len(ins) == sum(out.node in f for f in feeds.values()):
            candidates.append((out, ins))

    def size(candidate) -> int:  # weight elements of (out, ins)
        return sum(p.in_features * p.out_features for p in [candidate[0], *candidate[1]])

    candidates.sort(key=size, reverse=True)
    if not candidates or (len(candidates) > 1 and size(candidates[0]) == size(candidates[1])):  # none, or a tie
        return None
    out, ins = candidates[0]
    if _mixes_tokens([nodes[p.node] for p in ins], nodes[out.node]):
        return None
    roles = {"w_out": out}
    if len(ins) == 2:
        gate, up = _gate_and_up(ins, nodes)
        roles.update(w_gate=gate, w_in=up)
    else:
        roles["w_in"] = ins[0]
    act = _activation(nodes[ins[0].node], nodes[out.node])
    name = _common_module([nodes[p.node] for p in [*ins, out]])
    return Layer(name, "ffn", None, projections=roles,
                 dims={"E": out.out_features, "F": out.in_features},
                 info={"gated": len(ins) == 2, "activation": act})


_TOKEN_MIXERS = {  # ops that combine positions: between a feed-forward's projections, a sequence mixer
    aten.cumsum.default, aten.cumprod.default, aten.logcumsumexp.default, aten.convolution.default,
    aten.conv1d.default, aten.bmm.default, aten.matmul.default, aten.baddbmm.default, aten.roll.default,
    aten.flip.default, aten.constant_pad_nd.default, aten.scaled_dot_product_attention.default,
}


def _mixes_tokens(ins: list[fx.Node], out: fx.Node, limit: int = 256) -> bool:
    """Whether an op between the input projections and the output projection (downstream of the first,
    upstream of the second) combines positions: a running sum, a convolution, a matmul over the
    sequence. Then they are no feed-forward, but a sequence mixer."""
    after: set[str] = set()
    q = deque(ins)
    while q and len(after) < limit:
        for u in q.popleft().users:
            if u is not out and u.name not in after:
                after.add(u.name)
                q.append(u)
    q, seen = deque([a for a in out.all_input_nodes if a.name in after]), set()
    while q:
        n = q.popleft()
        if n.name in seen:
            continue
        seen.add(n.name)
        if n.op == "call_function" and (n.target in _TOKEN_MIXERS or isinstance(n.target, torch._ops.HigherOrderOperator)):
            return True
        q.extend(m for m in n.all_input_nodes if m.name in after)
    return False


def _gate_and_up(ins: list[Projection], nodes: dict[str, fx.Node]) -> tuple[Projection, Projection]:
    """SwiGLU: act(gate(x)) * up(x): the gate is the one an activation reads directly."""
    for i, p in enumerate(ins):
        if any(u.target in _ACTS for u in nodes[p.node].users):
            return p, ins[1 - i]
    return ins[0], ins[1]


def _activation(src: fx.Node, stop: fx.Node) -> str:
    q, seen = deque([src]), set()
    while q:
        n = q.popleft()
        for u in n.users:
            if u.target in _ACTS:
                return _ACTS[u.target]
            if u is not stop and u.name not in seen:
                seen.add(u.name)
                q.append(u)
    return "identity"


def _common_module(ns: list[fx.Node]) -> str:
    paths = [module_path(n).split(".") for n in ns]
    common = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common) or ns[0].name


def _head(gm: fx.GraphModule, projs, claimed, loose: list[Projection]) -> Layer | None:
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    outputs = {n.name for n in out_node.all_input_nodes}
    for p in reversed(loose):
        n = next(m for m in gm.graph.nodes if m.name == p.node)
        if n.name in outputs or _reaches(n, outputs, set(projs)):
            claimed.add(p.node)
            return Layer(module_path(n) or n.name, "head", None, projections={"w": p},
                         dims={"V": p.out_features, "E": p.in_features})
    return None


def _blocks(gm: fx.GraphModule, layers: list[Layer], nodes: dict[str, fx.Node]) -> list[Block]:
    groups: dict[str, dict[str, Layer]] = {}
    for l in layers:
        if l.kind in ("attention", "ffn", "experts"):
            anchor = nodes[l.core] if l.core else nodes[next(iter(l.projections.values())).node]
            b = block_of(anchor)
            if b:
                groups.setdefault(b, {})[l.kind] = l
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    entering = _entering(gm)
    blocks = []
    for i, (path, parts) in enumerate(sorted(groups.items(), key=lambda kv: order[_first_node(kv[1])])):
        attn, ffn, moe = parts.get("attention"), parts.get("ffn"), parts.get("experts")
        E = (attn or ffn or moe).dims["E"]
        residual = _block_input(entering.get(path, []), path, E, order)
        parallel = bool(attn and ffn and _same_source(attn, ffn, nodes))
        blocks.append(Block(i, path, residual, attn, ffn, parallel, moe))
    return blocks


def _first_node(parts: dict[str, Layer]) -> str:
    l = parts.get("attention") or parts.get("ffn") or parts["experts"]
    return l.core or next(iter(l.projections.values())).node


def _entering(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """For every block, the activations produced outside it that its ops read (one pass over the graph)."""
    params = signature(gm).params
    block = {n: block_of(n) if n.op == "call_function" else None for n in gm.graph.nodes}
    out: dict[str, list[fx.Node]] = {}
    for n, b in block.items():
        if b is None:
            continue
        for m in n.all_input_nodes:
            if block.get(m) != b and m.name not in params and isinstance(m.meta.get("val"), torch.Tensor):
                out.setdefault(b, []).append(m)
    return out


def _block_input(cands: list[fx.Node], path: str, E: int, order: dict[str, int]) -> str:
    """The residual stream entering block `path`: the latest [.., E] float activation from outside it."""
    cands = [m for m in cands if m.meta["val"].ndim >= 2 and m.meta["val"].shape[-1] == E
             and m.meta["val"].is_floating_point()]
    if not cands:
        raise ShardwiseError(
            f"block {path}: found no activation of width {E} (its layers' d_model) entering it, so its residual "
            f"stream is unknown: the layers found in it do not read the stream that enters the block (the "
            f"block is not a pre- or post-norm residual block of attention and feed-forward); shardwise "
            f"cannot shard this model's blocks")
    return max(cands, key=lambda m: order[m.name]).name


def _same_source(attn: Layer, ffn: Layer, nodes: dict[str, fx.Node]) -> bool:
    a = attn.projections["q"].input
    f = (ffn.projections.get("w_gate") or ffn.projections["w_in"]).input
    return _strip_views(nodes[a]) == _strip_views(nodes[f])


def _strip_views(n: fx.Node) -> str:
    while n.op == "call_function" and n.target in (aten.view.default, aten.reshape.default, aten.alias.default):
        n = n.args[0]
    return n.name


def _unique_names(layers: list[Layer]) -> None:
    """Layers are named by module path; where two share one (attention and feed-forward written inline in
    one block module), the later is told apart by its kind (`blocks.0.ffn`): plans key layouts by name."""
    seen: set[str] = set()
    for l in layers:
        if l.name in seen:
            l.name = f"{l.name}.{l.kind}"
        seen.add(l.name)


def _model_dims(layers: list[Layer], blocks: list[Block], nodes: dict[str, fx.Node]) -> dict[str, int]:
    dims: dict[str, int] = {}
    if blocks:
        s = shape(nodes[blocks[0].input])
        dims.update(B=s[0], L=s[1] if len(s) == 3 else 1, E=s[-1])
    for l in layers:
        if l.kind in ("embedding", "head") and "V" in l.dims:
            dims.setdefault("V", l.dims["V"])
    dims["layers"] = len(blocks)
    return dims


def describe(layers: Layers) -> str:
    out = []
    for l in layers.layers:
        extra = ", ".join(f"{k}={v}" for k, v in {**l.dims, **l.info}.items())
        out.append(f"{l.kind:9} {l.name}  ({extra})")
    return "\n".join(out)

