"""Matmul FLOP/s by shape (issue 12, item 4): a profile may carry what its chip's matmul reaches at a grid of
local shapes (`Hardware.matmul_shapes`; cpu-local's `calibrate` measures it), and the cost model prices each
matmul at its own shape's FLOP/s instead of one peak for all. Without a grid (the TPU and GPU profiles)
nothing changes."""

import dataclasses
import itertools
import math

import pytest

import shardwise
from shardwise.ir.hardware import get_hardware
from shardwise.models import example_inputs
from shardwise.strategies.cost import LayerCost

MS, KNS = (16, 128, 1024), (256, 1024, 4096)


def _power_law(m, k, n):  # log FLOP/s linear in log2 of each dim: what trilinear interpolation in log2 gives exactly
    return 1e10 * m**0.5 * k**0.25 / n**0.125


def _grid(flops=_power_law):
    return tuple((m, k, n, flops(m, k, n)) for m, k, n in itertools.product(MS, KNS, KNS))


def _hw(grid):
    return dataclasses.replace(get_hardware("tpu-v4"), name="shaped", matmul_shapes=grid)


def test_flops_by_shape_interpolate_in_log_space_and_clamp_to_the_grid():
    hw = _hw(_grid())
    for shape in [(16, 256, 256), (128, 1024, 4096), (1024, 4096, 256)]:  # grid points: as measured
        assert hw.matmul_flops(*shape) == pytest.approx(_power_law(*shape), rel=1e-12)
    for shape in [(64, 512, 2000), (300, 300, 3000), (17, 4095, 257)]:  # between them: the power law exactly
        assert hw.matmul_flops(*shape) == pytest.approx(_power_law(*shape), rel=1e-9)
    # beyond the grid, its edge: a larger m or a smaller k prices like the nearest measured one
    assert hw.matmul_flops(8192, 512, 2000) == pytest.approx(_power_law(1024, 512, 2000), rel=1e-9)
    assert hw.matmul_flops(64, 8, 2000) == pytest.approx(_power_law(64, 256, 2000), rel=1e-9)
    assert hw.matmul_flops(0, 0, 0) == pytest.approx(_power_law(16, 256, 256), rel=1e-9)
    plain = get_hardware("tpu-v4")  # no grid: the peak, discounted, for every shape
    assert plain.matmul_flops(16, 256, 256) == plain.peak_flops * plain.flops_efficiency


def test_a_layer_prices_its_matmuls_at_their_shapes():
    hw = _hw(_grid())
    f1, f2, rest = 2.0 * 64 * 512 * 2000, 2.0 * 1024 * 4096 * 4096, 3e9  # two matmuls and an attention core
    cost = LayerCost(flops=f1 + f2 + rest, gemms=[(f1, 64, 512, 2000), (f2, 1024, 4096, 4096)])
    want = f1 / _power_law(64, 512, 2000) + f2 / _power_law(1024, 4096, 4096) + rest / (hw.peak_flops * 0.75)
    assert cost.times(hw)["compute"] == pytest.approx(want, rel=1e-12)
    assert cost.add(LayerCost(flops=f1, gemms=[(f1, 64, 512, 2000)])).times(hw)["compute"] == pytest.approx(
        want + f1 / _power_law(64, 512, 2000), rel=1e-12)
    # a profile without the grid prices the same layer at its peak
    assert cost.times(get_hardware("tpu-v4"))["compute"] == pytest.approx((f1 + f2 + rest) / (hw.peak_flops * 0.75))


def test_the_planner_prices_a_models_matmuls_by_their_local_shapes(tiny):
    """End to end: a grid at the profile's own discounted peak leaves every plan's latency as it was; one
    at half of it doubles the compute of every feed-forward (matmuls only)."""
    m = tiny("llama-tiny")
    args, kwargs = example_inputs(m, 4, 16)
    base = get_hardware("tpu-v4")
    peak = base.peak_flops * base.flops_efficiency

    def plan(hw):
        return shardwise.plan(m, args, kwargs, mesh="1x2x2", layouts="ffn=ws2d,attn=heads", hardware=hw)

    same, half, ref = plan(_hw(_grid(lambda *_: peak))), plan(_hw(_grid(lambda *_: peak / 2))), plan(base)
    assert same.totals.latency == pytest.approx(ref.totals.latency, rel=1e-12)
    ffn = [(h, r) for h, r in zip(half.layers, ref.layers) if r.kind == "ffn"]
    assert ffn and all(h.cost["compute"] == pytest.approx(2 * r.cost["compute"], rel=1e-9) for h, r in ffn)
    def compute(p):
        return sum(l.cost["compute"] * l.count for l in p.layers)

    assert compute(half) > compute(ref) == pytest.approx(compute(same), rel=1e-12)


def test_a_broken_grid_is_refused_naming_it():
    grid = _grid()
    with pytest.raises(shardwise.ShardwiseError, match="not one for each point"):
        _hw(grid[:-1])  # a grid point missing
    with pytest.raises(shardwise.ShardwiseError, match="all positive"):
        _hw(grid[:-1] + ((1024, 4096, 4096, -1.0),))
    assert math.isclose(_hw(grid).matmul_flops(16, 256, 256), grid[0][3])
