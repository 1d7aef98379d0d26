"""A parallel block's feed-forward beside its attention's own collectives (strategies/cost.py `Branch`).

  cost     branch_overlap · min(the attention's collectives the feed-forward neither reads nor feeds, the
           feed-forward's spare busy time) comes off the attention's time ("beside"); the feed-forward's
           own time is unchanged; None takes comm_overlap; TPU v4 prices none (its fit did not)
  search   on the prototype, a parallel block's time drops by exactly that; a serial block's not at all;
           the collectives priced so are those the rank program's attention has of its own
  trace    the hidden part is a child of the feed-forward's busy slice (same block), the rest stays in the
           attention's slice; every layer still lasts its planned time and check_trace passes
"""

import dataclasses

import pytest

import shardwise
from shardwise.ir.collective import Collective
from shardwise.ir.hardware import A100_80G, H100, H200, PROFILES, TPU_V4
from shardwise.ir.layout import Layout
from shardwise.ir.meta import LAYERS
from shardwise.models import example_inputs
from shardwise.report.trace import PREDICTED_TID, check_trace, lanes, predicted_trace
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
    collectives, the feed-forward's busy time) per block (here its heads→batch all-to-alls, the collectives
    the rank program's attention has of its own); a serial block's not at all (no weight gathers under ws1d)."""
    from shardwise.ir.mesh import Mesh
    from shardwise.planning.apply import apply, choices_for
    from shardwise.planning.candidate import Candidate
    from shardwise.planning.costing import layer_costs
    from shardwise.planning.program import capture_program, emit_rank
    from shardwise.planning.search import evaluate
    from shardwise.runtime.lower import COLLECTIVE_OPS
    from shardwise.runtime.simulate import sim_group_name
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
    m = tiny("ref-tiny-parallel")
    plan = shardwise.plan(m, *example_inputs(m, 8, 16), mesh="1x1x4", layouts="ffn=ws1d,attn=batch")
    prog = emit_rank(plan.program.gm, plan.mesh, 0, group_name=sim_group_name, schedule=False)
    blocks = plan.program.gm.meta[LAYERS].blocks
    attn = {p.node for b in blocks for p in b.attention.projections.values()}
    ffn = {p.node for b in blocks for p in b.ffn.projections.values()}
    own = {COLLECTIVE_OPS[c.target] for c in prog.graph.nodes if c.target in COLLECTIVE_OPS
           and (up := _ancestors(c)) & attn and not up & ffn}
    assert own == {"all_to_all"}
    assert {r.kind for l in plan.layers for r in l.collectives if r.beside} == {"all_to_all"}


def _ancestors(n) -> set[str]:
    seen, grow = set(), [n]
    while grow:
        for a in grow.pop().all_input_nodes:
            if a.name not in seen:
                seen.add(a.name)
                grow.append(a)
    return seen


def _top_level(slices):
    out, end = [], 0.0
    for e in slices:
        if e["ts"] >= end - 0.01:
            out.append(e)
            end = e["ts"] + e["dur"]
    return out


def _check(plan):
    """check_trace passes, every layer lasts its planned time, holds its own slices, and its collectives' parts
    add up: what a parallel feed-forward hides of its attention's is a child of that one's busy slice."""
    trace = predicted_trace(plan, ranks=[0])
    check_trace(trace)
    lane = lanes(trace)[(0, PREDICTED_TID)]
    layers = _top_level(lane)
    assert [e["dur"] for e in layers] == pytest.approx([l.cost["time"] * 1e6 for l in plan.layers for _ in range(l.count)],
                                                       rel=1e-6, abs=2e-3)
    collectives = [e for e in lane if e["cat"] == "collective"]
    assert sum(e["dur"] for e in collectives) == pytest.approx(
        sum(l.cost["comm"] * l.count for l in plan.layers) * 1e6, abs=5e-4 * len(collectives))  # each as priced (ns)
    guests = [e for e in collectives if "layer" in e["args"]]
    for e in layers:
        inside = [c for c in lane if e["ts"] <= c["ts"] < e["ts"] + e["dur"] - 0.01]
        assert all(c["ts"] + c["dur"] <= e["ts"] + e["dur"] + 0.01 for c in inside)
        busy = next((c for c in inside if c["cat"] == "busy"), None)
        for g in (c for c in inside if c in guests):
            assert g["args"]["overlapped"] and g["args"]["beside"] == e["name"] and e["cat"] == "ffn"
            assert g["args"]["layer"].replace("attn", "") == e["name"].replace("mlp", "")  # the same block
            assert busy["ts"] <= g["ts"] and g["ts"] + g["dur"] <= busy["ts"] + busy["dur"] + 0.01
    return lane, layers, guests


def test_trace_draws_the_hidden_part_in_the_ffn(tiny):
    """a100-80g (branch_overlap = comm_overlap = 1): the feed-forward's busy time hides part of each block's
    heads→batch all-to-alls (the tiny model's busy time is far shorter): that part in the feed-forward's
    slice, the rest in the attention's."""
    m = tiny("ref-tiny-parallel")
    plan = shardwise.plan(m, *example_inputs(m, 8, 16), mesh="1x1x4", layouts="ffn=ws1d,attn=batch",
                          hardware="a100-80g")
    attn = [l for l in plan.layers if str(l.kind) == "attention"]
    assert attn and all(l.cost["beside"] > 0 for l in attn)
    lane, _, guests = _check(plan)
    assert len(guests) == sum(1 for l in attn for r in l.collectives if r.beside)
    for g in guests:
        rest = [e for e in lane if e["cat"] == "collective" and e["args"].get("beside") == g["args"]["beside"]
                and "layer" not in e["args"] and e["name"] == g["name"] and e["ts"] < g["ts"]]
        assert rest and not rest[-1]["args"]["overlapped"]
        assert g["dur"] + rest[-1]["dur"] == pytest.approx(g["args"]["time_ms"] * 1e3, abs=2e-3)
    for l in attn:
        assert sum(g["dur"] for g in guests if g["args"]["layer"] == l.name) == pytest.approx(l.cost["beside"] * 1e6,
                                                                                            abs=2e-3)


def test_trace_of_block_runs_on_a_gpu():
    """PaLM 8B decode on 8 A100s: every block's all-to-alls wholly hidden in its own feed-forward's slice, row
    by row of a run of 32 blocks; with collective matmuls too."""
    for loop in (False, True):
        plan = shardwise.plan("palm-8b", mesh="2x2x2", phase="decode", batch=64, seq=1, context=2048,
                              hardware="a100-80g", layouts="ffn=ws1d,attn=batch", collective_matmul=loop)
        attn = next(l for l in plan.layers if str(l.kind) == "attention")
        assert attn.count == 32 and attn.cost["beside"] > 0
        *_, guests = _check(plan)
        assert {g["args"]["layer"] for g in guests} == {f"blocks.{i}.attn" for i in range(32)}
