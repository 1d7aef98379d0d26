"""Reading the cost model's ingredients off a propagated graph: FLOPs, bytes read, collectives, memory.

The formulas (time from FLOPs and bytes on a `Hardware` profile) are strategies/cost.py; here each
layer's FLOPs come from the *local* shapes of its matmuls (2·M·N·K) and attention cores (4·B·H·Lq·Lk·D),
its weight bytes from the layout each matmul reads its weight in, its KV-cache bytes from the caches it
updates, and its collectives from `plan_conversions` — what insert_collectives inserts, siblings fused
as `plan_fusions` fuses them (the fused members after the first pay no fixed latency of their own).
A parallel block's attention also carries its feed-forward as a `Branch`, with the attention's
collectives that the feed-forward neither reads nor feeds: the feed-forward computes while they run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..ir.collective import Collective
from ..ir.layout import Layout
from ..ir.mesh import Mesh
from ..ir.meta import IN_LAYOUTS, LAYERS, LAYOUT
from ..passes.attribute import OUTPUT, Attribution
from ..passes.collective_matmul import looped_steps
from ..passes.find_layers import Layers, block_of
from ..passes.fuse_collectives import plan_fusions
from ..passes.graph_utils import (
    MATMULS,
    expert_weight,
    is_experts_ffn,
    is_grouped_mm,
    routed_rows,
    signature,
    structure_fact,
)
from ..passes.insert_collectives import Conversion
from ..passes.storage import stored_tensors
from ..strategies.cost import Branch, Comm, LayerCost, Precision

aten = torch.ops.aten


def _local_numel(node: fx.Node, layout: Layout, mesh: Mesh) -> int:
    return math.prod(layout.local_shape(tuple(node.meta["val"].shape), mesh))


def op_kind(node: fx.Node) -> str | None:
    """What the cost model may charge `node` for: "matmul", "grouped" (a grouped matmul), "experts" (a fused
    experts op), "attention" (an attention core), "cache" (a KV-cache update), else None (nothing)."""
    if node.op != "call_function":
        return None
    if node.target in MATMULS:
        return "matmul"
    if is_grouped_mm(node):
        return "grouped"
    if is_experts_ffn(node):
        return "experts"
    if node.target is aten.scaled_dot_product_attention.default:
        return "attention"
    if node.target is aten.index_copy.default:
        return "cache"
    return None


def elementwise_reads(node: fx.Node) -> fx.Node | None:
    """For an op that streams activations through memory without a matmul — pointwise (`torch.Tag.pointwise`:
    silu, mul, the norms' pow and rsqrt, the rotary's neg), a concatenation, a reduction (the norms' mean) —
    the tensor whose local size its traffic is charged as: its output for pointwise ops and cat (read and
    written: 2×), its input for a reduction (read once); None for any other op (views move nothing;
    matmuls, attention and collectives are priced as such)."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    if not isinstance(node.meta.get("val"), torch.Tensor) or op_kind(node) is not None:
        return None
    tags = node.target.tags
    if torch.Tag.pointwise in tags or node.target is aten.cat.default:
        return node
    if torch.Tag.reduction in tags and node.args and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


_KIND = object()  # op_flops: the kind not given


def op_flops(node: fx.Node, mesh: Mesh, kind: str | None = _KIND) -> float:
    """FLOPs one chip spends on `node` (matmuls and attention; pointwise work is neglected). `kind`:
    `op_kind(node)`, where the caller knows it."""
    kind = op_kind(node) if kind is _KIND else kind
    if kind == "matmul":
        m, k, n = matmul_shape(node, mesh)
        return 2.0 * m * k * n
    if kind == "grouped":  # the routed tokens (B·L·top-k rows) through their experts: top-k experts per token
        x = node.args[0]
        name = node.target._schema.arguments[0].name
        k_local = node.meta[IN_LAYOUTS][name].local_shape(tuple(x.meta["val"].shape), mesh)[-1]
        return 2.0 * _local_numel(node, node.meta[LAYOUT], mesh) * k_local
    if kind == "experts":
        return experts_flops(node, mesh)[1]
    if kind == "attention":
        q, k = node.args[0], node.args[1]
        B, H, Lq, D = node.meta[IN_LAYOUTS]["query"].local_shape(tuple(q.meta["val"].shape), mesh)
        Lk = k.meta["val"].shape[2]
        return 4.0 * B * H * Lq * Lk * D
    return 0.0


def matmul_shape(node: fx.Node, mesh: Mesh) -> tuple[int, int, int]:
    """(m, k, n) of a matmul as one chip runs it: its local output's last dim n, its input's local k, and m
    the rest of the output (rows, times batches for a bmm)."""
    args = MATMULS[node.target]
    x = node.args[args.x]
    k = node.meta[IN_LAYOUTS][args.x_name].local_shape(tuple(x.meta["val"].shape), mesh)[-1]
    out = node.meta[LAYOUT].local_shape(tuple(node.meta["val"].shape), mesh)
    n = out[-1] if out else 1
    return (math.prod(out) // n if n else 0), k, n


def touched_fraction(dims: dict[str, int]):
    """rows → the expected share of a mixture's experts that a step's routed rows (B·L tokens × top-k) touch,
    assuming uniform, independent routing: 1 − (1 − k/X)^(B·L), so X·(that) distinct experts (decode with
    few tokens reads fewer experts than prefill)."""
    X, k = dims.get("X"), dims.get("k")
    if not X or not k:
        return lambda rows: 1.0
    return lambda rows: 1.0 - (1.0 - min(k, X) / X) ** max(1, rows // k)


@dataclass(frozen=True)
class ExpertLoad:
    """What the busiest chip of an experts layer does in one step, under uniform, independent routing.

    The X experts are split into g groups (expert parallel; g = 1 expert-sliced) and the R routed rows
    (B·L tokens × top-k) fall on the groups at random: a group gets R/g rows on average and the busiest,
    which the step waits for, about R/g + √(2·(R/g)·ln g) (the normal tail of the largest of g binomial
    counts; at least ⌈R/g⌉, at most R). `imbalance` is that over the mean: 1 when expert-sliced (every chip runs every
    row on its slice of F), large when few rows meet many groups (decode). The busiest group's rows touch
    (X/g)·(1 − (1 − g/X)^rows) of its experts; each touched expert is one matmul call per projection."""

    rows: float  # routed rows on the busiest chip
    imbalance: float  # rows / (R / g)
    touched: float  # experts the busiest chip runs (of X / g)
    share: float  # touched / (X / g): the share of its expert weights it reads


def expert_load(dims: dict[str, int], rows: int, groups: int) -> ExpertLoad:
    X = dims.get("X") or 1
    if groups <= 1:
        share = touched_fraction(dims)(rows)
        return ExpertLoad(float(rows), 1.0, X * share, share)
    mean = rows / groups
    busiest = min(float(rows), max(math.ceil(mean), mean + math.sqrt(2.0 * mean * math.log(groups))))
    local = X / groups
    share = 1.0 - (1.0 - 1.0 / local) ** busiest if local > 1 else 1.0
    return ExpertLoad(busiest, busiest / mean, local * share, share)


def experts_groups(node: fx.Node, mesh: Mesh) -> tuple[int, int]:
    """(expert groups, F slices) of a fused experts_ffn as laid out: how X and F of w_down are split."""
    wd = node.meta[IN_LAYOUTS]["w_down"]
    return mesh.group_size(wd.dims[0]), mesh.group_size(wd.dims[1])


def experts_flops(node: fx.Node, mesh: Mesh, *, busiest: bool = True) -> tuple[float, float]:
    """(whole, per chip) FLOPs of a fused experts_ffn: 2·rows·3·E·F for the B·L·k routed rows (top-k
    experts per token); a chip runs its slice of F for its experts' rows: the busiest group's
    (`expert_load`: uniform routing, its imbalance counted), or with `busiest=False` the mean's."""
    rows, E = routed_rows(node), node.args[0].meta["val"].shape[-1]
    X, F = node.args[3].meta["val"].shape[:2]
    whole = 2.0 * rows * 3 * E * F
    groups, slices = experts_groups(node, mesh)
    mine = expert_load({"X": X}, rows, groups).rows if busiest else rows / groups
    return whole, whole * (mine / rows) / slices


def experts_notes(gm: fx.GraphModule, mesh: Mesh) -> dict[str, str]:
    """Layer name → what its experts' busiest chip does per step under the layout applied (`expert_load`)."""
    attribution = Attribution(gm.meta[LAYERS])
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and is_experts_ffn(node) and (owner := attribution.layer_of(node)):
            rows = routed_rows(node)
            X = node.args[3].meta["val"].shape[0]
            groups, _ = experts_groups(node, mesh)
            load = expert_load({"X": X}, rows, groups)
            out[owner] = (f"per step, uniform routing assumed: {rows} routed rows over {groups} expert group"
                          f"{'s' * (groups > 1)}; the busiest chip runs {load.rows:.1f} of them (×{load.imbalance:.2f} "
                          f"the mean) through {load.touched:.1f} of its {X // groups} experts "
                          f"({3 * load.touched:.0f} matmul calls)")
    return out


def layer_costs(gm: fx.GraphModule, mesh: Mesh, conversions: list[Conversion], precision: Precision, *,
                loop: bool = False) -> dict[str, LayerCost]:
    """Cost ingredients of every layer of a propagated graph (plus "output" for what no layer owns).
    `loop`: the program runs looped collective matmuls (passes/collective_matmul.py; not over int8
    matmuls): the collectives it loops are priced as such."""
    layers = gm.meta[LAYERS]
    facts = graph_facts(gm)
    sig = facts.sig
    costs: dict[str, LayerCost] = {l.name: LayerCost() for l in layers.layers}
    dims = {l.name: l.dims for l in layers.by_kind("experts")}
    costs[OUTPUT] = LayerCost()

    def size(kind: str, n: fx.Node) -> int:
        return precision.nbytes(kind, n.meta["val"].element_size())
    # the ops that can cost anything, each with its layer, `op_kind` and the weight or cache it reads
    # (the rest add 0 FLOPs and no bytes)
    for node, owner, kind, read in facts.costed:
        c = costs[owner]
        if kind == "matmul":
            m, k, n = matmul_shape(node, mesh)
            c.flops += 2.0 * m * k * n
            c.gemms.append((2.0 * m * k * n, m, k, n))
        elif kind != "cache":
            c.flops += op_flops(node, mesh, kind)
        if kind == "matmul" and read is not None:  # its weight, a parameter
            c.weight_bytes += _local_numel(read, node.meta[IN_LAYOUTS][MATMULS[node.target].w_name], mesh) * size(
                "weights", read)
        if kind in ("experts", "grouped"):
            # a step reads the experts its tokens touch (the busiest chip's): its local slice times the share
            # touched; and runs one matmul per touched expert and projection
            rows = routed_rows(node)
            groups = experts_groups(node, mesh)[0] if kind == "experts" else 1
            load = expert_load(dims.get(owner, {}), rows, groups)
            args = tuple(i for i in (1, 2, 3) if node.args[i] is not None) if kind == "experts" else (1,)
            c.calls += load.touched * len(args)
            for i in args:
                if (found := expert_weight(node, sig.params, i)) is not None:
                    c.weight_bytes += load.share * _local_numel(found[0], found[0].meta[LAYOUT], mesh) * size("weights", found[0])
        if kind == "cache" and read is not None:  # the step reads the whole cache it attends over
            c.kv_bytes += _local_numel(read, read.meta[LAYOUT], mesh) * size("kv", read)
    for node, owner, src in facts.elementwise:  # activations streamed by pointwise ops, cats and reductions
        if (layout := src.meta.get(LAYOUT)) is not None:
            costs[owner].act_bytes += (1 if src is not node else 2) * _local_numel(src, layout, mesh) * size(
                "activations", src)
    owners = [facts.owner(conv.src, conv.first_consumer) for conv in conversions]
    fusions = plan_fusions(gm, conversions, owners=owners, positions=facts.positions)
    riders = {id(c) for f in fusions for c in f.members[1:]}

    def moves_weight(conv) -> bool:
        return conv.src.op == "placeholder" and conv.src.name in sig.params

    def itemsize_of(conv) -> int:  # bytes per element in the planned precision
        return size("weights" if moves_weight(conv) else "activations", conv.src)

    # every fused member → its fusion's wire bytes: it is priced by the line for the stacked tensor's size
    sized: dict[int, float] = {}
    for f in fusions:
        stacked = sum(m.steps[0].wire_bytes / m.steps[0].itemsize * itemsize_of(m) for m in f.members)
        sized.update(dict.fromkeys(map(id, f.members), stacked))
    fused = set(sized)
    looped = looped_steps(conversions, mesh, fused) if loop and precision.weights != "int8" else {}
    beside = facts.beside
    branch: dict[str, list[Comm]] = {}  # a parallel block's attention → its collectives its feed-forward runs beside
    for conv, owner in zip(conversions, owners):
        is_weight, itemsize = moves_weight(conv), itemsize_of(conv)
        load = 1.0
        if conv.inside:  # an all-to-all dispatch: the busiest chip receives (and returns) its experts' rows
            node = conv.first_consumer
            load = expert_load(dims.get(owner, {}), routed_rows(node), experts_groups(node, mesh)[0]).imbalance
        loops = looped.get(id(conv), ())
        made = [Comm(s, itemsize, is_weight, fused=i == 0 and id(conv) in riders,
                     load=load if s.kind == "all_to_all" else 1.0, looped=i in loops,
                     pieces=1 if i in loops or id(conv) in fused else _pieces(s, conv.src, mesh),
                     sized=sized.get(id(conv), 0.0) if i == 0 else 0.0)
                for i, s in enumerate(conv.steps)]
        costs[owner].comm.extend(made)
        costs[owner].copy_bytes += sum(2 * relayout_copies(s, mesh) * s.elements * itemsize
                                       for i, s in enumerate(conv.steps) if i not in loops)
        if id(conv) in fused:  # its tensor is stacked with its siblings' first (a copy, read and written)
            costs[owner].copy_bytes += 2 * _local_numel(conv.src, conv.steps[0].src, mesh) * itemsize
        if owner in beside and not is_weight and conv.src in beside[owner][1]:
            # (ring steps are hidden beside their partial matmuls already)
            branch.setdefault(owner, []).extend(c for c in made if c.step.communicates and not c.looped)
    for attn, comms in branch.items():
        ffn = costs[beside[attn][0]]
        # a weight-gathered feed-forward waits for its gathers, which the schedule does not wait early for it
        if comms and not any(c.weight and c.step.communicates for c in ffn.comm):
            costs[attn].branches.append(Branch(tuple(comms), ffn, beside[attn][0]))
    return costs


class GraphFacts:
    """What costing reads off a graph's structure alone: the ops that can cost anything (matmuls, attention
    cores, experts, KV-cache updates) with their layers, kinds and the placeholders they read, the parallel
    blocks' ops that run beside their feed-forwards, node positions, and the layer each (source, first
    consumer) pair of a conversion is accounted to (remembered as asked). The planner costs hundreds of
    candidates on one prototype graph, inside `fixed_structure`: there these are made once
    (`graph_facts`), elsewhere for every call."""

    def __init__(self, gm: fx.GraphModule):
        nodes = list(gm.graph.nodes)
        self.layers, self.sig = gm.meta[LAYERS], signature(gm)
        self.attribution = Attribution(self.layers)
        self.positions = {n: i for i, n in enumerate(nodes)}
        self.costed = [(n, owner, kind, _reads(n, kind, self.sig)) for n in nodes if (kind := op_kind(n)) is not None
                       and (owner := self.attribution.layer_of(n)) is not None]
        self.elementwise = [(n, owner, src) for n in nodes if (src := elementwise_reads(n)) is not None
                            and (owner := self.attribution.layer_of(n)) is not None]
        self.beside = _beside_ffn(gm, self.layers, self.attribution)
        self._owners: dict[tuple[fx.Node, fx.Node], str] = {}

    def owner(self, src: fx.Node, consumer: fx.Node) -> str:
        """`Attribution.owner` of a conversion from `src` first read by `consumer` (remembered)."""
        key = (src, consumer)
        got = self._owners.get(key)
        if got is None:
            got = self._owners[key] = self.attribution.owner(src, consumer)
        return got


def graph_facts(gm: fx.GraphModule) -> GraphFacts:
    return structure_fact(gm, "costing", GraphFacts)


def _reads(node: fx.Node, kind: str, sig) -> fx.Node | None:
    """The placeholder whose bytes `node` is charged for reading: a matmul's weight when it is a parameter,
    a KV-cache update's cache when it is a program input; else None."""
    if kind == "matmul":
        w = node.args[MATMULS[node.target].w]
        return w if w.op == "placeholder" and w.name in sig.params else None
    if kind == "cache":
        cache = node.args[0]
        return cache if cache.op == "placeholder" and cache.name in set(sig.inputs) else None
    return None


def _beside_ffn(gm: fx.GraphModule, layers: Layers, attribution: Attribution) -> dict[str, tuple[str, set[fx.Node]]]:
    """For each parallel block's attention: (its feed-forward, the ops of the block whose collectives run
    beside it): the block's ops that neither feed the feed-forward (h and what makes it) nor read what it
    makes (the sum attn + ffn and on), nor are its own. A source outside the block counts as shared."""
    parallel = {b.name: b for b in layers.blocks if b.parallel and b.attention and b.ffn}
    if not parallel:
        return {}
    by_block: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and (name := block_of(n)) in parallel:
            by_block.setdefault(name, []).append(n)
    out = {}
    for b in parallel.values():
        inside = by_block.get(b.name, [])
        ffn = {n for n in inside if attribution.layer_of(n) == b.ffn.name}
        tied = set(ffn)
        for step in (lambda n: n.all_input_nodes, lambda n: n.users):  # what it reads, what reads it
            grow = list(ffn)
            while grow:
                for m in step(grow.pop()):
                    if m not in tied and m.op == "call_function" and block_of(m) == b.name:
                        tied.add(m)
                        grow.append(m)
        out[b.attention.name] = (b.ffn.name, {n for n in inside if n not in tied})
    return out


def _pieces(step: Collective, src: fx.Node, mesh: Mesh) -> int:
    """How many collectives the rank program runs `step` on `src` as (Collective.pieces, on its local rows)."""
    if step.kind != "all_gather" or not step.dim:
        return 1
    return step.pieces(step.src.local_shape(tuple(src.meta["val"].shape), mesh)[0])


def relayout_copies(step, mesh: Mesh) -> int:
    """How many local copies of its charged tensor the lowering of `step` makes (runtime/lower.py): its
    dims' (`Collective.local_copies`), with its group's blocks reordered where its atoms are not in mesh
    order."""
    return step.local_copies(reorder=tuple(mesh.mesh_order(step.atoms)) != tuple(step.atoms))


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


def idle_expert_params(proto: fx.GraphModule, n_blocks: int) -> float:
    """Parameters of the routed experts a token does not use: (1 − k/X) of each mixture's stacked expert
    weights, over the whole model. The model FLOPs per token are 2 × (parameters − these)."""
    layers = proto.meta[LAYERS]
    times = n_blocks if len(layers.blocks) == 1 else 1
    nodes = {n.name: n for n in proto.graph.nodes}
    out = 0.0
    for l in layers.by_kind("experts"):
        X, k = l.dims.get("X"), l.dims.get("k")
        if not X or not k:
            continue
        stacked = sum(nodes[ph].meta["val"].numel() for ph in l.params.values() if ph in nodes)
        out += times * stacked * (1 - min(k, X) / X)
    return out
