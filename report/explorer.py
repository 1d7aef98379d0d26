"""Model Explorer: the planned graphs, and node-data overlays of what the plan decided about each node.

    files = write_explorer(plan, "plan-explorer/")     # needs the `explorer` extra (ai-edge-model-explorer)
    print(files.command())                             # model-explorer graphs.json --node_data_paths=...
    visualize(files)                                   # or start Model Explorer on them from Python

Two graphs, built with Model Explorer's own graph classes (`model_explorer.graph_builder`) into one
collection (`graphs.json`, which Model Explorer's JSON loader opens):

    global view   the captured ATen graph with the plan applied: every collective an explicit node
    rank R        the program rank R runs: local shapes, `_c10d_functional` collectives

Nodes are grouped by layer (`blocks/0/attn`). Three overlays, each a file of the package's node-data
classes (`model_explorer.node_data_builder.ModelNodeData`) covering both graphs by node id:

    layout.json            each tensor's layout in the paper's notation (global view; the rank's nodes
                           show the layout of the global tensor they hold a piece of)
    collective_bytes.json  bytes per chip of each collective node
    predicted_time.json    the predicted time per step (ms) of the layer each node belongs to

A plan made from a preset name builds its whole program here (planning needs one block): for a large
model that is a capture of every block on the meta device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx

from ..errors import ShardwiseError
from ..ir.meta import COLLECTIVE, CONVERSION, GLOBAL, LAYERS, LAYOUT, STEP
from ..ir.plan import LayerPlan, Plan
from ..passes.attribute import Attribution
from ..passes.summarize import dim_names
from ..planning.program import emit_rank
from ..runtime.simulate import sim_group_name
from .views import block_names

EXTRA = "explorer"
OVERLAYS = ("layout", "collective_bytes", "predicted_time")


def model_explorer():
    """The Model Explorer package's graph and node-data builders, or a ShardwiseError naming the extra."""
    try:
        from model_explorer import graph_builder, node_data_builder, utils
    except ImportError as e:
        raise ShardwiseError(
            f"Model Explorer overlays need the package ai-edge-model-explorer, which cannot be imported here "
            f"({e}); expected it installed with shardwise's '{EXTRA}' extra: pip install 'shardwise[{EXTRA}]' "
            f"(or pip install ai-edge-model-explorer), then run again") from None
    return graph_builder, node_data_builder, utils


@dataclass
class ExplorerFiles:
    graphs: Path
    overlays: dict[str, Path]

    def command(self) -> str:
        """The shell command that opens the graphs with every overlay in Model Explorer."""
        return f"model-explorer {self.graphs} --node_data_paths={','.join(str(p) for p in self.overlays.values())}"


