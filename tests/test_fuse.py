"""Fused collectives (issue 12, item 2): sibling projections that need the same collective share one.

Checked on simulated ranks: the fused program computes bit-identical numbers to the unfused one (prefill
logits and every decode step's logits), it runs fewer collectives, the bytes each layer executes still
equal the plan's prediction, and the cost model charges a fused collective one fixed latency.
"""

import pytest
import torch

import shardwise
from shardwise.drivers.accounting import compare, compare_generation
from shardwise.drivers.generate import generate
from shardwise.ir.meta import COLLECTIVE
from shardwise.models import build_model, example_inputs
from shardwise.passes.fuse_collectives import unfused
from shardwise.runtime.lower import COLLECTIVE_OPS
from shardwise.runtime.simulate import Trace, sim_group_name

_models: dict[str, torch.nn.Module] = {}


def _model(name: str) -> torch.nn.Module:
    if name not in _models:
        _models[name] = build_model(name)
    return _models[name]


def _prefill(name: str, mesh: str, layouts: str):
    model = _model(name)
    args, kwargs = example_inputs(model, 8, 16)
    plan = shardwise.plan(model, args, kwargs, mesh=mesh, layouts=layouts)
    trace = Trace()
    with torch.no_grad():
        out = plan.program.simulate(args, kwargs, trace=trace)
    out = out if isinstance(out, torch.Tensor) else out.logits
    return plan, out, trace


def _n_collectives(plan) -> int:
    prog = plan.program.emit(0, group_name=sim_group_name).program
    return sum(1 for n in prog.graph.nodes if n.op == "call_function" and n.target in COLLECTIVE_OPS)


CASES = [
    ("llama-tiny", "2x2x1", "ffn=ws2d,attn=heads"),
    ("llama-tiny", "2x2x2", "ffn=ws2d,attn=heads"),
    ("llama-tiny", "2x2x1", "ffn=ws1d,attn=batch"),
    ("llama-tiny", "2x2x2", "ffn=wg_xyz,attn=heads"),
    ("gpt2-tiny", "2x2x1", "ffn=ws2d,attn=heads"),
    ("gpt2-tiny", "2x2x2", "ffn=ws2d,attn=batch"),
    ("ref-tiny-parallel", "2x2x1", "ffn=ws2d,attn=heads"),
    ("ref-tiny-parallel", "2x2x2", "ffn=ws1d,attn=heads"),
]


@pytest.mark.parametrize("name,mesh,layouts", CASES)
def test_fused_prefill_is_bit_identical_and_bytes_exact(name, mesh, layouts):
    plan, got, trace = _prefill(name, mesh, layouts)
    with unfused():
        ref_plan, want, ref_trace = _prefill(name, mesh, layouts)
    assert torch.equal(got, want)
    rows = compare(plan, trace.collectives, plan.program.gm)
    assert rows and all(p == m for _, _, p, m in rows), rows
    # the same bytes per layer and kind as unfused, in no more collectives
    assert rows == compare(ref_plan, ref_trace.collectives, ref_plan.program.gm)
    assert len(trace.collectives) <= len(ref_trace.collectives)


@pytest.mark.parametrize("name,mesh,layouts", [CASES[0], CASES[1], CASES[4], CASES[6]])
def test_fused_decode_is_bit_identical(name, mesh, layouts):
    model = _model(name)
    ids = example_inputs(model, 4, 8)[0][0]
    gen = generate(model, ids, 4, mesh=mesh, layouts=layouts, simulate=True, details=True, record=True)
    with unfused():
        ref = generate(model, ids, 4, mesh=mesh, layouts=layouts, simulate=True, details=True, record=True)
    assert torch.equal(gen.tokens, ref.tokens)
    assert len(gen.logits) == len(ref.logits)
    assert all(torch.equal(a, b) for a, b in zip(gen.logits, ref.logits))
    rows = compare_generation(gen, 4)
    assert all(p == m for _, _, p, m in rows), [r for r in rows if r[2] != r[3]]
    assert len(gen.traces["decode"].collectives) < len(ref.traces["decode"].collectives)


