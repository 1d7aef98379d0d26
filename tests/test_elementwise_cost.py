"""The cost model's elementwise term (issue 12, item 4): pointwise ops, cats and reductions over activations
stream bytes through memory between the matmuls, serially on a CPU rank. A layout that leaves the
feed-forward's hidden activation whole on every chip runs its silu and product whole on every chip; one that
splits F over every chip runs a quarter of them. Priced only where a profile measures it (cpu-local's
`calibrate`); the TPU and GPU profiles leave it out (their compilers fuse it into the matmuls)."""

import dataclasses

import pytest
import torch

import shardwise
from shardwise.ir.hardware import get_hardware
from shardwise.models import build_model, example_inputs
from shardwise.planning.costing import elementwise_reads
from shardwise.strategies.cost import LayerCost

GB = 1e9


def _hw(bandwidth):
    return dataclasses.replace(get_hardware("tpu-v4"), elementwise_bandwidth=bandwidth)


def test_layer_time_adds_the_elementwise_bytes_over_their_bandwidth():
    cost = LayerCost(flops=1e9, act_bytes=4e6)
    priced, unpriced = cost.times(_hw(2 * GB)), cost.times(_hw(None))
    assert priced["elementwise"] == pytest.approx(2e-3) and unpriced["elementwise"] == 0.0
    assert priced["time"] == pytest.approx(unpriced["time"] + 2e-3)
    assert LayerCost(act_bytes=1.0).add(LayerCost(act_bytes=2.0)).act_bytes == 3.0


def test_which_ops_stream_activations():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(4, 8)
    ops = {
        "silu": g.call_function(torch.ops.aten.silu.default, (x,)),
        "mean": g.call_function(torch.ops.aten.mean.dim, (x, [-1], True)),
        "cat": g.call_function(torch.ops.aten.cat.default, ([x, x], -1)),
        "view": g.call_function(torch.ops.aten.view.default, (x, [32])),
        "mm": g.call_function(torch.ops.aten.mm.default, (x, x)),
    }
    for n in ops.values():
        n.meta["val"] = torch.empty(4, 8)
    assert elementwise_reads(ops["silu"]) is ops["silu"]  # its output, read and written
    assert elementwise_reads(ops["cat"]) is ops["cat"]
    assert elementwise_reads(ops["mean"]) is x  # a reduction reads its input
    assert elementwise_reads(ops["view"]) is None and elementwise_reads(ops["mm"]) is None


def test_a_layout_that_keeps_the_hidden_whole_streams_more():
    """On 4 chips, ws1d splits the feed-forward's F over all of them; bz.exy.f- (E split, F whole) leaves the
    hidden activation whole on every chip: its silu and product stream 4× the bytes, and its time shows it."""
    model = build_model("llama-tiny")
    args, kwargs = example_inputs(model, 8, 16)
    hw = _hw(2 * GB)
    split = shardwise.plan(model, args, kwargs, mesh="2x2x1", layouts="ffn=ws1d,attn=heads", hardware=hw)
    whole = shardwise.plan(model, args, kwargs, mesh="2x2x1", layouts="ffn=bz.exy.f-,attn=heads", hardware=hw)
    mlp = "model.layers.0.mlp"
    a, b = split.layer(mlp).cost["elementwise"], whole.layer(mlp).cost["elementwise"]
    assert a > 0 and b > 2 * a
    # the hidden activation [8, 16, F] in float32: silu and the product write it (and read it) on every chip
    F = model.config.intermediate_size
    hidden = 8 * 16 * F * 4
    assert b - a >= 2 * 2 * hidden * (1 - 1 / 4) / hw.elementwise_bandwidth
    # unpriced on the profiles that fuse it
    plain = shardwise.plan(model, args, kwargs, mesh="2x2x1", layouts="ffn=bz.exy.f-,attn=heads", hardware="tpu-v4")
    assert all(l.cost.get("elementwise", 0.0) == 0.0 for l in plain.layers)