def write_explorer(plan: Plan, folder: str | Path, *, rank: int = 0) -> ExplorerFiles:
    """Write `graphs.json` (global view and rank `rank`'s program) and the three overlays into `folder`."""
    gb, nd, utils = model_explorer()
    if plan.program is None:
        raise ShardwiseError("this Plan has no program (it was loaded from JSON): Model Explorer needs the planned "
                             "graph; re-plan with shardwise.plan(...) and pass that Plan")
    if not isinstance(rank, int) or not 0 <= rank < plan.mesh.size:
        raise ShardwiseError(f"rank={rank!r}: expected a rank of mesh {plan.mesh}, 0 … {plan.mesh.size - 1}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gm = plan.program.gm
    local = emit_rank(gm, plan.mesh, rank, group_name=sim_group_name)
    nodes = _annotate(gm, plan)
    ids = {"global": "global view", "rank": f"rank {rank}"}
    graphs = [_graph(gb, ids["global"], gm, nodes, rank_nodes=False),
              _graph(gb, ids["rank"], local, nodes, rank_nodes=True)]
    collection = gb.GraphCollection(label=f"{plan.model} {plan.phase} on {plan.mesh}", graphs=graphs)
    graphs_path = folder / "graphs.json"
    graphs_path.write_text(json.dumps(utils.convert_adapter_response({"graphCollections": [collection]})))
    overlays = {}
    for name in OVERLAYS:
        data = {ids["global"]: _overlay(nd, name, gm, nodes, rank_nodes=False),
                ids["rank"]: _overlay(nd, name, local, nodes, rank_nodes=True)}
        path = folder / f"{name}.json"
        nd.ModelNodeData(graphsData=data).save_to_file(str(path))
        overlays[name] = path
    return ExplorerFiles(graphs_path, overlays)


def visualize(files: ExplorerFiles) -> None:
    """Start Model Explorer's local server on the graphs with every overlay (opens a browser tab)."""
    model_explorer()
    import model_explorer as me

    me.visualize(str(files.graphs), node_data=[{"name": n, "node_data_path": str(p)} for n, p in files.overlays.items()])


# ------------------------------------------------------------------------------------ what each node is
@dataclass
class NodeInfo:
    layer: str  # the layer it belongs to ("" for none)
    layout: str  # its output layout in the paper's notation ("" for no tensor)
    bytes: int | None  # a collective's bytes per chip
    ms: float | None  # its layer's predicted time per step


def _annotate(gm: fx.GraphModule, plan: Plan) -> dict[str, NodeInfo]:
    """Global-view node name → its layer, layout, collective bytes and its layer's predicted time."""
    layers = gm.meta[LAYERS]
    attribution = Attribution(layers)
    dims = dict(layers.dims)
    for l in layers.layers:
        for k, v in l.dims.items():
            dims.setdefault(k, v)
    rows = _rows_by_layer(plan)
    by_name = {n.name: n for n in gm.graph.nodes}
    out = {}
    for n in gm.graph.nodes:
        if COLLECTIVE in n.meta:
            layer = attribution.of_conversion(n.meta[CONVERSION], by_name)
        elif n.op == "placeholder":
            layer = next((attribution.layer_of(u) for u in n.users if attribution.layer_of(u)), None) or ""
        else:
            layer = attribution.layer_of(n) or ""
        val, layout = n.meta.get("val"), n.meta.get(LAYOUT)
        notation = (layout.notation(plan.mesh, dim_names(tuple(val.shape), dims))
                    if layout is not None and isinstance(val, torch.Tensor) else "")
        row = rows.get(layer)
        out[n.name] = NodeInfo(layer or "", notation, n.meta[COLLECTIVE].bytes if COLLECTIVE in n.meta else None,
                               row.cost.get("time", 0.0) * 1e3 if row is not None and row.cost else None)
    return out


def _rows_by_layer(plan: Plan) -> dict[str, LayerPlan]:
    """Layer name → the plan row that stands for it (a row `blocks.[0-116].attn` for blocks.0.attn …)."""
    return {name: row for row in plan.layers for name in block_names(row)}


def _global_name(n: fx.Node) -> str:
    """The global-view node a rank program's node stands for (a lowered collective's origin)."""
    return n.meta.get(GLOBAL, n.name)


# ------------------------------------------------------------------------------------ graphs and overlays
def _graph(gb, graph_id: str, gm: fx.GraphModule, info: dict[str, NodeInfo], *, rank_nodes: bool):
    nodes = []
    for n in gm.graph.nodes:
        i = info.get(_global_name(n) if rank_nodes else n.name)
        label = n.op if n.op in ("placeholder", "output") else getattr(n.target, "__name__", str(n.target))
        attrs = [gb.KeyValue(key="op", value=n.op), gb.KeyValue(key="target", value=str(n.target))]
        if i is not None and i.layout:
            attrs.append(gb.KeyValue(key="layout", value=i.layout))
        step = n.meta.get(STEP) if rank_nodes else n.meta.get(COLLECTIVE)
        if step is not None:
            attrs.append(gb.KeyValue(key="collective", value=f"{step.kind} over {','.join(step.atoms)}: "
                                                               f"{step.bytes} bytes per chip"))
        val = n.meta.get("val")
        outputs = []
        if isinstance(val, torch.Tensor):
            outputs.append(gb.MetadataItem(id="0", attrs=[gb.KeyValue(key="tensor_name", value=n.name),
                                                          gb.KeyValue(key="shape", value=str(list(val.shape))),
                                                          gb.KeyValue(key="dtype", value=str(val.dtype))]))
        edges = [gb.IncomingEdge(sourceNodeId=a.name, targetNodeInputId=str(k)) for k, a in enumerate(n.all_input_nodes)]
        nodes.append(gb.GraphNode(id=n.name, label=label, namespace=(i.layer.replace(".", "/") if i else ""),
                                  attrs=attrs, incomingEdges=edges, outputsMetadata=outputs))
    return gb.Graph(id=graph_id, nodes=nodes)


def _overlay(nd, name: str, gm: fx.GraphModule, info: dict[str, NodeInfo], *, rank_nodes: bool):
    results = {}
    for n in gm.graph.nodes:
        i = info.get(_global_name(n) if rank_nodes else n.name)
        if i is None:
            continue
        if name == "layout" and i.layout:
            results[n.name] = nd.NodeDataResult(value=i.layout)
        elif name == "collective_bytes":
            step = n.meta.get(STEP) if rank_nodes else n.meta.get(COLLECTIVE)
            if step is not None and step.communicates:
                results[n.name] = nd.NodeDataResult(value=step.bytes)
        elif name == "predicted_time" and i.ms is not None:
            results[n.name] = nd.NodeDataResult(value=round(i.ms, 6))
    gradient = [nd.GradientItem(stop=0, bgColor="#ffffff"), nd.GradientItem(stop=1, bgColor="#e15759")]
    titles = {"layout": "layout (paper notation)", "collective_bytes": "collective bytes per chip",
              "predicted_time": "predicted layer time per step (ms)"}
    return nd.GraphNodeData(name=titles[name], results=results,
                            gradient=[] if name == "layout" else gradient,
                            showExpandedSummaryOnGroupNode=name == "layout")
