"""A large merging all-gather runs in pieces along its first dim (passes/gather_pieces.py).

The models here are tiny, so the threshold is lowered for the test (`ir.collective.PIECE_BYTES`, read at
call time by the pass and by the cost model alike). Checked on simulated ranks: the pieced program's
numbers are bit-identical to the whole-gather program's (the same elements move, nothing is summed), each
layer's executed bytes still equal the plan's, the rank program runs the pieces the rule says, and the
cost model charges each extra piece one fixed latency and nothing else.
"""

import pytest
import torch

import shardwise
import shardwise.ir.collective as collective
from shardwise.drivers.accounting import compare
from shardwise.ir.collective import Collective
from shardwise.ir.hardware import get_hardware
from shardwise.ir.layout import Layout
from shardwise.models import build_model, example_inputs
from shardwise.runtime.lower import c10d
from shardwise.runtime.simulate import Trace, sim_group_name
from shardwise.strategies.cost import collective_time

_models: dict[str, torch.nn.Module] = {}


def _run(name: str, mesh: str, layouts: str):
    if name not in _models:
        _models[name] = build_model(name)
    model = _models[name]
    args, kwargs = example_inputs(model, 8, 16)
    plan = shardwise.plan(model, args, kwargs, mesh=mesh, layouts=layouts, hardware="a100-80g")
    trace = Trace()
    with torch.no_grad():
        out = plan.program.simulate(args, kwargs, trace=trace)
    out = out if isinstance(out, torch.Tensor) else out.logits
    gathers = sum(1 for n in plan.program.emit(0, group_name=sim_group_name).program.graph.nodes
                  if n.op == "call_function" and n.target is c10d.all_gather_into_tensor.default)
    return plan, out, trace, gathers


def _head_gather(plan):
    """The head's logits gather over the vocabulary (a merge into the last dim; its largest gather) as the plan
    records it."""
    (head,) = [r for r in plan.layers if r.kind.value == "head"]
    return head, max((c for c in head.collectives if c.kind == "all_gather"), key=lambda c: c.bytes)


@pytest.mark.parametrize("name,mesh,layouts", [
    ("llama-tiny", "2x2x1", "ffn=ws1d_ar,attn=heads,head=vocab"),
    ("llama-tiny", "2x2x1", "ffn=ws1d,attn=batch,head=vocab"),
])
def test_pieces_are_bit_identical_bytes_exact_and_priced(monkeypatch, name, mesh, layouts):
    whole_plan, whole, whole_trace, whole_gathers = _run(name, mesh, layouts)
    head, rec = _head_gather(whole_plan)
    assert rec.bytes > 4096  # the logits of 8 × 16 tokens: what the threshold below splits

    monkeypatch.setattr(collective, "PIECE_BYTES", rec.bytes // 3)  # 3 pieces would do; the rows need 4
    plan, got, trace, gathers = _run(name, mesh, layouts)
    assert torch.equal(got, whole)
    for layer, kind, predicted, measured in compare(plan, trace.collectives, plan.program.gm):
        assert predicted == measured, (layer, kind)
    assert sum(e.bytes for e in trace.collectives) == sum(e.bytes for e in whole_trace.collectives)
    assert gathers - whole_gathers >= 3  # the head's gather is 4 (8 rows per chip, the fewest that divide)

    # priced: the head's gather moves the same bytes and pays 3 more fixed latencies (its kind and group's)
    new_head, new_rec = _head_gather(plan)
    assert new_rec.bytes == rec.bytes
    hw = get_hardware("a100-80g")
    lay = Layout(((), ()))
    nothing = Collective("all_gather", (), lay, lay, dim=1, elements=0, group_size=4)
    fixed = collective_time(nothing, 4, hw)
    assert fixed > 0
    assert new_rec.time == pytest.approx(rec.time + 3 * fixed, rel=1e-9)


def test_a_gather_over_the_first_dim_or_below_the_threshold_is_whole():
    lay = Layout(((), ()))
    big = 64 * 2**20 // 4
    over_first = Collective("all_gather", ("x",), lay, lay, dim=0, elements=big, group_size=4)
    over_last = Collective("all_gather", ("x",), lay, lay, dim=1, elements=big, group_size=4)
    small = Collective("all_gather", ("x",), lay, lay, dim=1, elements=1024, group_size=4)
    scatter = Collective("reduce_scatter", ("x",), lay, lay, dim=1, elements=big, group_size=4)
    assert over_first.pieces(2048) == 1
    assert small.pieces(2048) == 1
    assert scatter.pieces(2048) == 1
    assert over_last.pieces(2048) == 4  # 64 MiB in 16 MiB pieces
    assert over_last.pieces(6) == 6  # 4 do not divide 6 rows: the next count that does
    assert over_last.pieces(3) == 3  # at most one piece per row
    assert over_last.pieces(1) == 1
