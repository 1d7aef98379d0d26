"""The annotated global-view graph, as text: every op with its output layout in the paper's notation,
every collective on its own line with its group and bytes per chip."""

from __future__ import annotations

import torch
import torch.fx as fx

from ..ir.mesh import Mesh
from ..ir.meta import COLLECTIVE, LAYERS, LAYOUT, NOTE
from .summarize import dim_names


def format_graph(gm: fx.GraphModule, mesh: Mesh, *, limit: int | None = None) -> str:
    dims = dict(gm.meta[LAYERS].dims)
    for l in gm.meta[LAYERS].layers:
        for k, v in l.dims.items():
            dims.setdefault(k, v)
    lines = []
    for node in gm.graph.nodes:
        if node.op == "output":
            lines.append(f"return {', '.join(str(a) for a in node.args[0])}")
            continue
        layout = node.meta.get(LAYOUT)
        val = node.meta.get("val")
        where = ""
        if layout is not None and isinstance(val, torch.Tensor):
            where = layout.notation(mesh, dim_names(tuple(val.shape), dims))
        if COLLECTIVE in node.meta:
            c = node.meta[COLLECTIVE]
            lines.append(f"  ▶ {node.name} = {c.describe(mesh, None)}  :: {where}")
            continue
        target = node.target if node.op != "call_function" else getattr(node.target, "__name__", str(node.target))
        args = ", ".join(str(a) for a in node.args)
        note = f"   # {node.meta[NOTE]}" if NOTE in node.meta else ""
        lines.append(f"{node.name} = {node.op}[{target}]({args})  :: {where}{note}")
        if limit and len(lines) >= limit:
            lines.append("...")
            break
    return "\n".join(lines)
