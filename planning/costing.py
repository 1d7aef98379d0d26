"""Reading the cost model's ingredients off a propagated graph: FLOPs, bytes read, collectives, memory.

The formulas (time from FLOPs and bytes on a `Hardware` profile) are strategies/cost.py; here each
layer's FLOPs come from the *local* shapes of its matmuls (2·M·N·K) and attention cores (4·B·H·Lq·Lk·D),
its weight bytes from the layout each matmul reads its weight in, its KV-cache bytes from the caches it
updates, and its collectives from `plan_conversions` — what insert_collectives inserts, siblings fused
as `plan_fusions` fuses them (the fused members after the first pay no fixed latency of their own).
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from ..ir.layout import Layout
from ..ir.mesh import Mesh
from ..ir.meta import IN_LAYOUTS, LAYERS, LAYOUT
from ..passes.attribute import OUTPUT, Attribution
from ..passes.fuse_collectives import plan_fusions
from ..passes.graph_utils import MATMULS, expert_weight, is_experts_ffn, is_grouped_mm, signature
from ..passes.insert_collectives import Conversion
from ..passes.storage import stored_tensors
from ..strategies.cost import Comm, LayerCost, Precision

aten = torch.ops.aten


def _local_numel(node: fx.Node, layout: Layout, mesh: Mesh) -> int:
    return math.prod(layout.local_shape(tuple(node.meta["val"].shape), mesh))


def op_flops(node: fx.Node, mesh: Mesh) -> float:
    """FLOPs one chip spends on `node` (matmuls and attention; pointwise work is neglected)."""
    if node.target in MATMULS:
        m = MATMULS[node.target]
        x = node.args[m.x]
        k_local = node.meta[IN_LAYOUTS][m.x_name].local_shape(tuple(x.meta["val"].shape), mesh)[-1]
        return 2.0 * _local_numel(node, node.meta[LAYOUT], mesh) * k_local
    if is_grouped_mm(node):  # the routed tokens (B·L·top-k rows) through their experts: top-k experts per token
        x = node.args[0]
        name = node.target._schema.arguments[0].name
        k_local = node.meta[IN_LAYOUTS][name].local_shape(tuple(x.meta["val"].shape), mesh)[-1]
        return 2.0 * _local_numel(node, node.meta[LAYOUT], mesh) * k_local
    if is_experts_ffn(node):
        return experts_flops(node, mesh)[1]
    if node.target is aten.scaled_dot_product_attention.default:
        q, k = node.args[0], node.args[1]
        B, H, Lq, D = node.meta[IN_LAYOUTS]["query"].local_shape(tuple(q.meta["val"].shape), mesh)
        Lk = k.meta["val"].shape[2]
        return 4.0 * B * H * Lq * Lk * D
    return 0.0


def touched_fraction(dims: dict[str, int]):
    """rows → the expected share of a mixture's experts that a step's routed rows (B·L tokens × top-k) touch,
    assuming uniform, independent routing: 1 − (1 − k/X)^(B·L), so X·(that) distinct experts (decode with
    few tokens reads fewer experts than prefill). The same share of every rank's experts (expert parallel)
    or of every expert's slices (expert-sliced) is read; imbalance between ranks is not modelled."""
    X, k = dims.get("X"), dims.get("k")
    if not X or not k:
        return lambda rows: 1.0
    return lambda rows: 1.0 - (1.0 - min(k, X) / X) ** max(1, rows // k)


def experts_flops(node: fx.Node, mesh: Mesh) -> tuple[float, float]:
    """(whole, per chip) FLOPs of a fused experts_ffn: 2·rows·3·E·F for the B·L·k routed rows (top-k experts
    per token); per chip F is its slice and the rows its experts' share, 1/n of them for n expert groups
    (uniform routing assumed: load imbalance is not modelled yet)."""
    rows, E = node.args[0].meta["val"].shape
    X, F = node.args[3].meta["val"].shape[:2]
    whole = 2.0 * rows * 3 * E * F
    wd = node.meta[IN_LAYOUTS]["w_down"]
    return whole, whole / (mesh.group_size(wd.dims[0]) * mesh.group_size(wd.dims[1]))


def layer_costs(gm: fx.GraphModule, mesh: Mesh, conversions: list[Conversion], precision: Precision) -> dict[str, LayerCost]:
    """Cost ingredients of every layer of a propagated graph (plus "output" for what no layer owns)."""
    layers = gm.meta[LAYERS]
    attribution = Attribution(layers)
    sig = signature(gm)
    costs: dict[str, LayerCost] = {l.name: LayerCost() for l in layers.layers}
    touched = {l.name: touched_fraction(l.dims) for l in layers.by_kind("experts")}
    costs[OUTPUT] = LayerCost()
    io_inputs = set(sig.inputs)

    def size(kind: str, n: fx.Node) -> int:
        return precision.nbytes(kind, n.meta["val"].element_size())
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        owner = attribution.layer_of(node)
        if owner is None:
            continue
        c = costs[owner]
        c.flops += op_flops(node, mesh)
        if node.target in MATMULS:
            m = MATMULS[node.target]
            w = node.args[m.w]
            if w.op == "placeholder" and w.name in sig.params:
                c.weight_bytes += _local_numel(w, node.meta[IN_LAYOUTS][m.w_name], mesh) * size("weights", w)
        if is_experts_ffn(node) or is_grouped_mm(node):
            # a step reads the experts its tokens touch: the local slice times the expected share touched
            rows = node.args[0].meta["val"].shape[0]
            share = touched.get(owner, lambda rows: 1.0)(rows)
            for i in ((1, 2, 3) if is_experts_ffn(node) else (1,)):
                if (found := expert_weight(node, sig.params, i)) is not None:
                    c.weight_bytes += share * _local_numel(found[0], found[0].meta[LAYOUT], mesh) * size("weights", found[0])
        if node.target is aten.index_copy.default and node.args[0].op == "placeholder" and node.args[0].name in io_inputs:
            cache = node.args[0]  # the step reads the whole cache it attends over
            c.kv_bytes += _local_numel(cache, cache.meta[LAYOUT], mesh) * size("kv", cache)
    riders = {id(c) for f in plan_fusions(gm, conversions) for c in f.members[1:]}
    for conv in conversions:
        owner = attribution.owner(conv.src, conv.first_consumer)
        is_weight = conv.src.op == "placeholder" and conv.src.name in sig.params
        itemsize = size("weights" if is_weight else "activations", conv.src)
        costs[owner].comm.extend(Comm(s, itemsize, is_weight, fused=i == 0 and id(conv) in riders)
                                 for i, s in enumerate(conv.steps))
    return costs


def memory_per_chip(proto: fx.GraphModule, mesh: Mesh, precision: Precision, n_blocks: int) -> dict[str, float]:
    """What one chip stores for the whole model in the planned precisions: the prototype with its
    block counted n_blocks times (weights at rest, KV caches, their sum, and one block's share)."""
    whole = {"weights": 0.0, "kv_cache": 0.0}
    block = {"weights": 0.0, "kv_cache": 0.0}
    for s in stored_tensors(proto, mesh):
        b = s.local_bytes(precision.nbytes("weights" if s.kind == "weights" else "kv", s.itemsize))
        whole[s.kind] += b
        block[s.kind] += b if s.in_block else 0.0
    out = {k: whole[k] + (n_blocks - 1) * block[k] for k in whole}
    out["total"] = out["weights"] + out["kv_cache"]
    out.update(block_weights=block["weights"], block_kv_cache=block["kv_cache"])
    return out


def param_count(proto: fx.GraphModule, n_blocks: int, precision: Precision | None = None) -> tuple[float, float]:
    """(parameters, weight bytes) of the whole model from its prototype: the block counted n_blocks times."""
    scale = n_blocks - 1 if len(proto.meta[LAYERS].blocks) == 1 else 0
    params = nbytes = 0.0
    for s in stored_tensors(proto):
        if s.key is None:
            continue
        times = 1 + (scale if s.in_block else 0)
        nbytes += times * s.numel * (precision or Precision()).nbytes("weights", s.itemsize)
        params += times * s.numel if s.is_parameter else 0
    return params, nbytes