def test_llama_ws2d_shares_kv_all_reduce_and_ffn_reduce_scatter():
    """The issue's example: k and v's all-reduce(x), gate and in's reduce-scatter(x): one each per block."""
    plan, _, trace = _prefill("llama-tiny", "2x2x1", "ffn=ws2d,attn=heads")
    with unfused():
        ref_plan, _, ref_trace = _prefill("llama-tiny", "2x2x1", "ffn=ws2d,attn=heads")
    blocks = 2
    assert len(ref_trace.collectives) - len(trace.collectives) == 2 * blocks
    assert _n_collectives(ref_plan) - _n_collectives(plan) == 2 * blocks
    stacks = [n for n in plan.program.gm.graph.nodes if n.name.startswith("fuse_stack")]
    assert len(stacks) == 2 * blocks
    from shardwise.passes.insert_collectives import collectives

    gm = plan.program.gm
    assert len(collectives(gm)) - len(collectives(gm, fused=True)) == 2 * blocks
    assert sorted((c.kind, c.bytes) for _, c in collectives(gm)) == \
        sorted((c.kind, c.bytes) for _, c in collectives(ref_plan.program.gm))
    kinds = sorted(next(iter(n.users)).meta[COLLECTIVE].kind for n in stacks)
    assert kinds == ["all_reduce"] * blocks + ["reduce_scatter"] * blocks
    # the plan keeps one line per projection (its bytes), so per-layer totals are unchanged
    attn, ref_attn = plan.layer("model.layers.0.self_attn"), ref_plan.layer("model.layers.0.self_attn")
    assert sum(c.kind == "all_reduce" and c.group == "x" for c in attn.collectives) == 2
    assert attn.comm_bytes == ref_attn.comm_bytes


def test_cost_charges_one_latency_per_fused_collective():
    from shardwise.ir.hardware import get_hardware

    plan, _, _ = _prefill("llama-tiny", "2x2x1", "ffn=ws2d,attn=heads")
    with unfused():
        ref_plan, _, _ = _prefill("llama-tiny", "2x2x1", "ffn=ws2d,attn=heads")
    hw = get_hardware(plan.hardware)
    # group x has 2 chips: an all-reduce's fixed terms are latency + 2 rings × 1 hop, a reduce-scatter's 1 hop
    saved = {"model.layers.0.self_attn": hw.collective_latency + 2 * hw.hop_latency,
             "model.layers.0.mlp": hw.collective_latency + hw.hop_latency}
    for layer, fixed in saved.items():
        fused, apart = plan.layer(layer), ref_plan.layer(layer)
        assert fused.comm_bytes == apart.comm_bytes
        assert fused.cost["comm"] == pytest.approx(apart.cost["comm"] - fixed, rel=1e-9, abs=1e-15)


def test_weight_gathers_over_their_first_dim_stay_apart():
    """A weight-gathered layout gathers each weight over its first dim, which needs no copy; stacked with
    its siblings the gather would run over the second, and the ranks' blocks would have to be merged (a
    copy of every gathered weight, 336 ms of a 1.6 s step in bench_layouts): such siblings stay apart."""
    plan, got, trace = _prefill("llama-tiny", "2x2x1", "ffn=wg_xy,attn=heads")
    with unfused():
        ref_plan, want, ref_trace = _prefill("llama-tiny", "2x2x1", "ffn=wg_xy,attn=heads")
    assert torch.equal(got, want)
    from shardwise.passes.insert_collectives import collectives

    gathers = [(n, c) for n, c in collectives(plan.program.gm, fused=True) if c.kind == "all_gather"]
    weights = [c for n, c in gathers if n.args[0].op == "placeholder"]
    assert len(weights) >= 4 * 2 and all(c.dim == 0 for c in weights)  # q, k, v, o, gate, up, down per block
    stacks = [n for n in plan.program.gm.graph.nodes if n.name.startswith("fuse_stack")]
    assert not any(next(iter(n.users)).meta[COLLECTIVE].kind == "all_gather" for n in stacks)
    assert sorted((c.kind, c.bytes) for _, c in collectives(plan.program.gm)) == \
        sorted((c.kind, c.bytes) for _, c in collectives(ref_plan.program.gm))
    # the rank program runs the gathers apart too: no merge after any gather of a weight
    prog = plan.program.emit(0, group_name=sim_group_name).program
    for n in prog.graph.nodes:
        if n.target == torch.ops._c10d_functional.all_gather_into_tensor.default:
            assert n.args[0].op == "placeholder" or n.args[0].target != torch.ops.aten.stack.default


