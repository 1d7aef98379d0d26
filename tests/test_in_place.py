"""passes/in_place.py: an all-reduce of a buffer nothing else reads reduces it in place.

  applied    a Megatron layout's all-reduces (attention and feed-forward outputs) become `all_reduce_`
             on every rank; the outputs are bitwise those of the out-of-place programs and equal the
             unsharded model within the numerics tests' 1e-5; on 4 real gloo ranks too (bytes as planned:
             tests/test_real_ranks.py's verify of llama-tiny, whose plan reduces in place)
  refused    an input that another op reads, a program input, a weight, and a view of any of them keep
             the out-of-place op (reducing them in place would change what the other reader sees)
"""

import torch
import torch.fx as fx

import shardwise
from shardwise.models import example_inputs
from shardwise.passes.in_place import IN_PLACE, OUT_OF_PLACE, reduce_in_place
from shardwise.planning.program import emit_rank
from shardwise.runtime.simulate import sim_group_name

aten = torch.ops.aten
WAIT = torch.ops._c10d_functional.wait_tensor.default
ATOL = 1e-5


def test_megatron_all_reduces_in_place_bitwise(tiny):
    m = tiny("llama-tiny")
    args, kwargs = example_inputs(m, 4, 8)
    plan = shardwise.plan(m, args, kwargs, mesh="1x1x4", layouts="ffn=ws1d_ar,attn=heads")
    programs = [emit_rank(plan.program.gm, plan.mesh, r, group_name=sim_group_name) for r in range(plan.mesh.size)]
    blocks = len(m.model.layers)
    for p in programs:
        assert sum(n.target is IN_PLACE for n in p.graph.nodes) >= 2 * blocks  # attention + FFN per block
    copies = []
    for p in programs:  # the same programs with every all-reduce out of place again
        g = fx.Graph()
        g.output(g.graph_copy(p.graph, {}))
        for n in g.nodes:
            if n.target is IN_PLACE:
                n.target = OUT_OF_PLACE
        copies.append(fx.GraphModule(p, g))
    with torch.no_grad():
        want = m(*args, **kwargs).logits
        fast = plan.program.simulate(args, kwargs, programs=programs).logits
        plain = plan.program.simulate(args, kwargs, programs=copies).logits
    assert torch.equal(fast, plain)
    torch.testing.assert_close(fast, want, atol=ATOL, rtol=0)


def _graph(build) -> fx.GraphModule:
    """A rank-program fragment: `build(g, x, w)` adds ops on a placeholder x and a weight w, returns outputs."""
    root = torch.nn.Module()
    root.w = torch.nn.Parameter(torch.ones(4, 4))
    g = fx.Graph()
    x = g.placeholder("x")
    w = g.get_attr("w")
    g.output(build(g, x, w))
    return fx.GraphModule(root, g)


def _reduce(g: fx.Graph, t: fx.Node) -> fx.Node:
    c = g.call_function(aten.contiguous.default, (t,))
    return g.call_function(WAIT, (g.call_function(OUT_OF_PLACE, (c, "sum", "g")),))


def _targets(gm: fx.GraphModule) -> list:
    reduce_in_place(gm.graph)
    return [n.target for n in gm.graph.nodes if n.target in (IN_PLACE, OUT_OF_PLACE)]


def test_fresh_private_buffer_through_views_in_place():
    def build(g, x, w):
        y = g.call_function(aten.mm.default, (x, w))
        return _reduce(g, g.call_function(aten.view.default, (y, [16])))
    assert _targets(_graph(build)) == [IN_PLACE]


def test_shared_input_program_input_and_weight_stay_out_of_place():
    def read_twice(g, x, w):
        y = g.call_function(aten.mm.default, (x, w))
        return g.call_function(aten.add.Tensor, (_reduce(g, y), y))  # y read after the reduction

    def program_input(g, x, w):
        return _reduce(g, g.call_function(aten.view.default, (x, [16])))

    def weight(g, x, w):
        return _reduce(g, g.call_function(aten.view.default, (w, [16])))

    def written(g, x, w):  # an op that writes its input returns that input: not a new buffer
        return _reduce(g, g.call_function(aten.add_.Tensor, (x, 1.0)))

    for build in (read_twice, program_input, weight, written):
        assert _targets(_graph(build)) == [OUT_OF_PLACE], build.__name__
