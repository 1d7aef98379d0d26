"""Model Explorer overlays, read back with the package's own classes (no server is started).

Would catch: overlays keyed by ids that are not nodes of the graphs written beside them, a layout or a
collective's bytes that differ from the plan's, a rank program without its lowered collectives, and a
missing package reported as anything but a ShardwiseError naming the extra.
"""

import builtins
import json

import pytest

import shardwise
from shardwise.errors import ShardwiseError
from shardwise.ir.meta import COLLECTIVE
from shardwise.passes.insert_collectives import collectives
from shardwise.report.explorer import OVERLAYS, write_explorer


@pytest.fixture(scope="module")
def planned(tiny):
    from shardwise.models import example_inputs

    model = tiny("ref-tiny-parallel")
    args, kwargs = example_inputs(model, 4, 8)
    return shardwise.plan(model, args, kwargs, mesh="2x2x1", layouts="ffn=ws2d,attn=batch")


def test_overlays_match_the_plan(planned, tmp_path):
    from model_explorer import graph_builder as gb
    from model_explorer import node_data_builder as nd

    files = write_explorer(planned, tmp_path, rank=3)
    assert set(files.overlays) == set(OVERLAYS)
    collection = json.loads(files.graphs.read_text())["graphCollections"][0]
    graphs = {g["id"]: g for g in collection["graphs"]}
    assert set(graphs) == {"global view", "rank 3"}
    for g in graphs.values():  # each node rebuilds as the package's GraphNode
        nodes = [gb.GraphNode(**{**n, "attrs": [gb.KeyValue(**a) for a in n["attrs"]]}) for n in g["nodes"]]
        ids = {n.id for n in nodes}
        assert all(e["sourceNodeId"] in ids for n in g["nodes"] for e in n["incomingEdges"])
    global_nodes = {n.name: n for n in planned.program.gm.graph.nodes}
    for name, path in files.overlays.items():
        raw = json.loads(path.read_text())
        data = nd.ModelNodeData(graphsData={gid: nd.GraphNodeData(
            results={k: nd.NodeDataResult(**v) for k, v in g["results"].items()},
            **{k: v for k, v in g.items() if k not in ("results", "gradient", "thresholds")})
            for gid, g in raw.items()})
        assert set(data.graphsData) == set(graphs)
        for gid, g in data.graphsData.items():
            ids = {n["id"] for n in graphs[gid]["nodes"]}
            assert g.results and set(g.results) <= ids, (name, gid)
        if name == "collective_bytes":
            want = {n: global_nodes[n].meta[COLLECTIVE].bytes for n in data.graphsData["global view"].results}
            assert {k: v.value for k, v in data.graphsData["global view"].results.items()} == want
            # a fused collective (passes/fuse_collectives.py) is one node carrying its members' bytes together;
            # the plan lists one line per member: the same bytes, member by member
            assert sum(want.values()) == sum(c.bytes for c in planned.collectives)
            assert sorted(c.bytes for _, c in collectives(planned.program.gm) if c.communicates) == \
                sorted(c.bytes for c in planned.collectives)
            assert len(data.graphsData["rank 3"].results) == len(want)  # every collective lowered on the rank
        if name == "layout":
            results = data.graphsData["global view"].results
            assert any(str(r.value).startswith("B_") for r in results.values())  # attention split by batch
        if name == "predicted_time":
            times = {round(l.cost["time"] * 1e3, 6) for l in planned.layers if l.cost}
            assert {r.value for r in data.graphsData["global view"].results.values()} <= times
    assert files.command().startswith(f"model-explorer {files.graphs} --node_data_paths=")


def test_missing_package_names_the_extra(planned, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_model_explorer(name, *args, **kwargs):
        if name.startswith("model_explorer"):
            raise ImportError("No module named 'model_explorer'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_model_explorer)
    with pytest.raises(ShardwiseError, match=r"shardwise\[explorer\]"):
        write_explorer(planned, tmp_path)


def test_explorer_errors(planned, tmp_path):
    with pytest.raises(ShardwiseError, match="expected a rank of mesh 2x2x1"):
        write_explorer(planned, tmp_path, rank=4)
    loaded = shardwise.Plan.from_json(planned.to_json())
    with pytest.raises(ShardwiseError, match="has no program"):
        write_explorer(loaded, tmp_path)
