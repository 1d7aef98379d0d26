"""The looped collective matmul (passes/collective_matmul.py), a layout option: plan(..., collective_matmul=True).

  numbers    on simulated ranks, looped programs equal the unsharded model within the numerics tests'
             1e-5 (float32 logits of magnitude ~1: the loop sums a contraction block by block, a
             reordering of the same float32 sums, a few units of rounding) for 1D and 2D weight-stationary
             and weight-gathered layouts, meshes of ring size 2, 4 and 8, a Llama, a decoder with a
             parallel block (GPT-2's Conv1D matmuls are addmm, not linear: not looped)
  bytes      every layer's executed collective bytes equal the plan's prediction, as unlooped
  structure  each looped collective becomes g − 1 ring all-to-alls, each sending its whole input to one
             member; the collectives looped in the rank program are exactly those the cost model prices as
             looped; scheduled, a partial matmul runs while each ring step is in flight
  cost       priced from the profile: hidden by comm_overlap, g − 1 fixed latencies
"""

import pytest
import torch
import torch.fx as fx

import shardwise
from shardwise.drivers.accounting import compare
from shardwise.ir.hardware import get_hardware
from shardwise.ir.mesh import Mesh
from shardwise.ir.meta import COLLECTIVE, LAYERS, LOOP
from shardwise.models import example_inputs
from shardwise.passes.collective_matmul import looped_steps
from shardwise.passes.fuse_collectives import plan_fusions
from shardwise.planning.apply import apply, choices_for
from shardwise.planning.candidate import Candidate
from shardwise.planning.program import capture_program, emit_rank
from shardwise.runtime import kernels
from shardwise.runtime.lower import COLLECTIVE_OPS, c10d
from shardwise.runtime.simulate import Trace, sim_group_name
from shardwise.strategies.family import parse_ffn

A2A = c10d.all_to_all_single.default
WAIT = c10d.wait_tensor.default
ATOL = 1e-5

CASES = [("ref-tiny", "2x2x1", "ffn=ws1d,attn=heads"), ("ref-tiny", "2x2x2", "ffn=ws2d,attn=batch"),
         ("llama-tiny", "2x2x2", "ffn=wg_x,attn=heads"), ("llama-tiny", "1x1x2", "ffn=ws1d,attn=batch"),
         ("ref-tiny-parallel", "2x2x1", "ffn=ws2d,attn=heads")]


def _logits(x):
    return x if isinstance(x, torch.Tensor) else x.logits


def _plan(tiny, name, mesh, layouts, **kw):
    m = tiny(name)
    args, kwargs = example_inputs(m, 8, 16)
    return m, args, kwargs, shardwise.plan(m, args, kwargs, mesh=mesh, layouts=layouts, **kw)


def _loops(prog: fx.GraphModule) -> list[tuple[str, int]]:
    """(kind, g) of every loop in a rank program (its first ring step carries it)."""
    return [n.meta[LOOP][:2] for n in prog.graph.nodes if n.target is A2A and LOOP in n.meta and n.meta[LOOP][2]]


@pytest.mark.parametrize("name,mesh,layouts", CASES)
def test_looped_equals_the_model_and_the_plans_bytes(tiny, name, mesh, layouts):
    m, args, kwargs, plan = _plan(tiny, name, mesh, layouts, collective_matmul=True)
    assert plan.settings.collective_matmul and plan.program.collective_matmul
    programs = [emit_rank(plan.program.gm, plan.mesh, r, group_name=sim_group_name, collective_matmul=True)
                for r in range(plan.mesh.size)]
    assert _loops(programs[0]), "nothing was looped"
    trace = Trace()
    with torch.no_grad():
        want = _logits(m(*args, **kwargs))
        got = _logits(plan.program.simulate(args, kwargs, trace=trace, programs=programs))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    rows = compare(plan, trace.collectives, plan.program.gm)
    assert rows and all(p == q for _, _, p, q in rows), [r for r in rows if r[2] != r[3]]


@pytest.mark.parametrize("name,mesh,layouts", CASES)
def test_what_the_program_loops_is_what_the_cost_model_prices(tiny, name, mesh, layouts):
    m = tiny(name)
    args, kwargs = example_inputs(m, 8, 16)
    gm = capture_program(m, args, kwargs)
    msh = Mesh.parse(mesh)
    ffn, attn = (part.split("=")[1] for part in layouts.split(","))
    _, _, _, plan = _plan(tiny, name, mesh, layouts)
    head = {"head": next(l.choice for l in plan.layers if l.kind == "head")}  # as the plan chose it, by cost
    conversions = apply(gm, msh, choices_for(gm.meta[LAYERS], [Candidate(parse_ffn(ffn), attn, msh)], head))
    fused = {id(c) for f in plan_fusions(gm, conversions) for c in f.members}
    loops = looped_steps(conversions, msh, fused)
    priced = sorted((c.steps[i].kind, c.steps[i].group_size) for c in conversions for i in loops.get(id(c), ()))
    looped = sorted(_loops(emit_rank(plan.program.gm, plan.mesh, 0, group_name=sim_group_name,
                                     collective_matmul=True)))
    assert priced and priced == looped


