"""Sweeps and figures: the engine plans exactly as shardwise.plan does, Figure 1 picks the paper's layouts
at Table 2's operating points, the table and figures are written, bad arguments are refused."""

import csv
import json

import pytest

import shardwise
from shardwise.errors import PlanError, ShardwiseError
from shardwise.experiments.figures import table2_points
from shardwise.experiments.fit_tpu_v4 import ROWS
from shardwise.report.engine import Engine, paper_mesh
from shardwise.report.figures import breakdown, cost_vs_latency, layout_map, layout_times
from shardwise.report.sweep import Sweep, run_sweep


def test_engine_plans_what_shardwise_plan_plans():
    """Would catch a cache that changes an answer: the same Plan, field for field, over every mesh of the
    chips (both objectives), and again from the engine's caches."""
    engine = Engine()
    got = {}
    for objective in ("latency", "cost"):
        want = shardwise.plan("palm-8b", chips=8, phase="decode", batch=16, seq=1, context=512, weight_dtype="int8",
                              objective=objective)
        got[objective] = engine.plan("palm-8b", chips=8, phase="decode", batch=16, seq=1, context=512, weights="int8",
                                     objective=objective)
        assert got[objective].to_dict() == want.to_dict()
    again = engine.plan("palm-8b", chips=8, phase="decode", batch=16, seq=1, context=512, weights="int8")
    assert engine.captures == 1  # one prototype served all three
    assert again.to_dict() == got["latency"].to_dict()


@pytest.fixture(scope="module")
def table2_sweep():
    """Table 2's four operating points as experiments/figures.py sweeps them (the paper's meshes and
    named layouts), on 32, 64 and 128 chips so the 64-chip points compete on a frontier."""
    parts = []
    for row in ROWS:
        parts.append(run_sweep(["palm-540b"], chips=[32, 64, 128], batches=[row.batch], phases=[row.phase],
                               weights=[row.weights], context=2048, progress=False))
    return Sweep([r for p in parts for r in p.rows], sum(p.seconds for p in parts))


def test_figure1_picks_table2_layouts(table2_sweep):
    """PAPER.md's Table 2: 2D WS + heads for low-latency prefill, 2D WS + batch for decode, WG-XYZ + batch
    for high-throughput prefill. Would catch a sweep (or a search-space restriction) that plans the
    figure's operating points differently from the paper."""
    for row, point in table2_points(table2_sweep):
        assert point.ok and point.mesh == "4x4x4"
        assert (point.ffn, point.attention) == (row.ffn, row.attention), (row, point.layout)
    for phase, batch, weights in (("decode", 64, "int8"), ("prefill", 1, "int8")):
        front = [r for r in table2_sweep.frontier("palm-540b", phase) if r.weights == weights]
        assert any(r.chips == 64 and r.batch == batch for r in front), f"{phase} B{batch} not on the frontier"


def test_frontier_is_pareto(table2_sweep):
    for phase in ("prefill", "decode"):
        front = table2_sweep.frontier("palm-540b", phase)
        pts = [r for r in table2_sweep.select(model="palm-540b", phase=phase) if r.ok]
        for f in front:
            assert not any(p.latency_ms < f.latency_ms and p.cost_chip_ms_per_token < f.cost_chip_ms_per_token
                           for p in pts)
        assert [f.latency_ms for f in front] == sorted(f.latency_ms for f in front)


def test_sweep_table_files_and_progress(tmp_path, capsys):
    """Would catch: a point with no plan dropped instead of reported, files that do not round-trip, a
    progress bar without an ETA, and worker processes that plan differently from one process."""
    sweep = run_sweep(["palm-540b", "palm-8b"], chips=[8, 64], batches=[16], phases=["decode"], weights=["int8"],
                      context=1024, workers=2)
    err = capsys.readouterr().err
    assert "4/4" in err and "<" in err and "point/s" in err  # tqdm: done/total [elapsed<remaining, rate]
    assert len(sweep.rows) == 4
    [no_fit] = [r for r in sweep.rows if not r.ok]
    assert (no_fit.model, no_fit.chips) == ("palm-540b", 8) and "GiB per chip" in no_fit.why
    same = run_sweep(["palm-540b", "palm-8b"], chips=[8, 64], batches=[16], phases=["decode"], weights=["int8"],
                     context=1024, progress=False)
    assert same.rows == sweep.rows
    rows = list(csv.DictReader(sweep.to_csv(tmp_path / "s.csv").open()))
    assert [r["layout"] for r in rows] == [r.layout for r in sweep.rows]
    data = json.loads(sweep.to_json(tmp_path / "s.json").read_text())
    assert [r["latency_ms"] for r in data["rows"]] == [r.latency_ms for r in sweep.rows]


def test_figures_are_written(table2_sweep, tmp_path):
    engine = Engine()
    written = cost_vs_latency(table2_sweep, tmp_path / "fig1", highlight=[("T2", table2_sweep.rows[0])])
    written += layout_map(table2_sweep, "palm-540b", tmp_path / "map", weights="int8", phases=("decode",))
    row = ROWS[1]
    choice = engine.choice("palm-540b", phase=row.phase, batch=row.batch, seq=row.seq, context=2048,
                           weights=row.weights, mesh=paper_mesh(64), members="paper")
    times = layout_times(choice, 118)
    assert [t.name for t in times if t.chosen] == ["ws2d+batch"]
    assert min((t for t in times if not t.refused), key=lambda t: t.time).chosen
    written += breakdown([("decode", times)], tmp_path / "breakdown")
    assert sorted(p.suffix for p in written) == [".png", ".png", ".png", ".svg", ".svg", ".svg"]
    assert all(p.stat().st_size > 10_000 for p in written)
    with pytest.raises(ShardwiseError, match="no planned point"):
        layout_map(table2_sweep, "palm-8b", tmp_path / "none")


def test_sweep_refuses_bad_arguments():
    with pytest.raises(ShardwiseError, match="unknown model"):
        run_sweep(["palm-9b"], chips=[8], batches=[1], progress=False)
    with pytest.raises(ShardwiseError, match="positive whole numbers"):
        run_sweep(["palm-8b"], chips=[0], batches=[1], progress=False)
    with pytest.raises(ShardwiseError, match="unknown objective"):
        run_sweep(["palm-8b"], chips=[8], batches=[1], objectives=["speed"], progress=False)
    with pytest.raises(ShardwiseError, match="unknown hardware"):
        run_sweep(["palm-8b"], chips=[8], batches=[1], hardware="tpu-v9", progress=False)
    with pytest.raises(ShardwiseError, match="positive number of processes"):
        run_sweep(["palm-8b"], chips=[8], batches=[1], workers=0, progress=False)
    with pytest.raises(ShardwiseError, match="meshes='cube'"):
        Engine().plan("palm-8b", chips=8, meshes="cube")
    with pytest.raises(ShardwiseError, match="cannot write the sweep"):
        Sweep([]).to_csv("/nonexistent-folder/sweep.csv")
    with pytest.raises(ShardwiseError, match="no such column"):
        Sweep([]).select(colour="red")
    with pytest.raises(PlanError, match="weights alone need"):
        Engine().plan("palm-540b", mesh="2x2x2", phase="decode", batch=8, seq=1, context=128)
