"""`shardwise calibrate`: measures this machine (2 real gloo ranks) into a profile --hardware cpu-local reads."""

import dataclasses
import json

import shardwise
from shardwise.runtime.calibrate import calibrate


def test_calibrate_writes_a_profile_the_planner_uses(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDWISE_CACHE", str(tmp_path))
    hw, path = calibrate(ranks=2, quick=True)  # every measurement, fewer repeats: what is checked is the profile
    assert path.parent == tmp_path and path.exists()
    loaded = shardwise.get_hardware("cpu-local")
    assert loaded == hw and "--quick" in hw.source
    # measured, so positive and plausible for a CPU: GFLOP/s to TFLOP/s, a loopback link slower than memory
    assert 1e9 < hw.peak_flops < 1e14 and hw.link_bandwidth < hw.hbm_bandwidth and hw.collective_latency >= 0
    # the overlap of a gloo gather with compute: a fraction, with the timings it came from
    assert 0.0 <= hw.comm_overlap <= 1.0 and hw.weight_prefetch and "comm_overlap" in hw.fitted
    # pointwise ops over activations, measured inside a feed-forward: priced on this profile
    assert hw.elementwise_bandwidth and 1e8 < hw.elementwise_bandwidth < 1e12 and "elementwise_bandwidth" in hw.fitted
    # every kind of collective the programs run, measured over the group (2 ranks: the world), and used
    kinds = {k for k, g, *_ in hw.collectives if g == 2}
    assert kinds == {"all_gather", "reduce_scatter", "all_reduce", "all_to_all"} and "collectives" in hw.fitted
    assert all(bandwidth > 0 for _, _, _, bandwidth, _ in hw.collectives)
    for kind in kinds:  # by size: the small sizes' line (latency ≥ 0), then one per larger size, unbounded last
        lines = [(up_to, a) for k, g, a, _, up_to in hw.collectives if (k, g) == (kind, 2)]
        assert len(lines) == 3 and lines[0][1] >= 0 and lines[-1][0] is None
    # the wait after longer compute, at each measured gap (the first the collectives' own context: 0)
    waits = [(gap, extra) for g, gap, extra in hw.sync_waits if g == 2]
    assert len(waits) == 3 and waits[0][1] == 0.0 and all(e >= 0 for _, e in waits) and "sync_waits" in hw.fitted
    assert waits[0][0] < waits[1][0] < waits[2][0]
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


def test_large_collectives_are_priced_by_their_own_lines():
    """Above the sizes one least-squares line is fitted to, each larger size gets the line from the price
    below it to its own time: a collective's price is continuous in its bytes, matches each large
    measurement, never rises slower than the small sizes' line, and an old profile's single line still
    prices any size."""
    import pytest

    from shardwise.ir.hardware import TPU_V4
    from shardwise.runtime.calibrate import LARGE_SIZES, SIZES, fit_lines

    g = 4
    def line(size):  # 1 ms + wire bytes at 1 GB/s
        return 1e-3 + size * (g - 1) / g / 1e9

    slow = {LARGE_SIZES[0]: 3 * line(LARGE_SIZES[0]), LARGE_SIZES[1]: 0.5 * line(LARGE_SIZES[1])}
    rows = [(s, line(s)) for s in SIZES] + sorted(slow.items())
    lines = fit_lines(rows, g)
    hw = dataclasses.replace(TPU_V4, name="lines", collectives=tuple(("all_gather", g, *l) for l in lines))

    def priced(size):
        a, b = hw.collective_fit("all_gather", g, size * (g - 1) / g)
        return a + size * (g - 1) / g / b

    assert priced(SIZES[2]) == pytest.approx(line(SIZES[2]))  # the small sizes' line
    assert priced(LARGE_SIZES[0]) == pytest.approx(slow[LARGE_SIZES[0]])  # each large size as measured ...
    # ... except where that would be cheaper per byte than the line below it: 64 MiB measured faster than 32
    assert priced(LARGE_SIZES[1]) > priced(LARGE_SIZES[0])
    for boundary in (SIZES[-1], LARGE_SIZES[0]):  # continuous where the lines meet
        assert priced(boundary * (1 + 1e-9)) == pytest.approx(priced(boundary), rel=1e-6)
    assert priced(4 * LARGE_SIZES[1]) > priced(LARGE_SIZES[1])  # beyond them, the last line goes on
    # a gather run in pieces (passes/gather_pieces.py) is priced by a piece's line: 4 pieces of 16 MiB each
    # pay the small sizes' latency and bandwidth, not the 64 MiB line's
    from shardwise.ir.collective import Collective
    from shardwise.ir.layout import Layout
    from shardwise.strategies.cost import Comm

    rep = Layout.replicated(2)
    whole = Collective("all_gather", ("x",), rep, rep, elements=LARGE_SIZES[1] // 4, itemsize=4, group_size=g)
    latency, bandwidth = lines[0][:2]
    assert Comm(whole, 4, pieces=4).time(hw) == pytest.approx(4 * latency + whole.wire_bytes / bandwidth)
    assert Comm(whole, 4).time(hw) == pytest.approx(priced(LARGE_SIZES[1]))
    # a fused member (passes/fuse_collectives.py) runs inside the stacked collective: its bytes at the line
    # of the stacked tensor's size, not its own (a 16 MiB member of a 64 MiB fusion pays the 64 MiB line's)
    part = Collective("all_gather", ("x",), rep, rep, elements=SIZES[-1] // 4, itemsize=4, group_size=g)
    alone = Comm(part, 4, fused=True).time(hw)
    inside = Comm(part, 4, fused=True, sized=whole.wire_bytes).time(hw)
    assert alone == pytest.approx(part.wire_bytes / lines[0][1])
    assert inside == pytest.approx(part.wire_bytes / hw.collective_fit("all_gather", g, whole.wire_bytes)[1])
    assert inside > alone
    old = dataclasses.replace(TPU_V4, name="old", collectives=(("all_gather", g, 1e-3, 1e9),))
    assert old.collective_fit("all_gather", g, 1e12) == (1e-3, 1e9)
    with pytest.raises(shardwise.ShardwiseError, match="collectives entry"):
        dataclasses.replace(TPU_V4, name="bad", collectives=(("all_gather", g, 1e-3, 1e9, -5.0),))


def test_a_profile_that_is_not_json_is_refused(tmp_path, monkeypatch):
    import pytest

    monkeypatch.setenv("SHARDWISE_CACHE", str(tmp_path))
    for text in ("nope", "[1, 2]"):
        (tmp_path / "cpu-local.json").write_text(text)
        with pytest.raises(shardwise.ShardwiseError, match="hardware profile"):
            shardwise.get_hardware("cpu-local")


def test_sync_waits_are_interpolated_by_gap_and_added_to_each_collective_once():
    """`sync_waits`: linear in the compute gap between the measured gaps, the edge's beyond them, the largest
    measured group at most a collective's size for others; the cost model adds the wait at busy / (the
    layer's collectives, a fusion once) to each collective's time."""
    import pytest

    from shardwise.ir.collective import Collective
    from shardwise.ir.hardware import TPU_V4
    from shardwise.ir.layout import Layout
    from shardwise.strategies.cost import Comm, LayerCost

    waits = ((4, 2e-3, 0.0), (4, 10e-3, 2e-3), (4, 40e-3, 3e-3), (2, 2e-3, 0.0), (2, 10e-3, 1e-3))
    hw = dataclasses.replace(TPU_V4, name="waits", sync_waits=waits, weight_prefetch=False)
    assert hw.sync_wait(4, 1e-3) == 0.0 and hw.sync_wait(4, 6e-3) == pytest.approx(1e-3)
    assert hw.sync_wait(4, 25e-3) == pytest.approx(2.5e-3) and hw.sync_wait(4, 1.0) == pytest.approx(3e-3)
    assert hw.sync_wait(2, 1.0) == pytest.approx(1e-3)  # beyond the gaps measured: the last
    assert hw.sync_wait(8, 25e-3) == hw.sync_wait(4, 25e-3) and hw.sync_wait(1, 1.0) == 0.0
    assert json.loads(hw.to_json())["sync_waits"] and type(hw).from_json(hw.to_json()) == hw

    rep = Layout.replicated(2)
    world = Collective("all_gather", ("x", "y"), rep, rep, elements=1 << 16, itemsize=4, group_size=4)
    pair = Collective("reduce_scatter", ("x",), rep, rep, elements=1 << 16, itemsize=4, group_size=2)
    flops = 0.05 * hw.peak_flops * hw.flops_efficiency  # 50 ms of compute: gaps of 25 ms between 2 collectives
    comms = [Comm(world, 4), Comm(world, 4, fused=True), Comm(pair, 4)]
    with_waits = LayerCost(flops=flops, comm=comms).times(hw)
    without = LayerCost(flops=flops, comm=comms).times(dataclasses.replace(hw, sync_waits=()))
    assert with_waits["comm"] - without["comm"] == pytest.approx(hw.sync_wait(4, 25e-3) + hw.sync_wait(2, 25e-3))
    assert with_waits["time"] - without["time"] == pytest.approx(with_waits["comm"] - without["comm"])
    for bad in [((4, 1e-3),), ((4, -1.0, 0.0),), ((4, 1e-3, 0.0), (4, 1e-3, 1e-3))]:
        with pytest.raises(shardwise.ShardwiseError, match="sync_waits"):
            dataclasses.replace(TPU_V4, name="bad", sync_waits=bad)