def test_ring_steps_send_everything_to_one_member_and_overlap_a_partial_matmul(tiny):
    _, _, _, plan = _plan(tiny, "ref-tiny", "2x2x1", "ffn=ws1d,attn=heads")
    plain = emit_rank(plan.program.gm, plan.mesh, 1, group_name=sim_group_name)
    prog = emit_rank(plan.program.gm, plan.mesh, 1, group_name=sim_group_name, collective_matmul=True)
    loops = _loops(prog)
    kinds = [COLLECTIVE_OPS[n.target] for n in prog.graph.nodes if n.target in COLLECTIVE_OPS]
    kinds_plain = [COLLECTIVE_OPS[n.target] for n in plain.graph.nodes if n.target in COLLECTIVE_OPS]
    # every loop over g members replaces one collective by g − 1 ring steps
    assert len(kinds) - kinds.count("all_to_all") == len(kinds_plain) - len(loops)
    assert kinds.count("all_to_all") == sum(g - 1 for _, g in loops)
    order = {n: i for i, n in enumerate(prog.graph.nodes)}
    steps = [n for n in prog.graph.nodes if n.target is A2A and LOOP in n.meta]
    for a2a in steps:
        wait = next(iter(a2a.users))
        assert wait.target is WAIT
        between = [n for n in prog.graph.nodes if order[a2a] < order[n] < order[wait]]
        assert any(n.target in (torch.ops.aten.linear.default, kernels.linear) for n in between), a2a.name
    x = torch.randn(3, 5)
    from shardwise.runtime.lower import ring_splits

    assert ring_splits(x, 4, 1, -1) == ([0, 0, 3, 0], [3, 0, 0, 0])  # from member 2, to member 0
    assert ring_splits(x, 4, 3, 1) == ([0, 0, 3, 0], [3, 0, 0, 0])  # from member 2, to member 0 (wraps)


def test_cost_prices_ring_latencies_and_the_measured_overlap(tiny):
    """On the TPU profile (comm_overlap 1) a looped layer hides ring steps behind compute; with
    comm_overlap 0 nothing is hidden and the loop only adds g − 2 fixed latencies per collective."""
    from dataclasses import replace

    from shardwise.strategies.cost import Comm, LayerCost

    _, _, _, plan = _plan(tiny, "ref-tiny", "2x2x1", "ffn=ws1d,attn=heads")
    step = next(c for c in _collectives(plan) if c.kind == "all_gather" and c.group_size == 4)
    hw = get_hardware("tpu-v4")
    busy = LayerCost(flops=hw.peak_flops * hw.flops_efficiency * 1e-3)  # 1 ms of compute
    plain = replace(busy, comm=[Comm(step, 2)]).times(hw)
    looped = replace(busy, comm=[Comm(step, 2, looped=True)]).times(hw)
    ring = Comm(step, 2, looped=True).time(hw)
    assert ring == pytest.approx(Comm(step, 2).time(hw) + 2 * hw.collective_latency)
    assert looped["time"] == pytest.approx(plain["time"] - min(ring, 1e-3) + ring - Comm(step, 2).time(hw))
    none = replace(hw, comm_overlap=0.0)
    assert replace(busy, comm=[Comm(step, 2, looped=True)]).times(none)["time"] == pytest.approx(
        replace(busy, comm=[Comm(step, 2)]).times(none)["time"] + 2 * hw.collective_latency)


def _collectives(plan):
    return [n.meta[COLLECTIVE] for n in plan.program.gm.graph.nodes if COLLECTIVE in n.meta]


def test_looped_on_real_gloo_ranks(tiny):
    """The ring steps on real process groups (4 gloo processes): the uneven all-to-alls of each loop run,
    the logits equal the model's, and every layer's executed bytes equal the plan's."""
    layouts = "ffn=ws1d,attn=heads"
    report = shardwise.verify("llama-tiny", mesh="2x2x1", layouts=layouts, nproc=4, bytes=True,
                              collective_matmul=True)
    assert report.ranks == "gloo" and report.ok, str(report)
    assert report.max_abs_diff <= ATOL
    assert report.bytes_rows and all(p == m for _, _, p, m in report.bytes_rows)
    # the program the ranks ran loops (the same plan, emitted here for rank 0)
    _, _, _, plan = _plan(tiny, "llama-tiny", "2x2x1", layouts, collective_matmul=True)
    assert _loops(emit_rank(plan.program.gm, plan.mesh, 0, group_name=sim_group_name, collective_matmul=True))


def test_looped_verify_is_for_prefill():
    with pytest.raises(shardwise.ShardwiseError, match="prefill"):
        shardwise.verify("llama-tiny", mesh="1x1x2", phase="decode", collective_matmul=True)
