"""A parallel block's feed-forward beside its attention's own collectives (strategies/cost.py `Branch`).

  cost     branch_overlap · min(the attention's collectives the feed-forward neither reads nor feeds, the
           feed-forward's spare busy time) comes off the attention's time ("beside"); the feed-forward's
           own time is unchanged; None takes comm_overlap; TPU v4 prices none (its fit did not)
  search   on the prototype, a parallel block's time drops by exactly that; a serial block's not at all
The rank program's side (the collectives priced so are the attention's own, and the feed-forward runs
inside them) is in test_schedule.py; the predicted trace's (the hidden part drawn in the feed-forward's
slice) in test_report_trace.py.
"""

import dataclasses

import pytest

import shardwise
from shardwise.ir.collective import Collective
from shardwise.ir.hardware import A100_80G, H100, H200, PROFILES, TPU_V4
from shardwise.ir.layout import Layout
from shardwise.ir.meta import LAYERS
from shardwise.models import example_inputs
from shardwise.strategies.cost import Branch, Comm, LayerCost


def _a2a(hw, seconds: float) -> Comm:
    bw = hw.collective_bandwidth(("x",))
    r = Layout.replicated(2)
    return Comm(Collective("all_to_all", ("x",), r, r, dim=0, elements=int(seconds * bw), itemsize=1, group_size=2,
                           axes=("x",)), 1)


def test_cost_hides_a_parallel_attention_collective_behind_the_ffn():
    """branch_overlap · min(the collective, the feed-forward's busy time) is hidden; the feed-forward's own time
    is unchanged; None takes comm_overlap."""
    hw = dataclasses.replace(TPU_V4, collective_latency=0.0, hop_latency=0.0, branch_overlap=None)
    comm = _a2a(hw, 2e-3)
    ms = hw.peak_flops * hw.flops_efficiency * 1e-3  # FLOPs of 1 ms
    for ffn_ms in (0.25, 4.0):  # shorter than the collective, longer
        ffn = LayerCost(flops=ffn_ms * ms)
        attn = LayerCost(flops=0.5 * ms, comm=[comm], branches=[Branch((comm,), ffn, "ffn")])
        alone = dataclasses.replace(attn, branches=[])
        for overlap in (1.0, 0.0, 0.5):
            hidden = overlap * min(comm.time(hw), ffn_ms * 1e-3)
            for h in (dataclasses.replace(hw, comm_overlap=overlap),  # None: comm_overlap
                      dataclasses.replace(hw, branch_overlap=overlap)):
                assert attn.times(h)["time"] == pytest.approx(alone.times(h)["time"] - hidden)
                assert attn.times(h)["beside"] == pytest.approx(hidden)
        assert ffn.times(hw) == LayerCost(flops=ffn_ms * ms).times(hw)
        assert attn.add(LayerCost()).times(hw) == attn.times(hw)  # parts summed keep the branch
        assert attn.times(hw, overlap=True) == alone.times(hw, overlap=True)


def test_spare_is_what_the_ffn_does_not_spend_on_its_own_collectives():
    """A feed-forward's looped ring steps use its busy time first: only the rest hides the attention's."""
    hw = dataclasses.replace(A100_80G, collective_latency=0.0, hop_latency=0.0)
    ms = hw.peak_flops * hw.flops_efficiency * 1e-3
    own = dataclasses.replace(_a2a(hw, 1e-3), looped=True)
    ffn = LayerCost(flops=3 * ms, comm=[own])
    assert ffn.spare(hw) == pytest.approx(3e-3 - own.time(hw))
    comm = _a2a(hw, 5e-3)
    attn = LayerCost(comm=[comm], branches=[Branch((comm,), ffn, "ffn")])
    assert attn.times(hw)["beside"] == pytest.approx(ffn.spare(hw))


def test_tpu_v4_prices_no_branch_overlap():
    """TPU v4's fit priced none: 0, with a note; the GPU profiles take comm_overlap (assumed). PaLM 540B's
    parallel blocks still carry the structure (which collectives the feed-forward runs beside), priced 0."""
    assert TPU_V4.branch_overlap == 0.0 and "fit" in TPU_V4.fitted["branch_overlap"]
    for hw in (A100_80G, H100, H200):
        assert hw.branch_overlap is None and hw.comm_overlap == 1.0 and "assumed" in hw.fitted["branch_overlap"]
    assert set(PROFILES) == {"tpu-v4", "a100-80g", "h100", "h200"}
    comm = _a2a(TPU_V4, 1e-3)
    attn = LayerCost(comm=[comm], branches=[Branch((comm,), LayerCost(flops=1e15), "ffn")])
    assert attn.times(TPU_V4) == {**dataclasses.replace(attn, branches=[]).times(TPU_V4), "beside": 0.0}
    plan = shardwise.plan("palm-540b", mesh="4x4x4", phase="decode", batch=64, seq=1, context=2080, weight_dtype="int8")
    assert all(l.cost.get("beside", 0.0) == 0.0 for l in plan.layers)
    assert any(r.beside for l in plan.layers for r in l.collectives)


def test_search_prices_the_parallel_ffn_overlap(tiny):
    """On the prototype: a parallel block's time drops, from branch_overlap 0 to 1, by min(the attention's own
    collectives, the feed-forward's busy time) per block (here its heads→batch all-to-alls); a serial block's
    not at all (no weight gathers under ws1d)."""
    from shardwise.ir.mesh import Mesh
    from shardwise.planning.apply import apply, choices_for
    from shardwise.planning.candidate import Candidate
    from shardwise.planning.costing import layer_costs
    from shardwise.planning.program import capture_program
    from shardwise.planning.search import evaluate
    from shardwise.strategies.cost import Precision
    from shardwise.strategies.family import parse_ffn

    mesh, member = Mesh.parse("1x1x4"), parse_ffn("ws1d")
    on, off = dataclasses.replace(TPU_V4, branch_overlap=1.0), TPU_V4
    for name in ("ref-tiny-parallel", "ref-tiny"):
        m = tiny(name)
        gm = capture_program(m, *example_inputs(m, 8, 16))
        layers = gm.meta[LAYERS]

        off_time, on_time = (evaluate(gm, mesh, member, "batch", hw=hw, precision=Precision(), n_blocks=1,
                                      overlap=False, forced={}).block_time() for hw in (off, on))
        drop = off_time - on_time
        if name == "ref-tiny":
            assert drop == 0.0
            continue
        costs = layer_costs(gm, mesh, apply(gm, mesh, choices_for(layers, [Candidate(member, "batch", mesh)], {})),
                            Precision())
        want = 0.0
        for b in layers.blocks:
            own = [c for c in costs[b.attention.name].comm if c.step.kind == "all_to_all"]
            ffn = costs[b.ffn.name].times(on)
            assert own and not any(c.weight for c in costs[b.ffn.name].comm)
            assert [br.layer for br in costs[b.attention.name].branches] == [b.ffn.name]
            want += min(sum(c.time(on) for c in own), max(ffn["compute"], ffn["memory"]))
        assert drop > 0 and drop == pytest.approx(want, rel=1e-9)
