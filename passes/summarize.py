"""summarize: the Plan record of an annotated global-view graph (what `inspect` prints).

Collectives are attributed to layers by passes/attribute.py.

Reads `sw_layers`, `sw_assignment`, `sw_layout`, `sw_collective`, `sw_weight`, `sw_unknown_ops`.
"""

from __future__ import annotations

import torch.fx as fx

from ..ir.kinds import LayerKind
from ..ir.layout import Layout
from ..ir.mesh import Mesh
from ..ir.meta import ASSIGNMENT, LAYERS, LAYOUT, PLAN, SIGNATURE, UNKNOWN, WEIGHT
from ..ir.plan import CollectiveRecord, LayerPlan, Memory, Plan
from .assign_layouts import latent_name
from .attribute import OUTPUT, Attribution
from .emit import quantizable
from .find_layers import Layer, Layers
from .graph_utils import signature
from .insert_collectives import Conversion
from .pipeline import graph_pass
from .storage import weight_memory

_PRIORITY = ["B", "L", "H", "K", "E", "F", "D", "V", "S"]


def dim_names(shape, dims: dict[str, int]) -> list[str]:
    """Paper letters for a tensor's dims, matched by size (B first, then L, heads, ...)."""
    out: list[str] = []
    used: set[str] = set()
    composite = {f"({a}D)": dims[a] * dims["D"] for a in ("H", "K") if a in dims and "D" in dims}
    for i, s in enumerate(shape):
        cands = [k for k in _PRIORITY if dims.get(k) == s and k not in used]
        if i != 0 and "B" in cands and len(cands) > 1:
            cands.remove("B")
        cands += [k for k, v in composite.items() if v == s and k not in used]
        name = cands[0] if cands else ("1" if s == 1 else "·")
        used.add(name)
        out.append(name)
    return out


@graph_pass(needs=(SIGNATURE, LAYERS, ASSIGNMENT, LAYOUT, UNKNOWN), makes=(PLAN,))
def summarize(gm: fx.GraphModule, mesh: Mesh, conversions: list[Conversion], *, model: str, hardware: str,
              phase: str, quantize: str | None = None) -> fx.GraphModule:
    """The Plan of a propagated graph (into gm.meta["sw_plan"]), from the conversions insert_collectives inserts (or would).
    `quantize="int8"`: the weights emit holds as int8 (`emit.quantizable`) move 1 byte per element."""
    layers: Layers = gm.meta[LAYERS]
    assignment = gm.meta[ASSIGNMENT]
    nodes = {n.name: n for n in gm.graph.nodes}
    dims = dict(layers.dims)
    rows: dict[str, LayerPlan] = {}
    for l in layers.layers:
        ldims = {**dims, **l.dims}
        rows[l.name] = LayerPlan(
            name=l.name, kind=l.kind, block=l.block, choice=assignment.choices.get(l.name, "-"), dims=dict(l.dims),
            weights=_weights(l, nodes, mesh, ldims, signature(gm).params), notes=list(assignment.notes.get(l.name, [])),
        )
    rows[OUTPUT] = LayerPlan(name=OUTPUT, kind=LayerKind.OUTPUT, block=None, choice="replicated")
    params = signature(gm).params
    attribution = Attribution(layers)
    int8 = set(quantizable(gm)) if quantize == "int8" else set()
    for conv in conversions:
        row = rows[attribution.owner(conv.src, conv.first_consumer)]
        names = dim_names(tuple(conv.src.meta["val"].shape), {**dims, **row.dims})
        weight = conv.src.op == "placeholder" and conv.src.name in params
        for step in conv.steps:
            if conv.src.name in int8:
                step = step.with_itemsize(1)
            if step.communicates:
                row.collectives.append(CollectiveRecord.of(step, mesh, names, node=f"{conv.src.name}→{step.kind}",
                                                           weight=weight))
    plan_layers = [r for r in rows.values() if r.kind != LayerKind.OUTPUT or r.collectives]
    unknown = list(gm.meta.get(UNKNOWN, []))
    gm.meta[PLAN] = Plan(model=model, mesh=mesh, hardware=hardware, phase=phase, batch=dims.get("B", 0),
                         seq=dims.get("L", 0), layers=plan_layers, unknown_ops=unknown, memory=Memory(**weight_memory(gm, mesh)))
    return gm


_ROLE_DIMS = {  # (out, in) names of each projection's weight
    "q": ("(HD)", "E"), "gate": ("(HD)", "E"), "k": ("(KD)", "E"), "v": ("(KD)", "E"), "o": ("E", "(HD)"),
    "w_in": ("F", "E"), "w_gate": ("F", "E"), "w_out": ("E", "F"), "w": ("V", "E"),
    "router": ("X", "E"),
    "w_gate_up": ("(2F)", "E"), "b_gate": ("X", "F"), "b_in": ("X", "F"), "b_gate_up": ("X", "(2F)"),
    "b_out": ("X", "E"),  # stacked experts' biases (gpt-oss), [X, ·]
}


def _weights(l: Layer, nodes, mesh: Mesh, dims, params: dict[str, str]) -> dict[str, dict[str, str]]:
    out = {}
    for n, p in l.info.get("latent", {}).items():  # a latent attention's low-rank code C: replicated, or split
        role = "latent " + latent_name(nodes[n], p.out_features)
        spec = nodes[p.weight].meta.get(WEIGHT)
        names = ["C", "E"] if p.rows_out else ["E", "C"]
        at_rest, in_use = (spec.at_rest, spec.in_use) if spec else (Layout.replicated(2),) * 2
        out[role] = {"at_rest": at_rest.notation(mesh, names), "in_use": in_use.notation(mesh, names)}
    entries = [(role, p.weight, p.rows_out) for role, p in l.projections.items()]
    entries += [(role, name, True) for role, name in l.params.items()]  # embedding tables are [V, E]
    if "router" in l.info:
        entries.append(("router", l.info["router"], True))
    f_dims = l.info.get("f_dims", {})
    for role, name, rows_out in entries:
        ph = nodes.get(name)
        if ph is None or WEIGHT not in ph.meta:
            continue
        spec = ph.meta[WEIGHT]
        o, i = _ROLE_DIMS.get(role, ("V", "E"))
        names = [o, i] if rows_out else [i, o]
        if name in f_dims and spec.at_rest.ndim == 3:  # stacked experts: [X, F, E] or [X, E, F]
            names = ["X"] + (names if (f_dims[name] == 1) == (role != "w_out") else names[::-1])
        out[role] = {"at_rest": spec.at_rest.notation(mesh, names), "in_use": spec.in_use.notation(mesh, names)}
    return out
