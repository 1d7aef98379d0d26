"""find_layers: the layer regions of a captured transformer, from dataflow and `nn_module_stack`.

A *projection* is a matmul (`linear`, `addmm`, `mm`) whose weight is a parameter. From there:
  attention   an `scaled_dot_product_attention` core; q/k/v are the projections found walking back from
              its inputs (through views, RoPE, repeat_kv), o the first projection walking forward;
              H, D from the core's query, K = k features / D (MHA when K = H, MQA when K = 1, else GQA)
  ffn         the other projections of a block: inputs (one, or two multiplied together: gated,
              SwiGLU) and the output projection that consumes them
  embedding   `aten.embedding` on a parameter (token and position tables)
  head        the projection outside every block whose result reaches the output (the LM head)
  block       the repeated module (`layers.3`, `h.3`, `blocks.3`) holding an attention and an ffn;
              its input is the residual stream entering it; *parallel* when attention and ffn read
              the same tensor (PaLM, GPT-J)
Writes `gm.meta["sw_layers"]`: a `Layers` record. Reads `val`, `nn_module_stack`, `sw_signature`.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..ir.meta import BLOCK, LAYERS, SIGNATURE
from .graph_utils import PROJECTIONS, module_path, module_paths, shape, signature
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
    core: str | None = None  # sdpa node (attention) or embedding node


@dataclass
class Block:
    index: int
    name: str
    input: str  # node carrying the residual stream into the block
    attention: Layer | None
    ffn: Layer | None
    parallel: bool


@dataclass
class Layers:
    layers: list[Layer]
    blocks: list[Block]
    dims: dict[str, int]  # model-level: B, L, E, V

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

    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is aten.scaled_dot_product_attention.default:
            layer = _attention(n, projs, claimed)
            if layer is not None:
                layers.append(layer)

    by_block: dict[str, list[Projection]] = {}
    for name, p in projs.items():
        if name not in claimed:
            by_block.setdefault(block_of(nodes[name]) or "", []).append(p)
    head = _head(gm, projs, claimed, by_block.get("", []))
    for block, ps in by_block.items():
        ps = [p for p in ps if head is None or p.node != head.projections["w"].node]
        if block and ps:
            ffn = _ffn(ps, nodes)
            if ffn is not None:
                layers.append(ffn)
    if head is not None:
        layers.append(head)

    blocks = _blocks(gm, layers, nodes)
    for l in layers:
        if l.kind in ("attention", "ffn"):
            l.block = next((b.index for b in blocks if l in (b.attention, b.ffn)), None)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    layers.sort(key=lambda l: order[l.core or next(iter(l.projections.values())).node])
    dims = _model_dims(layers, blocks, nodes)
    gm.meta[LAYERS] = Layers(layers, blocks, dims)
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


def _attention(sdpa: fx.Node, projs: dict[str, Projection], claimed: set[str]) -> Layer | None:
    q_arg, k_arg, v_arg = sdpa.args[:3]
    found = {}
    for role, arg in (("q", q_arg), ("k", k_arg), ("v", v_arg)):
        hits = [h for h in _walk(arg, projs, forward=False) if h not in claimed]
        if len(hits) != 1:
            return None
        found[role] = projs[hits[0]]
    outs = _walk(sdpa, projs, forward=True)
    if outs:
        found["o"] = projs[outs[0]]
    B, H, L, D = shape(q_arg)
    K = found["k"].out_features // D
    kind = "MHA" if K == H else ("MQA" if K == 1 else "GQA")
    for p in found.values():
        claimed.add(p.node)
    name = module_path(sdpa) or sdpa.name
    return Layer(name, "attention", None, projections=found, dims={"H": H, "K": K, "D": D, "E": found["q"].in_features},
                 info={"variant": kind, "fused_qkv": len({p.weight for p in found.values()}) < len(found)}, core=sdpa.name)


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


def _ffn(ps: list[Projection], nodes: dict[str, fx.Node]) -> Layer | None:
    names = {p.node for p in ps}
    block = block_of(nodes[ps[0].node])
    feeds = {p.node: {q.node for q in ps if q.node != p.node and _reaches(nodes[p.node], {q.node}, names, block)}
             for p in ps}
    outs = [p for p in ps if not feeds[p.node]]
    ins = [p for p in ps if feeds[p.node]]
    if len(outs) != 1 or not 1 <= len(ins) <= 2:
        return None
    out = outs[0]
    roles = {"w_out": out}
    if len(ins) == 2:
        gate, up = _gate_and_up(ins, nodes)
        roles.update(w_gate=gate, w_in=up)
    else:
        roles["w_in"] = ins[0]
    act = _activation(nodes[ins[0].node], nodes[out.node])
    name = _common_module([nodes[p.node] for p in ps])
    return Layer(name, "ffn", None, projections=roles,
                 dims={"E": out.out_features, "F": out.in_features},
                 info={"gated": len(ins) == 2, "activation": act})


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
        if l.kind in ("attention", "ffn"):
            anchor = nodes[l.core] if l.core else nodes[next(iter(l.projections.values())).node]
            b = block_of(anchor)
            if b:
                groups.setdefault(b, {})[l.kind] = l
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    entering = _entering(gm)
    blocks = []
    for i, (path, parts) in enumerate(sorted(groups.items(), key=lambda kv: order[_first_node(kv[1])])):
        attn, ffn = parts.get("attention"), parts.get("ffn")
        E = (attn or ffn).dims["E"]
        residual = _block_input(entering.get(path, []), path, E, order)
        parallel = bool(attn and ffn and _same_source(attn, ffn, nodes))
        blocks.append(Block(i, path, residual, attn, ffn, parallel))
    return blocks


def _first_node(parts: dict[str, Layer]) -> str:
    l = parts.get("attention") or parts["ffn"]
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
        raise ValueError(f"block {path}: found no [.., {E}] activation entering it")
    return max(cands, key=lambda m: order[m.name]).name


def _same_source(attn: Layer, ffn: Layer, nodes: dict[str, fx.Node]) -> bool:
    a = attn.projections["q"].input
    f = (ffn.projections.get("w_gate") or ffn.projections["w_in"]).input
    return _strip_views(nodes[a]) == _strip_views(nodes[f])


def _strip_views(n: fx.Node) -> str:
    while n.op == "call_function" and n.target in (aten.view.default, aten.reshape.default, aten.alias.default):
        n = n.args[0]
    return n.name


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

