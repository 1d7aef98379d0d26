"""The head's split is chosen by cost (planning/search._head_by_cost), not by the `auto` rule alone.

Which collective finishes the logits, an all-gather (head split over the vocabulary) or an all-reduce
(split over d_model), is cheaper depends on the hardware. On profiles whose measured collectives make
one kind far slower than the other, the planner picks the other split; the program it emits computes
the model's logits either way; a head split asked for is kept.
"""

from dataclasses import replace

import pytest
import torch

import shardwise
from shardwise.ir.hardware import get_hardware
from shardwise.models import example_inputs

SLOW = 1.0  # seconds of latency: a kind of collective no plan should pick


def _hardware(slow_kind: str):
    base = get_hardware("a100-80g")
    kinds = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all")
    fits = tuple((k, g, SLOW if k == slow_kind else base.collective_latency, base.link_bandwidth)
                 for k in kinds for g in (2, 4))
    return replace(base, name=f"slow-{slow_kind}", collectives=fits)


def _head(plan) -> str:
    return next(l.choice for l in plan.layers if l.kind == "head")


@pytest.mark.parametrize("slow, want", [("all_gather", "E"), ("all_reduce", "vocab")])
def test_the_cheaper_collective_decides_the_heads_split(tiny, slow, want):
    m = tiny("llama-tiny")
    args, kwargs = example_inputs(m, 8, 16)
    plan = shardwise.plan(m, args, kwargs, mesh="1x1x4", layouts="ffn=ws1d_ar,attn=heads", hardware=_hardware(slow))
    assert _head(plan) == want
    with torch.no_grad():
        torch.testing.assert_close(plan.program.simulate(args, kwargs).logits, m(*args, **kwargs).logits,
                                   atol=1e-5, rtol=0)
    forced = "vocab" if want == "E" else "E"
    kept = shardwise.plan(m, args, kwargs, mesh="1x1x4", layouts=f"ffn=ws1d_ar,attn=heads,head={forced}",
                          hardware=_hardware(slow))
    assert _head(kept) == forced and kept.totals.latency > plan.totals.latency
