"""Every expert layout × mesh on the mixture-of-experts architectures, simulated ranks (issue 10's matrix).

Tiny random Mixtral, Qwen3-MoE, OLMoE and DeepSeek-V3 (its first block a dense feed-forward, the next a
mixture with a shared expert, its attention multi-head latent), each under `experts=sliced` (each
expert's F split over every chip) and `experts=parallel` (the experts split over the longest prefix of
the chips that divides them, F over the rest), on meshes 1x1x4, 2x2x1 and 2x2x2. Per case:

  numbers   prefill logits within 1e-5 of the unsharded model's, float32: the router runs replicated on
            its input gathered whole, so every rank picks the unsharded model's experts bit for bit;
            what differs is only the order of the partial sums over F and over the experts (a few ulps
            of logits of size ~1; measured ≤ 1e-6). A wrong shard or a flipped routing is off by ≫ 1e-5
  tokens    8 greedy tokens from sharded prefill + decode (KV cache sharded between steps) equal the
            unsharded greedy loop's
  bytes     the collective bytes every layer executed equal the plan's prediction, exactly, in prefill
            and in every decode step
  held      every rank holds exactly 1/n of the stacked expert weights' bytes
"""

import pytest
import torch

from shardwise import api
from shardwise.drivers.accounting import compare, compare_generation
from shardwise.drivers.generate import generate, reference_generate
from shardwise.models.presets import build_hf
from shardwise.runtime.simulate import Trace, sim_group_name

ARCHS = ("mixtral", "qwen3_moe", "olmoe", "deepseek_v3")
MESHES = ("1x1x4", "2x2x1", "2x2x2")
LAYOUTS = ("experts=sliced", "experts=parallel")
TOKENS = 8
ATOL = 1e-5

_built: dict[str, torch.nn.Module] = {}


def _model(arch: str) -> torch.nn.Module:
    if arch not in _built:
        _built[arch] = build_hf(arch)
    return _built[arch]


def _stacked(state: dict) -> int:
    return sum(t.numel() * t.element_size() for k, t in state.items() if "experts" in k and t.ndim == 3)


@pytest.mark.parametrize("layouts", LAYOUTS)
@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("arch", ARCHS)
def test_expert_layout(arch, mesh, layouts):
    model = _model(arch)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    plan = api.plan(model, (ids,), {"use_cache": False}, mesh=mesh, layouts=layouts)
    experts = [l for l in plan.layers if l.kind == "experts"]
    assert experts and all(l.choice.endswith(":parallel") == layouts.endswith("parallel") for l in experts)
    assert plan.main.experts == layouts.partition("=")[2]

    trace = Trace()
    with torch.no_grad():
        got = plan.program.simulate((ids,), {"use_cache": False}, trace=trace).logits
        want = model(ids, use_cache=False).logits
    assert (got - want).abs().max().item() <= ATOL
    rows = compare(plan, trace.collectives, plan.program.gm)
    assert rows and all(p == m for _, _, p, m in rows), rows

    full = _stacked(model.state_dict())
    for r in range(plan.mesh.size):
        assert _stacked(plan.program.emit(r, group_name=sim_group_name).state_dict()) * plan.mesh.size == full

    gen = generate(model, ids, TOKENS, mesh=mesh, layouts=layouts, simulate=True, details=True)
    assert torch.equal(gen.tokens, reference_generate(model, ids, TOKENS))
    rows = compare_generation(gen, TOKENS)
    assert rows and all(p == m for _, _, p, m in rows), rows
