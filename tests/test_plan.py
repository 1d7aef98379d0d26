"""The Plan record: JSON round trip, memory accounting, and the global-view graph's invariants."""

import pytest
import torch

import shardwise
from shardwise.passes.insert_collectives import collectives
from shardwise.runtime.simulate import sim_group_name


def test_json_round_trip():
    """A plan survives to_json/from_json exactly (no pickle); the loaded one refuses to emit, clearly."""
    plan = shardwise.plan("llama-tiny", mesh="2x2x1", layouts="ffn=ws2d,attn=batch")
    back = shardwise.Plan.from_json(plan.to_json())
    assert back.to_json() == plan.to_json()
    assert back.summary() == plan.summary()
    with pytest.raises(shardwise.ShardwiseError, match="loaded from JSON"):
        back.emit(0)


def test_emitted_shards_match_plan_memory():
    """What a rank's program holds equals what the plan says a chip stores (same layouts, one source)."""
    plan = shardwise.plan("llama-tiny", mesh="1x1x4")
    held = sum(t.numel() * t.element_size() for t in plan.program.emit(1, group_name=sim_group_name).state_dict().values())
    assert held == plan.memory.weights_per_chip
    assert abs(held - plan.memory.weights_total / 4 - plan.memory.replicated_per_chip) < 1


def test_global_view_graph_still_computes_the_model(tiny):
    """Collectives are identities on global tensors: the annotated graph itself equals the model."""
    from shardwise.models import example_inputs

    m = tiny("ref-tiny")
    args, kwargs = example_inputs(m, 8, 16)
    plan = shardwise.plan(m, args, kwargs, mesh="2x2x2", layouts="ffn=ws2d")
    gm = plan.program.gm
    assert len(collectives(gm)) > 0
    sig, state = plan.program.sig, plan.program.state
    feed = {n: state[k] for n, k in sig.params.items()} | dict(zip(sig.inputs, plan.program.flat_inputs(args, kwargs)))
    env = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = feed[node.name]
        elif node.op == "call_function":
            a, k = torch.fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
            env[node] = node.target(*a, **k)
        elif node.op == "output":
            out = torch.fx.node.map_arg(node.args[0], env.__getitem__)[0]
    with torch.no_grad():
        torch.testing.assert_close(out, m(*args), atol=1e-5, rtol=0)
