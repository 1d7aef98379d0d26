"""Every layout runs: each member of the family × attention split × model × mesh, on simulated ranks.

Per case: prefill logits equal the unsharded model's (atol 1e-5 in float32, see test_numerics.py for
why), 16 greedy tokens from sharded prefill + decode (KV cache sharded between steps) equal the
unsharded model's, the collective bytes every layer executed equal the plan's prediction exactly, and
each rank holds what the plan says it stores. A case a layout cannot serve must be refused with a
reason; the refusals expected are listed in REFUSED (none, for these models and meshes), so a wrong
refusal fails instead of being skipped.
"""

import pytest
import torch

import shardwise
from shardwise.drivers.accounting import compare, compare_generation
from shardwise.drivers.generate import generate, reference_generate
from shardwise.models import build_model, example_inputs
from shardwise.runtime.simulate import Trace, sim_group_name
from shardwise.strategies.family import NAMED, all_members

MODELS = ["ref-tiny", "ref-tiny-parallel", "gpt2-tiny", "llama-tiny"]
MESHES = ["2x2x1", "1x2x2", "2x2x2"]
LAYOUTS = [f"ffn={ffn},attn={attn}" for ffn in NAMED for attn in ("heads", "batch")]
REFUSED: set[tuple[str, str, str]] = set()  # (model, mesh, layouts) that must be refused; none here
TOKENS = 16

_models: dict[str, torch.nn.Module] = {}


def _model(name: str) -> torch.nn.Module:
    if name not in _models:
        _models[name] = build_model(name)
    return _models[name]


def _check_prefill(model, mesh: str, layouts: str):
    args, kwargs = example_inputs(model, 8, 16)
    plan = shardwise.plan(model, args, kwargs, mesh=mesh, layouts=layouts)
    trace = Trace()
    with torch.no_grad():
        got = plan.program.simulate(args, kwargs, trace=trace)
        want = model(*args, **kwargs)
    got, want = (x if isinstance(x, torch.Tensor) else x.logits for x in (got, want))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    rows = compare(plan, trace.collectives, plan.program.gm)
    assert rows and all(p == m for _, _, p, m in rows), rows
    held = sum(t.numel() * t.element_size()
               for t in plan.program.emit(0, group_name=sim_group_name).state_dict().values())
    assert held == pytest.approx(plan.memory.weights_total / plan.mesh.size + plan.memory.replicated_per_chip)
    return plan, args


@pytest.mark.parametrize("layouts", LAYOUTS)
@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("name", MODELS)
def test_layout_runs(name, mesh, layouts):
    model = _model(name)
    try:
        plan, args = _check_prefill(model, mesh, layouts)
    except (shardwise.LayoutError, shardwise.PlanError) as e:
        assert (name, mesh, layouts) in REFUSED, f"refused unexpectedly: {e}"
        assert "does not divide" in str(e) or "exceeds HBM" in str(e)
        return
    assert (name, mesh, layouts) not in REFUSED, "expected a refusal"
    ids = args[0]
    gen = generate(model, ids, TOKENS, mesh=mesh, layouts=layouts, simulate=True, details=True)
    assert torch.equal(gen.tokens, reference_generate(model, ids, TOKENS))
    rows = compare_generation(gen, TOKENS)
    assert all(p == m for _, _, p, m in rows), [r for r in rows if r[2] != r[3]]
    if layouts.startswith("ffn=wg_xyz"):  # weight-gathered: every weight split n ways at rest
        buffers = plan.program.sig.buffers
        assert all(key in buffers for key, _, _ in plan.memory.replicated), plan.memory.replicated


@pytest.mark.parametrize("member", [m.name for m in all_members()])
def test_every_role_assignment_runs(member):
    """The other members the planner may choose (batch x, E y, F z, ...) on 2×2×2 with Llama (GQA)."""
    for attn in ("heads", "batch"):
        _check_prefill(_model("llama-tiny"), "2x2x2", f"ffn={member},attn={attn}")
