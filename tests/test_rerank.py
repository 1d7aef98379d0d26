"""benchmarks/rerank.py: saved bench_layouts measurements ranked again by a profile and its variants."""

import json

import pytest
import torch

import shardwise
from shardwise.benchmarks.bench_layouts import MESH, build_model
from shardwise.benchmarks.rerank import rerank, variants
from shardwise.ir.hardware import get_hardware


def _profile():
    """tpu-v4 with a matmul grid and a kind measured by size (two lines), as cpu-local has them."""
    import dataclasses
    import itertools

    grid = tuple((m, k, n, 1e14 * (1 + m / 4096)) for m, k, n in itertools.product((16, 1024), (256, 4096), (256, 4096)))
    lines = (("all_gather", 4, 1e-5, 1e11, 1e6), ("all_gather", 4, -1e-4, 1e10, None))
    return dataclasses.replace(get_hardware("tpu-v4"), name="measured", matmul_shapes=grid, collectives=lines)


def test_the_variants_drop_exactly_the_grid_or_the_size_lines():
    hw = _profile()
    got = variants(hw)
    assert got["profile"] is hw
    assert got["no shapes"].matmul_shapes == () and got["no shapes"].collectives == hw.collectives
    assert got["no sizes"].matmul_shapes == hw.matmul_shapes
    assert got["no sizes"].collectives == (("all_gather", 4, 1e-5, 1e11, None),)  # the small sizes' line, any size
    assert got["neither"].matmul_shapes == () and got["neither"].collectives == got["no sizes"].collectives


def test_a_run_measured_as_predicted_ranks_perfectly(tmp_path, monkeypatch):
    """A saved run whose "measured" times are the profile's own predictions (planned as bench_layouts plans
    them) ranks at ρ = 1 on that profile: rerank plans the same layouts the same way."""
    hw = _profile()
    model, ids = build_model(), torch.zeros(4, 4, dtype=torch.long)
    rows = []
    for member, attn in [("ws1d", "heads"), ("wg_xy", "heads"), ("ws2d", "batch")]:
        plan = shardwise.plan(model, (ids,), {}, mesh=MESH, hardware=hw, layouts={"ffn": member, "attention": attn})
        rows.append({"member": member, "attention": attn, "predicted_s": 1.0 + len(rows), "measured_s": plan.totals.latency})
    assert len({r["measured_s"] for r in rows}) == 3  # distinct, so the ranking means something
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"cases": [{"tokens": [4, 4], "rows": rows}]}))
    got = rerank([run], hw)[("run.json", "4x4")]
    assert got["profile"] == pytest.approx(1.0)
    assert set(got) == {"saved", "profile", "no shapes", "no sizes", "neither"}


def test_a_file_that_is_not_a_saved_run_is_refused_naming_it(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1}')
    for path, said in [(bad, "not a saved bench_layouts run"), (tmp_path / "missing.json", "cannot be read")]:
        with pytest.raises(shardwise.ShardwiseError, match=said) as e:
            rerank([path], _profile())
        assert path.name in str(e.value)
