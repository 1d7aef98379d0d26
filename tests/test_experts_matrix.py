"""Every expert layout × mesh on the mixture-of-experts architectures, simulated ranks (issue 10's matrix).

Tiny random Mixtral, Qwen3-MoE, OLMoE and DeepSeek-V3 (its first block a dense feed-forward, the next a
mixture with a shared expert, its attention multi-head latent), each under `experts=sliced` (each
expert's F split over every chip), `experts=parallel` (the experts split over the longest prefix of
the chips that divides them, F over the rest; every rank routes every token) and `experts=a2a` (the
tokens split over the batch chips of a weight-gathered member, the experts over the same chips, F over
the rest; each rank routes its own tokens and all-to-all sends every routed row to its expert's rank
and back), on meshes 1x1x4, 2x2x1 and 2x2x2. Per case:

  numbers   prefill logits within 1e-5 of the unsharded model's, float32: the router runs replicated on
            its input gathered whole, so every rank picks the unsharded model's experts bit for bit;
            what differs is only the order of the partial sums over F and over the experts (a few ulps
            of logits of size ~1; measured ≤ 1e-6). A wrong shard or a flipped routing is off by ≫ 1e-5
  tokens    8 greedy tokens from sharded prefill + decode (KV cache sharded between steps) equal the
            unsharded greedy loop's
  bytes     the collective bytes every layer executed equal the plan's prediction, exactly, in prefill
            and in every decode step
  held      every rank holds exactly 1/n of the stacked expert weights' bytes

All-to-all dispatch is uneven (the routing decides how many rows go where): its all-to-alls are charged
the rows their rank owns (tokens × top-k, strategies.redistribute.dispatch), so the bytes still equal.

and DeepSeek-V3's multi-head latent attention with its low-rank projections (q_a, kv_a and its rotary
piece) replicated or split over the chips that split the heads, under the same checks.
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
LAYOUTS = ("experts=sliced", "experts=parallel", "experts=a2a")
A2A_MEMBER = {"1x1x4": "wg_xyz", "2x2x1": "wg_x", "2x2x2": "wg_x"}  # tokens over z (4 ranks), over x (2)
TOKENS = 8
ATOL = 1e-5

_built: dict[str, torch.nn.Module] = {}


def _model(arch: str) -> torch.nn.Module:
    if arch not in _built:
        _built[arch] = build_hf(arch)
    return _built[arch]


def _check(model, mesh: str, layouts: str, ids: torch.Tensor):
    """Prefill logits and per-layer bytes, then TOKENS greedy tokens and every decode step's bytes."""
    plan = api.plan(model, (ids,), {"use_cache": False}, mesh=mesh, layouts=layouts)
    trace = Trace()
    with torch.no_grad():
        got = plan.program.simulate((ids,), {"use_cache": False}, trace=trace).logits
        want = model(ids, use_cache=False).logits
    assert (got - want).abs().max().item() <= ATOL
    rows = compare(plan, trace.collectives, plan.program.gm)
    assert rows and all(p == m for _, _, p, m in rows), rows
    gen = generate(model, ids, TOKENS, mesh=mesh, layouts=layouts, simulate=True, details=True)
    assert torch.equal(gen.tokens, reference_generate(model, ids, TOKENS))
    rows = compare_generation(gen, TOKENS)
    assert rows and all(p == m for _, _, p, m in rows), rows
    return plan


def _stacked(state: dict) -> int:
    return sum(t.numel() * t.element_size() for k, t in state.items() if "experts" in k and t.ndim == 3)


@pytest.mark.parametrize("layouts", LAYOUTS)
@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("arch", ARCHS)
def test_expert_layout(arch, mesh, layouts):
    model = _model(arch)
    mode = layouts.partition("=")[2]
    batch = 2
    if mode == "a2a":  # a member that splits the tokens, over as many chips as the batch and experts allow
        layouts, batch = f"ffn={A2A_MEMBER[mesh]},{layouts}", 4
    ids = torch.randint(0, 256, (batch, 8), generator=torch.Generator().manual_seed(0))
    plan = _check(model, mesh, layouts, ids)
    experts = [l for l in plan.layers if l.kind == "experts"]
    assert experts and all(l.choice.partition(":")[2] == ("" if mode == "sliced" else mode) for l in experts), \
        [l.choice for l in experts]
    assert plan.main.experts == mode
    if mode == "a2a":
        assert all(any(c.kind == "all_to_all" for c in l.collectives) for l in experts)
    full = _stacked(model.state_dict())
    for r in range(plan.mesh.size):
        assert _stacked(plan.program.emit(r, group_name=sim_group_name).state_dict()) * plan.mesh.size == full


@pytest.mark.parametrize("latent", ("replicated", "split"))
@pytest.mark.parametrize("mesh", MESHES)
def test_latent_attention_layout(mesh, latent):
    model = _model("deepseek_v3")
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    plan = _check(model, mesh, f"latent={latent}", ids)
    assert plan.main.latent == latent
    attn = plan.layer("model.layers.0.self_attn")
    assert any(n.startswith(f"latent projections {latent}") for n in attn.notes), attn.notes
    want = "CE" if latent == "replicated" else ("C_z E" if mesh == "1x1x4" else "C_xy E")
    assert attn.weights["latent q_a_proj (32)"]["at_rest"] == want, attn.weights
    held = plan.program.emit(0, group_name=sim_group_name).state_dict()
    mine = next(t for k, t in held.items() if k.endswith("layers_0_self_attn_q_a_proj_weight"))
    whole = model.state_dict()["model.layers.0.self_attn.q_a_proj.weight"]
    share = 1 if latent == "replicated" else plan.mesh.size // (2 if mesh == "2x2x2" else 1)  # z is batch on 2x2x2
    assert mine.numel() * share == whole.numel(), (mine.shape, whole.shape)
