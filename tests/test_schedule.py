"""The overlap schedule (passes/schedule.py): only the order of a rank program changes.

  numbers    scheduled and unscheduled programs give bitwise-equal outputs on simulated ranks, and both
             equal the unsharded model within the numerics tests' 1e-5 (dense, parallel block, weight-
             gathered, and a mixture with all-to-all dispatch: its uneven all-to-alls and count gather)
  structure  every rank's scheduled program has the same op sequence; every wait_tensor sits just before
             the first op reading its result (only that op's own inputs between them); weight gathers start
             earlier than unscheduled, at most one block before the block that uses them; a budget of 0
             issues no gather ahead; at most one collective is in flight per process group
  hoisting   in a parallel block, the feed-forward projections run between the start and the wait of an
             activation collective of the attention alone (not in the unscheduled program); in a serial
             block no matmul or attention core changes place among the compute ops
"""

import pytest
import torch
import torch.fx as fx

import shardwise
from shardwise.ir.meta import RANK_BLOCKS
from shardwise.models import example_inputs
from shardwise.passes.schedule import PREP_OPS
from shardwise.runtime import kernels
from shardwise.runtime.lower import COLLECTIVE_OPS, c10d
from shardwise.runtime.simulate import sim_group_name

WAIT = c10d.wait_tensor.default
ATOL = 1e-5


def _plan(tiny, name, mesh, layouts):
    m = tiny(name)
    args, kwargs = example_inputs(m, 8, 16)
    return m, args, kwargs, shardwise.plan(m, args, kwargs, mesh=mesh, layouts=layouts)


def _programs(plan, schedule=True, **kw):
    from shardwise.planning.program import emit_rank

    return [emit_rank(plan.program.gm, plan.mesh, r, group_name=sim_group_name, schedule=schedule, **kw)
            for r in range(plan.mesh.size)]


def _logits(x):
    return x if isinstance(x, torch.Tensor) else x.logits


CASES = [("ref-tiny", "2x2x1", "ffn=wg_xyz,attn=batch"), ("ref-tiny", "2x2x1", "ffn=ws2d,attn=heads"),
         ("ref-tiny-parallel", "1x1x4", "ffn=ws1d,attn=heads"), ("llama-tiny", "2x2x2", "ffn=wg_x,attn=heads"),
         ("gpt2-tiny", "2x2x1", "ffn=wg_xy,attn=batch")]


@pytest.mark.parametrize("name,mesh,layouts", CASES)
def test_scheduled_equals_unscheduled_bitwise(tiny, name, mesh, layouts):
    m, args, kwargs, plan = _plan(tiny, name, mesh, layouts)
    with torch.no_grad():
        want = _logits(m(*args, **kwargs))
        plain = _logits(plan.program.simulate(args, kwargs, programs=_programs(plan, schedule=False)))
        sched = _logits(plan.program.simulate(args, kwargs, programs=_programs(plan)))
    assert torch.equal(sched, plain)
    torch.testing.assert_close(sched, want, atol=ATOL, rtol=0)


def test_all_to_all_dispatch_scheduled_bitwise():
    """A mixture with all-to-all dispatch (route → count gather → uneven all-to-all → experts → back)."""
    from shardwise.models.presets import build_hf

    model = build_hf("mixtral")
    ids = torch.randint(0, 256, (4, 8), generator=torch.Generator().manual_seed(0))
    plan = shardwise.plan(model, (ids,), {"use_cache": False}, mesh="2x2x1", layouts="ffn=wg_x,experts=a2a")
    assert any(c.kind == "all_to_all" for c in plan.collectives)
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        plain = plan.program.simulate((ids,), {"use_cache": False}, programs=_programs(plan, schedule=False)).logits
        sched = plan.program.simulate((ids,), {"use_cache": False}, programs=_programs(plan)).logits
    assert torch.equal(sched, plain)
    assert (sched - want).abs().max().item() <= ATOL
    _check_structure(_programs(plan))


def _check_structure(programs: list[fx.GraphModule]) -> None:
    seqs = [[(n.op, n.target) for n in p.graph.nodes] for p in programs]
    assert all(s == seqs[0] for s in seqs), "ranks' scheduled programs differ in op order"
    for p in programs:
        nodes = list(p.graph.nodes)
        pos = {n: i for i, n in enumerate(nodes)}
        for w in (n for n in nodes if n.target is WAIT):
            first = min(w.users, key=pos.__getitem__)
            assert pos[w] < pos[first]
            needed, grow = set(), [first]
            while grow:
                n = grow.pop()
                for a in n.all_input_nodes:
                    if a not in needed:
                        needed.add(a)
                        grow.append(a)
            between = nodes[pos[w] + 1: pos[first]]
            # the one exception: a collective of the same group needed sooner waits for this one first
            pulled = any(n.target in COLLECTIVE_OPS and n.args[-1] == w.args[0].args[-1] for n in between)
            assert pulled or all(n in needed for n in between), f"{w.name} waits early: {[n.name for n in between]}"


