"""`shardwise calibrate`: measures this machine (2 real gloo ranks) into a profile --hardware cpu-local reads."""

import shardwise
from shardwise.runtime.calibrate import calibrate


def test_calibrate_writes_a_profile_the_planner_uses(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDWISE_CACHE", str(tmp_path))
    hw, path = calibrate(ranks=2)
    assert path.parent == tmp_path and path.exists()
    loaded = shardwise.get_hardware("cpu-local")
    assert loaded == hw
    # measured, so positive and plausible for a CPU: GFLOP/s to TFLOP/s, a loopback link slower than memory
    assert 1e9 < hw.peak_flops < 1e14 and hw.link_bandwidth < hw.hbm_bandwidth and hw.collective_latency >= 0
    # the overlap of a gloo gather with compute: a fraction, with the timings it came from
    assert 0.0 <= hw.comm_overlap <= 1.0 and hw.weight_prefetch and "comm_overlap" in hw.fitted
    # pointwise ops over activations, measured inside a feed-forward: priced on this profile
    assert hw.elementwise_bandwidth and 1e8 < hw.elementwise_bandwidth < 1e12 and "elementwise_bandwidth" in hw.fitted
    # every kind of collective the programs run, measured over the group (2 ranks: the world), and used
    kinds = {k for k, g, _, _ in hw.collectives if g == 2}
    assert kinds == {"all_gather", "reduce_scatter", "all_reduce", "all_to_all"} and "collectives" in hw.fitted
    assert all(latency >= 0 and bandwidth > 0 for _, _, latency, bandwidth in hw.collectives)
    from shardwise.ir.collective import Collective
    from shardwise.ir.layout import Layout
    from shardwise.strategies.cost import collective_time

    rep = Layout.replicated(2)
    step = Collective("all_reduce", ("z",), rep, rep, elements=1 << 20, itemsize=4, group_size=2)
    latency, bandwidth = hw.collective_fit("all_reduce", 2)
    assert collective_time(step, 4, hw) == latency + step.wire_bytes / bandwidth
    plan = shardwise.plan("llama-tiny", mesh="1x1x2", hardware="cpu-local")
    assert plan.hardware == "cpu-local" and plan.totals.latency > 0


def test_missing_cpu_local_profile_says_to_calibrate(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDWISE_CACHE", str(tmp_path))
    try:
        shardwise.get_hardware("cpu-local")
    except shardwise.ShardwiseError as e:
        assert "shardwise calibrate" in str(e)
    else:
        raise AssertionError("expected a ShardwiseError")


def test_a_broken_profile_is_refused_naming_the_field(tmp_path, monkeypatch):
    """A profile is a file a user may edit: a wrong value or an unknown field is a ShardwiseError naming
    it, not a TypeError from inside the cost model."""
    import json

    import pytest

    from shardwise.ir.hardware import TPU_V4

    good = json.loads(TPU_V4.to_json())
    monkeypatch.setenv("SHARDWISE_CACHE", str(tmp_path))
    for change, named in [({"elementwise_bandwidth": "fast"}, "elementwise_bandwidth"),
                          ({"comm_overlap": 1.5}, "comm_overlap"), ({"peak_flops": 0}, "peak_flops"),
                          ({"peak_flop": 1e12}, "peak_flop")]:
        (tmp_path / "cpu-local.json").write_text(json.dumps({**good, "name": "cpu-local", **change}))
        with pytest.raises(shardwise.ShardwiseError, match=named):
            shardwise.plan("llama-tiny", mesh="1x1x2", hardware="cpu-local")
    (tmp_path / "cpu-local.json").write_text(json.dumps({**good, "name": "cpu-local", "elementwise_bandwidth": None}))
    assert shardwise.get_hardware("cpu-local").elementwise_bandwidth is None