def test_cost_charges_the_stack_of_a_fused_collective():
    """A fused collective's members are stacked first: one copy (read and write) of each member's input,
    priced with the relayout copies where the profile prices them."""
    import dataclasses

    from shardwise.ir.hardware import get_hardware

    hw = dataclasses.replace(get_hardware("tpu-v4"), relayout_copies=True)
    model = _model("llama-tiny")
    args, kwargs = example_inputs(model, 8, 16)
    plan = shardwise.plan(model, args, kwargs, mesh="2x2x1", layouts="ffn=ws2d,attn=heads", hardware=hw)
    with unfused():
        ref = shardwise.plan(model, args, kwargs, mesh="2x2x1", layouts="ffn=ws2d,attn=heads", hardware=hw)
    for layer, kind in [("model.layers.0.self_attn", "all_reduce"), ("model.layers.0.mlp", "reduce_scatter")]:
        fused, apart = plan.layer(layer), ref.layer(layer)
        stacked = [c for c in fused.collectives if c.kind == kind and c.group == "x"]
        assert len(stacked) == 2
        # an all-reduce's charged bytes are twice its input; a reduce-scatter's are its input
        inputs = sum(c.bytes // (2 if kind == "all_reduce" else 1) for c in stacked)
        extra = (fused.cost["copy"] - apart.cost["copy"]) * hw.hbm_bandwidth * hw.hbm_efficiency
        assert extra == pytest.approx(2 * inputs, rel=1e-9)


def test_fused_members_are_priced_at_the_stacked_tensors_size():
    """A fused collective's members run as one collective of their stacked tensor. Where a profile prices
    collectives by size (`Hardware.collectives`, a line per size range), each member's bytes go at the line
    for the stack's size: apart, gate's and up's reduce-scatters are priced on the small sizes' line; fused,
    on the one above it (the stack is twice a member)."""
    import dataclasses

    from shardwise.ir.hardware import get_hardware

    model = _model("llama-tiny")
    args, kwargs = example_inputs(model, 8, 16)
    layer = "model.layers.0.mlp"

    def members(hw):
        plan = shardwise.plan(model, args, kwargs, mesh="2x2x1", layouts="ffn=ws2d,attn=heads", hardware=hw)
        return [c for c in plan.layer(layer).collectives if c.kind == "reduce_scatter" and c.group == "x"]

    with unfused():
        apart = members("tpu-v4")
    assert len(apart) == 2 and apart[0].wire_bytes == apart[1].wire_bytes
    wire = apart[0].wire_bytes
    latency, small, large = 1e-4, 1e9, 1e8  # bytes/s: above 1.5 members' bytes ten times slower
    hw = dataclasses.replace(get_hardware("tpu-v4"), name="by-size", collectives=(
        ("reduce_scatter", 2, latency, small, 1.5 * wire), ("reduce_scatter", 2, latency, large, None)))
    with unfused():
        assert [c.time for c in members(hw)] == pytest.approx([latency + wire / small] * 2)
    fused = members(hw)
    assert sorted(c.time for c in fused) == pytest.approx([wire / large, latency + wire / large])
