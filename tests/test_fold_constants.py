"""passes/fold_constants.py: values computed from shapes alone are computed once, when a rank program is built.

  folded     an HF Llama prefill's causal mask and rotary angles leave the program (fewer ops on every
             rank), its outputs bitwise those of the unfolded programs, its state_dict the same keys
  kept       a value that an op later writes in place, a random draw, anything read from an input or a
             weight: the program still computes them
"""

import torch
import torch.fx as fx
import torch.nn as nn

import shardwise
from shardwise.models import example_inputs
from shardwise.passes.fold_constants import fold_constants
from shardwise.planning.program import emit_rank
from shardwise.runtime.simulate import sim_group_name

aten = torch.ops.aten


def _calls(program: fx.GraphModule) -> list:
    return [n.target for n in program.graph.nodes if n.op == "call_function"]


def test_hf_prefill_mask_folded_bitwise(tiny):
    m = tiny("llama-tiny")
    args, kwargs = example_inputs(m, 4, 8)
    plan = shardwise.plan(m, args, kwargs, mesh="1x1x4")
    plain = [emit_rank(plan.program.gm, plan.mesh, r, group_name=sim_group_name, fold=False) for r in range(4)]
    folded = [emit_rank(plan.program.gm, plan.mesh, r, group_name=sim_group_name) for r in range(4)]
    mask_ops = {aten.__and__.Tensor, aten.bitwise_and.Tensor, aten.arange.default, aten.cumsum.default}
    assert mask_ops & set(_calls(plain[0]))  # the export spells the causal mask and the positions out ...
    for p in folded:  # ... and every rank's program now reads them, the same structure on every rank
        assert not mask_ops & set(_calls(p))
        assert len(_calls(p)) < len(_calls(plain[0]))
        assert [n.op for n in p.graph.nodes] == [n.op for n in folded[0].graph.nodes]
        assert set(p.state_dict()) == set(plain[0].state_dict())  # folded values are not weights held
    with torch.no_grad():
        want = plan.program.simulate(args, kwargs, programs=plain).logits
        got = plan.program.simulate(args, kwargs, programs=folded).logits
        model = m(*args, **kwargs).logits
    assert torch.equal(got, want)
    torch.testing.assert_close(got, model, atol=1e-5, rtol=0)  # the numerics tests' float32 tolerance


def _fold(build, limit: int = 1 << 10) -> tuple[fx.Graph, nn.Module, list[str]]:
    """Fold a hand-built graph, every node's value bounded by `limit` bytes (emit bounds them by the global
    values they lower)."""
    g = fx.Graph()
    build(g)
    root = nn.Module()
    return g, root, fold_constants(g, root, dict.fromkeys(g.nodes, limit))


def test_a_pure_chain_becomes_one_buffer():
    def build(g):
        x = g.placeholder("x")
        table = g.call_function(aten.mul.Tensor, (g.call_function(aten.arange.default, (4,)), 2))
        g.output(g.call_function(aten.add.Tensor, (x, table)))

    g, root, names = _fold(build)
    assert names == ["_folded_0"] and torch.equal(root._folded_0, torch.arange(4) * 2)
    assert _targets(g) == [aten.add.Tensor]


def test_written_random_and_input_derived_values_stay():
    def build(g):
        x = g.placeholder("x")
        zeros = g.call_function(aten.zeros.default, ([4],))
        view = g.call_function(aten.view.default, (zeros, [2, 2]))
        written = g.call_function(aten.copy_.default, (view, g.call_function(aten.view.default, (x, [2, 2]))))
        noise = g.call_function(aten.rand.default, ([4],))
        from_input = g.call_function(aten.mul.Tensor, (x, 2))
        g.output((written, noise, from_input))

    g, root, names = _fold(build)
    assert names == []  # zeros (written through its view), rand, and x * 2 are all left to the program
    assert _targets(g) == [aten.zeros.default, aten.view.default, aten.view.default, aten.copy_.default,
                           aten.rand.default, aten.mul.Tensor]


def _targets(g: fx.Graph) -> list:
    return [n.target for n in g.nodes if n.op == "call_function"]


def test_a_value_not_known_small_is_never_computed():
    """A constant whose bound is over MAX_BYTES (a large prefill's mask) stays in the program, uncomputed."""
    from shardwise.passes.fold_constants import MAX_BYTES

    def build(g):
        x = g.placeholder("x")
        g.output(g.call_function(aten.add.Tensor, (x, g.call_function(aten.arange.default, (4,)))))

    for limit in (MAX_BYTES + 1, None):
        g = fx.Graph()
        build(g)
        bound = {} if limit is None else dict.fromkeys(g.nodes, limit)
        assert fold_constants(g, nn.Module(), bound) == []
        assert _targets(g) == [aten.arange.default, aten.add.Tensor]
