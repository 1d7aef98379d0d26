"""The head's split is chosen by cost (planning/search._head_by_cost), not by the `auto` rule alone.

Which collective finishes the logits, an all-gather (head split over the vocabulary, or over its rows:
tokens) or an all-reduce (split over d_model), is cheaper depends on the hardware. On profiles whose
measured collectives make one kind far slower than the other, the planner picks a split of the other
kind; between the two all-gathers, the vocabulary's must merge its blocks into the last dim (a local
copy of the logits) where the rows' need not, so on hardware that pays relayout copies the rows win,
and where it does not (or the whole weight per chip is not worth it) the vocabulary does. The program
emitted computes the model's logits either way; a head split asked for is kept.
"""

from dataclasses import replace

import pytest
import torch

import shardwise
from shardwise.ir.hardware import get_hardware
from shardwise.models import example_inputs

SLOW = 1.0  # seconds of latency: a kind of collective no plan should pick


def _hardware(slow_kind: str, relayout_copies: bool = True):
    base = get_hardware("a100-80g")
    kinds = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all")
    fits = tuple((k, g, SLOW if k == slow_kind else base.collective_latency, base.link_bandwidth)
                 for k in kinds for g in (2, 4))
    return replace(base, name=f"slow-{slow_kind}", collectives=fits, relayout_copies=relayout_copies)


def _head(plan) -> str:
    return next(l.choice for l in plan.layers if l.kind == "head")


@pytest.mark.parametrize("slow, copies, want", [("all_gather", True, "E"), ("all_reduce", True, "tokens"),
                                                 ("all_reduce", False, "vocab")])
def test_the_cheaper_collective_decides_the_heads_split(tiny, slow, copies, want):
    m = tiny("llama-tiny")
    args, kwargs = example_inputs(m, 8, 16)
    hw = _hardware(slow, copies)
    plan = shardwise.plan(m, args, kwargs, mesh="1x1x4", layouts="ffn=ws1d_ar,attn=heads", hardware=hw)
    assert _head(plan) == want
    with torch.no_grad():
        torch.testing.assert_close(plan.program.simulate(args, kwargs).logits, m(*args, **kwargs).logits,
                                   atol=1e-5, rtol=0)
    forced = "vocab" if want == "E" else "E"
    kept = shardwise.plan(m, args, kwargs, mesh="1x1x4", layouts=f"ffn=ws1d_ar,attn=heads,head={forced}",
                          hardware=hw)
    assert _head(kept) == forced and kept.totals.latency > plan.totals.latency


def test_a_whole_head_per_chip_only_where_it_is_a_small_share_of_memory(tiny):
    """head=tokens holds the whole weight on every chip: not considered where that is over 1% of HBM."""
    m = tiny("llama-tiny")
    args, kwargs = example_inputs(m, 8, 16)
    head_bytes = m.lm_head.weight.numel() * m.lm_head.weight.element_size()
    hw = replace(_hardware("all_reduce"), hbm_bytes=50.0 * head_bytes)  # the head is 2% of it (and fits)
    plan = shardwise.plan(m, args, kwargs, mesh="1x1x4", layouts="ffn=ws1d_ar,attn=heads", hardware=hw)
    assert _head(plan) == "vocab"
