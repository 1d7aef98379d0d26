"""Experts of other forms sharded (issue 10): gpt-oss's and Llama 4's, expert-sliced and expert-parallel (and
gpt-oss's by all-to-all dispatch; Llama 4's dense experts have no routed rows to dispatch).

  gpt-oss     transformers' GptOssExperts through grouped matmuls: gate and up interleaved in one
              [X, E, 2F] weight (`[..., ::2]`, `[..., 1::2]`), biases on both projections, a clamped GLU;
              canonicalize fuses it into `experts_ffn` with its biases; the down bias [X, E] is added
              once per partial sum (each rank adds only its columns of it)
  Llama 4     every expert over every token by `bmm` over [X, T, E] (tokens not routed scaled by 0), plus
              a shared expert, which stays a dense feed-forward layer of the block

On tiny random models on simulated ranks, meshes 1x1x4, 2x2x1, 2x2x2, for the expert-sliced layout (the
default) and expert parallel (`experts=parallel`):

  recognised  one `experts` layer per block, nothing reported as experts run replicated, the layer's
              choice and notes naming the layout (`:parallel`, "experts parallel" / "experts sliced")
  numbers     prefill logits equal the unsharded model's within atol 1e-5 in float32. The routing runs
              replicated, bit for bit the unsharded one, so the same experts are picked; what changes is
              the order of float sums: the down projection's sum over F is cut into per-rank partial sums
              added by the reduction (and the down bias added to one of them), and Llama 4's `bmm` becomes
              one `mm` per expert. That is a few ulps of logits of size ~1 (measured ≤ 3e-7); a wrong
              shard, a bias added twice or missing (biases here are drawn at 0.5, not the zeros of the
              init) or a flipped routing is off by far more than 1e-5
  tokens      8 greedy tokens through prefill + decode equal the unsharded greedy loop's
  held        every rank program holds exactly 1/n of the expert parameters' bytes, biases included

gpt-oss's clamp limit is set to 0.1 (its default 7 never clamps the tiny model's activations), so the
clamps bite. The models are built once per module (about 40 s for the file on two workers). A top-k larger than the number of experts fails in the model itself (torch.topk); shardwise
says so in a ShardwiseError, without a torch stack trace.
"""

import pytest
import torch

from shardwise import api
from shardwise.drivers.generate import reference_generate
from shardwise.errors import ShardwiseError
from shardwise.ir.meta import LAYERS
from shardwise.models.presets import build_hf
from shardwise.runtime.simulate import sim_group_name

ATOL = 1e-5
MESHES = ("1x1x4", "2x2x1", "2x2x2")
LAYOUTS = {"sliced": None, "parallel": "experts=parallel"}
_BUILT: dict = {}


def _model(arch: str):
    """The tiny model of `arch`, built once per module; gpt-oss with random biases and a clamp that bites."""
    if arch not in _BUILT:
        if arch == "gpt_oss":
            model = build_hf(arch, swiglu_limit=0.1)
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if ".experts." in name and name.endswith("_bias"):
                        p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        else:
            model = build_hf(arch)
        _BUILT[arch] = model
    return _BUILT[arch]


def _ids():
    return torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))


def _expert_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if ".experts." in k)


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("layout", tuple(LAYOUTS))
@pytest.mark.parametrize("arch", ("gpt_oss", "llama4_text"))
def test_experts_equal_unsharded(arch, layout, mesh):
    model, ids = _model(arch), _ids()
    plan = api.plan(model, (ids,), {"use_cache": False}, mesh=mesh, layouts=LAYOUTS[layout])
    layers = plan.program.gm.meta[LAYERS]
    assert len(layers.by_kind("experts")) == 2 and not layers.experts and not plan.sharding.experts
    assert all(b.experts is not None for b in layers.blocks)
    if arch == "llama4_text":  # the shared expert is the block's dense feed-forward
        assert all(b.ffn is not None and b.ffn.name.endswith("shared_expert") for b in layers.blocks)
    else:
        assert all(b.experts.info["interleaved"] and set(b.experts.info["biases"]) == {"b_gate_up", "b_out"}
                   for b in layers.blocks)
    for layer in (l for l in plan.layers if l.kind == "experts"):
        notes = " ".join(layer.notes)
        assert layer.choice.endswith(":parallel") == (layout == "parallel"), layer.choice
        assert ("experts parallel" in notes) == (layout == "parallel"), notes
        assert "experts sliced" in notes or (layout == "parallel" and "each expert whole" in notes), notes
        if layout == "parallel":
            assert layer.weights["w_out"]["at_rest"].startswith("X_xy" if mesh != "1x1x4" else "X_z"), layer.weights

    _check_numbers_held_tokens(model, ids, plan, LAYOUTS[layout])


def _check_numbers_held_tokens(model, ids, plan, layouts):
    """The module's checks: logits within ATOL, 1/n of the expert bytes on every rank, 8 greedy tokens."""
    ranks = [plan.program.emit(r, group_name=sim_group_name) for r in range(plan.mesh.size)]
    with torch.no_grad():
        got = plan.program.simulate((ids,), {"use_cache": False}, programs=[r.program for r in ranks]).logits
        want = model(ids, use_cache=False).logits
    assert (got - want).abs().max().item() <= ATOL

    full = _expert_bytes(model)
    for r in ranks:
        held = sum(t.numel() * t.element_size() for k, t in r.program.state_dict().items() if "experts" in k)
        assert held * plan.mesh.size == full, (held, full)

    tokens = api.generate(model, ids, 8, mesh=plan.mesh, layouts=layouts, simulate=True)
    assert torch.equal(tokens, reference_generate(model, ids, 8))


def test_top_k_larger_than_the_experts_is_a_clear_error(capfd):
    """transformers builds such a model; its forward fails in torch.topk, and so does the capture: the user
    gets a ShardwiseError naming the cause and the fix, and no torch stack trace on stderr."""
    model = build_hf("mixtral", num_experts_per_tok=8)  # 4 experts
    capfd.readouterr()
    with pytest.raises(ShardwiseError, match=r"top-k.*experts per token.*at most the number of experts"):
        api.plan(model, (_ids(),), {"use_cache": False}, mesh="1x1x4")
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("mesh,member", [("1x1x4", "wg_xyz"), ("2x2x2", "wg_x")])
def test_gpt_oss_experts_by_all_to_all_dispatch(mesh, member):
    """gpt-oss's experts under experts=a2a: the tokens split over the batch chips, each routed row sent to its
    expert's rank, gate_up and its bias split in whole (gate, up) pairs over the rest, the down bias added
    once per token (by the rank holding its columns): numbers, tokens and 1/n of the expert bytes."""
    model = _model("gpt_oss")
    ids = torch.randint(0, 256, (4, 8), generator=torch.Generator().manual_seed(0))
    layouts = f"ffn={member},experts=a2a"
    plan = api.plan(model, (ids,), {"use_cache": False}, mesh=mesh, layouts=layouts)
    assert all(l.choice.endswith(":a2a") for l in plan.layers if l.kind == "experts")
    _check_numbers_held_tokens(model, ids, plan, layouts)


def test_llama4_dense_experts_have_no_all_to_all_dispatch():
    """Llama 4 runs every expert over every token (no routed rows to move): experts=a2a is refused, saying
    why; the other splits remain."""
    ids = torch.randint(0, 256, (4, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ShardwiseError, match="not in the form shardwise runs over a subset of the tokens"):
        api.plan(_model("llama4_text"), (ids,), {"use_cache": False}, mesh="2x2x1", layouts="ffn=wg_x,experts=a2a")
