"""head=tokens and embed=replicated: two splits that hold a whole weight per chip to save a collective.

  head=tokens        each chip multiplies its own rows (batch, else sequence) by the whole head: the logits
                     are gathered over their first dim, with no copy to merge blocks (checked on the rank
                     program: nothing reads the gather but the output) and nothing summed
  embed=replicated   every chip looks its rows up in its own table: no collective for the embedding
  both               prefill logits equal the unsharded model's (1e-5, as test_numerics), greedy decode with
                     a sharded KV cache gives the model's tokens, executed bytes equal the plan's, a rank
                     holds what the plan says it stores; used only when asked for, never chosen by cost
"""

import pytest
import torch

import shardwise
from shardwise.drivers.accounting import compare, compare_generation
from shardwise.drivers.generate import generate, reference_generate
from shardwise.ir.hardware import get_hardware
from shardwise.models import example_inputs
from shardwise.planning.program import emit_rank
from shardwise.runtime.lower import c10d
from shardwise.runtime.simulate import Trace, sim_group_name

BOTH = "head=tokens,embed=replicated"
CASES = [("llama-tiny", "1x1x4", "ffn=ws1d_ar,attn=heads"), ("llama-tiny", "2x2x1", "ffn=ws2d,attn=batch"),
         ("ref-tiny-parallel", "1x2x2", "ffn=wg_xy,attn=heads")]


def _logits(x):
    return x if isinstance(x, torch.Tensor) else x.logits


@pytest.mark.parametrize("name, mesh, layouts", CASES)
def test_tokens_head_and_replicated_table_compute_the_model(tiny, name, mesh, layouts):
    m = tiny(name)
    args, kwargs = example_inputs(m, 8, 16)
    plan = shardwise.plan(m, args, kwargs, mesh=mesh, layouts=f"{layouts},{BOTH}")
    assert {l.kind: l.choice for l in plan.layers if l.kind in ("embedding", "head")} == \
        {"embedding": "replicated", "head": "tokens"}
    assert not [l for l in plan.layers if l.kind == "embedding" and l.collectives]
    trace = Trace()
    with torch.no_grad():
        got = _logits(plan.program.simulate(args, kwargs, trace=trace))
        want = _logits(m(*args, **kwargs))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    rows = compare(plan, trace.collectives, plan.program.gm)
    assert rows and all(p == q for _, _, p, q in rows), rows
    program = emit_rank(plan.program.gm, plan.mesh, 0, group_name=sim_group_name)
    held = sum(t.numel() * t.element_size() for t in program.state_dict().values())
    assert held == pytest.approx(plan.memory.weights_per_chip)
    # the logits' gather: over dim 0, waited and returned as they are (no permute, no merging copy)
    gathers = [n for n in program.graph.nodes if n.target is c10d.all_gather_into_tensor.default]
    last = next(iter(gathers[-1].users))
    assert [u.op for u in last.users] == ["output"], [u.format_node() for u in last.users]
    ids = args[0]
    gen = generate(m, ids, 8, mesh=mesh, layouts=f"{layouts},{BOTH}", simulate=True, details=True)
    assert torch.equal(gen.tokens, reference_generate(m, ids, 8))
    assert all(p == q for _, _, p, q in compare_generation(gen, 8))


def test_whole_copies_only_when_asked(tiny):
    """By cost the planner keeps every weight split: a whole table or head per chip saves a collective the
    step's time sees, but costs memory and checkpoint reads it does not (planning/search._head_by_cost)."""
    m = tiny("llama-tiny")
    args, kwargs = example_inputs(m, 8, 16)
    hw = get_hardware("a100-80g")
    plan = shardwise.plan(m, args, kwargs, mesh="1x1x4", layouts="ffn=ws1d_ar,attn=heads", hardware=hw)
    chosen = {l.kind: l.choice for l in plan.layers if l.kind in ("embedding", "head")}
    assert chosen["embedding"] != "replicated" and chosen["head"] != "tokens", chosen
    asked = shardwise.plan(m, args, kwargs, mesh="1x1x4", layouts=f"ffn=ws1d_ar,attn=heads,{BOTH}", hardware=hw)
    assert asked.totals.latency < plan.totals.latency  # cheaper by the step's time, yet not chosen
    assert asked.memory.weights_per_chip > plan.memory.weights_per_chip


def test_unknown_table_modes_are_refused():
    with pytest.raises(shardwise.LayoutError, match="tokens"):
        shardwise.plan("llama-tiny", mesh="1x1x4", layouts="embed=tokens")
    with pytest.raises(shardwise.LayoutError, match="replicated"):
        shardwise.plan("llama-tiny", mesh="1x1x4", layouts="head=replicated")