def _one_block_ahead(prog: fx.GraphModule, c: fx.Node, use: fx.Node) -> bool:
    """Whether collective `c` starts no earlier than the first op of the block before the one of `use` (the
    last block, for what follows it: the head)."""
    nodes = list(prog.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    blocks = prog.meta[RANK_BLOCKS]
    moved = set()  # what the schedule moves: collectives, waits, and the ops preparing only a collective's input
    for n in reversed(nodes):
        if n.target in COLLECTIVE_OPS or n.target is WAIT or (
                n.target in PREP_OPS and n.users and all(u in moved and u.target is not WAIT for u in n.users)):
            moved.add(n)
    first, last = {}, -1
    for i, n in enumerate(nodes):  # where each block's ops start, what the schedule moves aside
        if n in moved:
            continue
        if (b := blocks.get(n.name)) is not None:
            first.setdefault(b, i)
            last = i
    started = [b for b in sorted(first, key=first.get) if first[b] <= pos[use]]
    prev = started[-1] if pos[use] > last else started[-2] if len(started) >= 2 else None
    return prev is None or pos[c] >= first[prev]


def _weight_gathers(p: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, fx.Node]]:
    """(collective, its wait, the wait's first reader) of each collective fed by weights alone."""
    nodes = list(p.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    const = set()
    for n in nodes:
        if n.op == "get_attr" or (n.op == "call_function" and n.all_input_nodes
                                  and all(a in const for a in n.all_input_nodes)):
            const.add(n)
    out = []
    for n in nodes:
        if n.target in COLLECTIVE_OPS and n in const:
            w = next(iter(n.users))
            out.append((n, w, min(w.users, key=pos.__getitem__)))
    return out


def test_structure_weight_gathers_start_early_within_one_block(tiny):
    # the head asked split over the vocabulary (the split `auto` gives; by cost it may be d_model, whose weight
    # gather need not start early), the structure these assertions describe
    *_, plan = _plan(tiny, "llama-tiny", "2x2x2", "ffn=wg_x,attn=heads,head=vocab")
    plain, sched = _programs(plan, schedule=False), _programs(plan)
    _check_structure(sched)
    p0, s0 = plain[0], sched[0]
    assert len(p0.graph.nodes) == len(s0.graph.nodes)
    gathers = _weight_gathers(s0)
    assert len(gathers) >= 8
    pos = {n: i for i, n in enumerate(s0.graph.nodes)}
    plain_pos = {n.name: i for i, n in enumerate(p0.graph.nodes)}
    # unscheduled: each gather waited at once; scheduled: started earlier, waited where it is read
    assert all(plain_pos[w.name] == plain_pos[c.name] + 1 for c, w, _ in gathers)
    assert all(pos[w] - pos[c] > 1 for c, w, _ in gathers)
    assert sum(pos[c] < plain_pos[c.name] for c, _, _ in gathers) >= len(gathers) - 1
    assert all(_one_block_ahead(s0, c, use) for c, _, use in gathers)  # at most one block before its use


def test_prefetch_budget(tiny):
    *_, plan = _plan(tiny, "llama-tiny", "2x2x2", "ffn=wg_x,attn=heads")
    one = _programs(plan)[0]
    sizes = {}
    for c, _, _ in _weight_gathers(one):
        src = [a for a in c.all_input_nodes][0]
        while src.op != "get_attr":
            src = src.all_input_nodes[0]
        t = getattr(one, src.target)
        sizes[c.name] = t.numel() * t.element_size() * c.args[1]
    assert all(s > 0 for s in sizes.values())
    zero = _programs(plan, prefetch_bytes=0)[0]
    pos = {n: i for i, n in enumerate(zero.graph.nodes)}
    assert all(pos[w] == pos[c] + 1 for c, w, _ in _weight_gathers(zero)), "budget 0 issued a gather ahead"
    opos = {n: i for i, n in enumerate(one.graph.nodes)}
    assert any(opos[w] > opos[c] + 1 for c, w, _ in _weight_gathers(one))  # the default budget does
    _check_structure(_programs(plan, prefetch_bytes=0))


def test_one_collective_in_flight_per_group(tiny):
    *_, plan = _plan(tiny, "llama-tiny", "2x2x2", "ffn=wg_x,attn=heads")
    for prog in _programs(plan)[:2]:
        busy = {}
        for n in prog.graph.nodes:
            if n.target in COLLECTIVE_OPS:
                assert busy.get(n.args[-1]) is None, f"{n.name} starts while {busy[n.args[-1]].name} is in flight"
                busy[n.args[-1]] = n
            elif n.target is WAIT and busy.get(n.args[0].args[-1]) is n.args[0]:
                busy[n.args[0].args[-1]] = None


def test_cost_prices_the_measured_overlap_of_prefetched_gathers():
    """comm_overlap 1 hides a prefetched weight gather behind compute (the TPU v4 fit's assumption), 0 adds it
    up like no prefetch, a fraction in between; activation collectives are never hidden."""
    import dataclasses

    from shardwise.ir.collective import Collective
    from shardwise.ir.hardware import TPU_V4
    from shardwise.ir.layout import Layout
    from shardwise.strategies.cost import Comm, LayerCost

    hw = dataclasses.replace(TPU_V4, collective_latency=0.0, hop_latency=0.0)
    bw = hw.collective_bandwidth(("x",))
    r = Layout.replicated(2)
    gather = Collective("all_gather", ("x",), r, r, dim=0, elements=int(2e-3 * bw), itemsize=1, group_size=2,
                        axes=("x",))  # wire bytes half of it: 1 ms
    flops = 2e-3 * hw.peak_flops * hw.flops_efficiency  # 2 ms of compute

    def time(overlap, weight=True):
        cost = LayerCost(flops=flops, comm=[Comm(gather, 1, weight=weight)])
        return cost.times(dataclasses.replace(hw, comm_overlap=overlap))["time"]

    assert time(1.0) == pytest.approx(2e-3)
    assert time(0.0) == pytest.approx(3e-3)
    assert time(0.5) == pytest.approx(2.5e-3)
    assert time(0.0) == pytest.approx(LayerCost(flops=flops, comm=[Comm(gather, 1, weight=True)]).times(
        dataclasses.replace(hw, weight_prefetch=False))["time"])
    assert time(1.0, weight=False) == pytest.approx(3e-3)  # an activation collective: on the critical path


def test_weights_as_inputs_gathered_within_one_block(tiny):
    """torch.compile's backend emits weights as program inputs: their gathers cannot be told from activation
    collectives, yet none starts more than one block before the block that reads it."""
    from shardwise.compile_backend import _weights_as_inputs
    from shardwise.planning.program import emit_rank

    *_, plan = _plan(tiny, "llama-tiny", "2x2x2", "ffn=wg_x,attn=heads")
    prog = emit_rank(_weights_as_inputs(plan.program.gm), plan.mesh, 0, group_name=sim_group_name)
    _check_structure([prog])
    nodes = list(prog.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    gathers = [n for n in nodes if n.target in COLLECTIVE_OPS]
    assert len(gathers) >= 8
    moved = 0
    for c in gathers:
        w = next(iter(c.users))
        use = min(w.users, key=pos.__getitem__)
        assert _one_block_ahead(prog, c, use), c.name
        moved += pos[use] - pos[c] > 2
    assert moved >= 4  # and they do start early


def _window(prog: fx.GraphModule, c: fx.Node) -> list[fx.Node]:
    """The ops between collective `c`'s start and its wait."""
    nodes = list(prog.graph.nodes)
    return nodes[nodes.index(c) + 1: nodes.index(next(iter(c.users)))]


def _ancestors(n: fx.Node) -> set[str]:
    seen, grow = set(), [n]
    while grow:
        for a in grow.pop().all_input_nodes:
            if a.name not in seen:
                seen.add(a.name)
                grow.append(a)
    return seen


def _attention_own(prog: fx.GraphModule, blocks) -> list[fx.Node]:
    """The activation collectives of these parallel blocks' attention that the feed-forward neither reads nor
    feeds: downstream of an attention projection and of an input, upstream of no feed-forward projection."""
    attn = {p.node for b in blocks for p in b.attention.projections.values()}
    ffn = {p.node for b in blocks for p in b.ffn.projections.values()}
    inputs = {n.name for n in prog.graph.nodes if n.op == "placeholder"}
    return [c for c in prog.graph.nodes if c.target in COLLECTIVE_OPS
            and (up := _ancestors(c)) & attn and not up & ffn and up & inputs]


@pytest.mark.parametrize("mesh,layouts", [("2x2x1", "ffn=ws2d,attn=heads"), ("1x1x4", "ffn=ws1d,attn=batch")])
def test_parallel_block_ffn_runs_inside_attention_collective(tiny, mesh, layouts):
    """x + attn(h) + ffn(h): the attention has an activation collective of its own (a reduce-scatter of q; the
    heads→batch all-to-all of q, k, v); the feed-forward projections read only h, so they run while it is in
    flight. Unscheduled, each wait follows its start at once."""
    from shardwise.ir.meta import LAYERS

    m, args, kwargs, plan = _plan(tiny, "ref-tiny-parallel", mesh, layouts)
    blocks = plan.program.gm.meta[LAYERS].blocks
    assert blocks and all(b.parallel for b in blocks)
    plain, sched = _programs(plan, schedule=False), _programs(plan)
    _check_structure(sched)
    for prog, scheduled in ((plain[0], False), (sched[0], True)):
        for b in blocks:
            ffn = {p.node for p in b.ffn.projections.values()}
            own = _attention_own(prog, [b])
            assert own, f"{b.name}: the attention has no activation collective of its own under {layouts}"
            inside = {n.name for c in own for n in _window(prog, c)} & ffn
            if scheduled:
                assert inside, f"{b.name}: no feed-forward projection runs inside the attention's collectives"
            else:
                assert not inside
    with torch.no_grad():
        want = _logits(m(*args, **kwargs))
        got_plain = _logits(plan.program.simulate(args, kwargs, programs=plain))
        got = _logits(plan.program.simulate(args, kwargs, programs=sched))
    assert torch.equal(got, got_plain)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_priced_beside_are_the_attentions_own_collectives(tiny):
    """The collectives the cost model prices beside the feed-forward (strategies/cost.py `Branch`, the plan's
    records with `beside`) are of the kinds the rank program's attention has of its own."""
    from shardwise.ir.meta import LAYERS

    *_, plan = _plan(tiny, "ref-tiny-parallel", "1x1x4", "ffn=ws1d,attn=batch")
    prog = _programs(plan, schedule=False)[0]
    own = {COLLECTIVE_OPS[c.target] for c in _attention_own(prog, plan.program.gm.meta[LAYERS].blocks)}
    assert own == {"all_to_all"}
    assert {r.kind for l in plan.layers for r in l.collectives if r.beside} == own


def _compute(prog: fx.GraphModule) -> list[fx.Node]:
    """The ops that are neither collectives, their waits, nor the preparation moved with a collective."""
    from shardwise.passes.schedule import _starts

    order = list(prog.graph.nodes)
    moved = {m for s in _starts(prog, order) for m in s.nodes | {s.wait}}
    return [n for n in order if n.op == "call_function" and n not in moved and n.target not in COLLECTIVE_OPS
            and n.target is not WAIT]


def _hoisted(plain: fx.GraphModule, sched: fx.GraphModule) -> list[str]:
    """The compute ops the scheduled program runs before some op that preceded them unscheduled."""
    before = [n.name for n in _compute(plain)]
    after = [n.name for n in _compute(sched)]
    assert sorted(before) == sorted(after)
    pos = {n: i for i, n in enumerate(before)}
    out, done, first = [], set(), 0
    for n in after:
        while first < len(before) and before[first] in done:
            first += 1
        if pos[n] > first:
            out.append(n)
        done.add(n)
    return out


MATMUL_LIKE = {torch.ops.aten.linear.default, kernels.linear, torch.ops.aten.addmm.default, torch.ops.aten.mm.default,
               torch.ops.aten.bmm.default, torch.ops.aten.scaled_dot_product_attention.default}


@pytest.mark.parametrize("name,mesh,layouts,looped", [("ref-tiny", "2x2x1", "ffn=ws2d,attn=heads", False),
                                                      ("ref-tiny", "1x1x4", "ffn=ws1d,attn=batch", False),
                                                      ("ref-tiny", "2x2x1", "ffn=ws1d,attn=heads", True),
                                                      ("llama-tiny", "2x2x2", "ffn=wg_x,attn=heads", False)])
def test_serial_block_compute_keeps_its_order(tiny, name, mesh, layouts, looped):
    """In a serial block what follows the attention reads its output: no matmul or attention core moves.
    The reference decoder moves nothing at all, also with looped collective matmuls (each partial product
    stays beside its ring step, not all before the first step's wait); Llama moves only what reads no
    collective's result (RoPE's cos/sin unsqueezed, placed by the model after the projections)."""
    *_, plan = _plan(tiny, name, mesh, layouts)
    plain, sched = (_programs(plan, schedule=s, collective_matmul=looped)[0] for s in (False, True))
    moved = _hoisted(plain, sched)
    if name == "ref-tiny":
        assert moved == []
    targets = {n.name: n.target for n in sched.graph.nodes}
    assert not [n for n in moved if targets[n] in MATMUL_LIKE]
    for n in (x for x in sched.graph.nodes if x.name in moved):
        assert not any(a.target is WAIT for a in n.all_input_nodes), f"{n.name} read a collective and moved"


def test_hoisting_moves_the_parallel_ffn(tiny):
    """The helper above sees a move where there is one: the parallel block's feed-forward projections."""
    *_, plan = _plan(tiny, "ref-tiny-parallel", "1x1x4", "ffn=ws1d,attn=batch")
    plain, sched = (_programs(plan, schedule=s)[0] for s in (False, True))
    targets = {n.name: n.target for n in sched.graph.nodes}
    assert sum(targets[n] in MATMUL_LIKE for n in _hoisted(plain, sched)) >= 3 * 2  # 3 projections, 2 blocks
