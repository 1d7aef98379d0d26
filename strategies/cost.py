"""The analytic cost model: compute, memory traffic and communication per layer and per chip.

For one layer under one layout, on a `Hardware` profile (PAPER.md, DESIGN.md):
  compute  = FLOPs per chip / (peak · flops_efficiency)
             FLOPs from the *local* shapes of the layer's matmuls (2·M·N·K) and attention cores
             (4·B·H·Lq·Lk·D), so replicated work (heads that do not divide) is charged where it runs
  memory   = (weight bytes read + KV-cache bytes read) per chip / (HBM bandwidth · hbm_efficiency)
             weights as used by the matmul (a weight-gathered layout reads its gathered copy)
  comm     = Σ over the layer's collectives of
             (collective_latency + hop_latency · (g − 1) + wire bytes / bandwidth of its axes)
             a ring over g chips takes g − 1 steps (the α-β model of PAPER.md's (g−1)/g accounting);
             the collectives are exactly those insert_collectives puts on the graph
             (`plan_conversions`): one source of truth
  time     = max(compute, memory, weight comm) + activation comm      (hw.weight_prefetch)
             weights do not depend on the data, so a weight-gathered layout's weight all-gathers can be
             issued ahead of use and overlap compute (the paper's system does; the TPU v4 fit assumes
             it); activation collectives sit on the critical path. Without prefetch (cpu-local: gloo
             shares the cores, and emitted programs gather just before use) all comm adds up.
             With `overlap`, all communication overlaps: max(compute, memory, comm).
Byte counts use the planned precisions (bf16 or int8 weights, bf16 activations and KV cache), not the
dtype the model was captured in. Memory per chip (weights at rest + KV cache) must fit in HBM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..ir.collective import Collective
from ..ir.hardware import Hardware
from ..ir.layout import Layout
from ..ir.mesh import Mesh
from ..passes.attribute import OUTPUT, Attribution
from ..passes.find_layers import LAYERS
from ..passes.graph_utils import signature
from ..passes.insert_collectives import Conversion
from .rules import IN_LAYOUTS, LAYOUT

aten = torch.ops.aten
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "int8": 1}
_MATMULS = {aten.linear.default: ("input", "weight"), aten.addmm.default: ("mat1", "mat2"),
            aten.mm.default: ("self", "mat2"), aten.bmm.default: ("self", "mat2")}


@dataclass(frozen=True)
class Precision:
    """Bytes per element of weights, activations and KV cache; None: as the model was captured."""

    weights: str | None = None
    activations: str | None = None
    kv: str | None = None

    def __post_init__(self) -> None:
        for k in (self.weights, self.activations, self.kv):
            if k is not None and k not in DTYPE_BYTES:
                raise ValueError(f"unknown dtype {k!r}: use one of {', '.join(DTYPE_BYTES)}")

    def nbytes(self, kind: str, captured: int) -> int:
        """Bytes per element of `kind`, or `captured` (the tensor's own element size) when unset."""
        name = getattr(self, kind)
        return captured if name is None else DTYPE_BYTES[name]


@dataclass(frozen=True)
class Comm:
    step: Collective
    itemsize: int  # bytes per element in the planned precision
    weight: bool = False  # moves a weight (prefetchable), not an activation


@dataclass
class LayerCost:
    flops: float = 0.0  # per chip
    weight_bytes: float = 0.0  # HBM bytes of weights read per chip
    kv_bytes: float = 0.0  # HBM bytes of KV cache read per chip
    comm: list[Comm] = field(default_factory=list)

    def comm_bytes(self) -> float:
        return sum(c.step.bytes / c.step.itemsize * c.itemsize for c in self.comm if c.step.communicates)

    def times(self, hw: Hardware, *, overlap: bool = False) -> dict[str, float]:
        compute = self.flops / (hw.peak_flops * hw.flops_efficiency)
        memory = (self.weight_bytes + self.kv_bytes) / (hw.hbm_bandwidth * hw.hbm_efficiency)
        weight = sum(collective_time(c.step, c.itemsize, hw) for c in self.comm if c.weight and c.step.communicates)
        act = sum(collective_time(c.step, c.itemsize, hw) for c in self.comm if not c.weight and c.step.communicates)
        if overlap:
            time = max(compute, memory, weight + act)
        elif hw.weight_prefetch:
            time = max(compute, memory, weight) + act
        else:
            time = max(compute, memory) + weight + act
        return {"compute": compute, "memory": memory, "comm": weight + act, "time": time}

    def add(self, other: "LayerCost") -> "LayerCost":
        return LayerCost(self.flops + other.flops, self.weight_bytes + other.weight_bytes,
                         self.kv_bytes + other.kv_bytes, self.comm + other.comm)


def collective_time(c: Collective, itemsize: int, hw: Hardware) -> float:
    """latency + ring steps · hop latency + wire bytes / bandwidth (an all-reduce is two rings)."""
    wire = c.wire_bytes / c.itemsize * itemsize
    rings = 2 if c.kind == "all_reduce" else 1
    return hw.collective_latency + rings * (c.group_size - 1) * hw.hop_latency + wire / hw.collective_bandwidth(c.axes)


def local_numel(node: fx.Node, layout: Layout, mesh: Mesh) -> int:
    return math.prod(layout.local_shape(tuple(node.meta["val"].shape), mesh))


def _input_layout(node: fx.Node, name: str) -> Layout:
    return node.meta[IN_LAYOUTS][name]


def op_flops(node: fx.Node, mesh: Mesh) -> float:
    """FLOPs one chip spends on `node` (matmuls and attention; pointwise work is neglected)."""
    if node.target in _MATMULS:
        x_name, w_name = _MATMULS[node.target]
        x = node.args[0] if node.target is not aten.addmm.default else node.args[1]
        k_local = _input_layout(node, x_name).local_shape(tuple(x.meta["val"].shape), mesh)[-1]
        return 2.0 * local_numel(node, node.meta[LAYOUT], mesh) * k_local
    if node.target is aten.scaled_dot_product_attention.default:
        q, k = node.args[0], node.args[1]
        B, H, Lq, D = _input_layout(node, "query").local_shape(tuple(q.meta["val"].shape), mesh)
        Lk = k.meta["val"].shape[2]
        return 4.0 * B * H * Lq * Lk * D
    return 0.0


def layer_costs(gm: fx.GraphModule, mesh: Mesh, conversions: list[Conversion], precision: Precision) -> dict[str, LayerCost]:
    """Cost ingredients of every layer of a propagated graph (plus "output" for what no layer owns)."""
    layers = gm.meta[LAYERS]
    attribution = Attribution(layers)
    sig = signature(gm)
    costs: dict[str, LayerCost] = {l.name: LayerCost() for l in layers.layers}
    costs[OUTPUT] = LayerCost()
    io_inputs = {name for name in sig.inputs}

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
        if node.target in _MATMULS:
            w_name = _MATMULS[node.target][1]
            w = node.args[1] if node.target is not aten.addmm.default else node.args[2]
            if w.op == "placeholder" and w.name in sig.params:
                c.weight_bytes += local_numel(w, _input_layout(node, w_name), mesh) * size("weights", w)
        if node.target is aten.index_copy.default and node.args[0].op == "placeholder" and node.args[0].name in io_inputs:
            cache = node.args[0]  # the step reads the whole cache it attends over
            c.kv_bytes += local_numel(cache, cache.meta[LAYOUT], mesh) * size("kv", cache)
    for conv in conversions:
        owner = attribution.owner(conv.src, conv.first_consumer)
        is_weight = conv.src.op == "placeholder" and conv.src.name in sig.params
        itemsize = size("weights" if is_weight else "activations", conv.src)
        costs[owner].comm.extend(Comm(s, itemsize, is_weight) for s in conv.steps)
    return costs


def stored_bytes(gm: fx.GraphModule, mesh: Mesh, precision: Precision) -> dict[str, float]:
    """What one chip stores: weights at rest and the KV caches, in the planned precisions."""
    sig = signature(gm)
    io = gm.meta.get("sw_io_layouts", {})
    weights = kv = 0.0
    for n in gm.graph.nodes:
        if n.op != "placeholder" or not isinstance(n.meta.get("val"), torch.Tensor):
            continue
        layout = n.meta.get(LAYOUT) or Layout.replicated(n.meta["val"].ndim)
        item = n.meta["val"].element_size()
        if n.name in sig.params:
            weights += local_numel(n, layout, mesh) * precision.nbytes("weights", item)
        elif n.name in io:
            kv += local_numel(n, layout, mesh) * precision.nbytes("kv", item)
    return {"weights": weights, "kv_cache": kv}

