"""Layer detection on the three model families: kinds, dims, attention variant, gating, parallel blocks."""

import pytest

from shardwise.ir.meta import LAYERS
from shardwise.models import example_inputs
from shardwise.planning.program import capture_program


def _layers(tiny, name):
    m = tiny(name)
    args, kwargs = example_inputs(m, 2, 8)
    return capture_program(m, args, kwargs).meta[LAYERS]


@pytest.mark.parametrize(
    "name, variant, H, K, gated, parallel",
    [
        ("llama-tiny", "GQA", 8, 2, True, False),
        ("gpt2-tiny", "MHA", 8, 8, False, False),
        ("ref-tiny", "MHA", 8, 8, False, False),
        ("ref-tiny-parallel", "MQA", 8, 1, True, True),
        ("ref-tiny-gqa", "GQA", 8, 2, True, False),
    ],
)
def test_detects_blocks(tiny, name, variant, H, K, gated, parallel):
    """Would catch a missed projection, wrong head counts (H, K, D), a missed SwiGLU gate or parallel block."""
    L = _layers(tiny, name)
    kinds = [l.kind for l in L.layers]
    assert kinds.count("attention") == 2 and kinds.count("ffn") == 2 and kinds.count("head") == 1
    assert kinds[0] == "embedding"
    attn = L.by_kind("attention")[0]
    assert (attn.info["variant"], attn.dims["H"], attn.dims["K"], attn.dims["D"]) == (variant, H, K, 64 // H)
    assert set(attn.projections) == {"q", "k", "v", "o"}
    ffn = L.by_kind("ffn")[0]
    assert ffn.info["gated"] is gated and ffn.dims["F"] == 256
    assert [b.parallel for b in L.blocks] == [parallel, parallel]
    assert len(L.blocks) == 2 and L.dims["E"] == 64


def test_gpt2_fused_qkv_is_unfused(tiny):
    """GPT-2's single [E, 3E] c_attn must become three projections, so each can be split over heads."""
    attn = _layers(tiny, "gpt2-tiny").by_kind("attention")[0]
    weights = {attn.projections[r].weight for r in "qkv"}
    assert len(weights) == 3 and all(attn.projections[r].out_features == 64 for r in "qkv")


def test_layers_run_embedding_blocks_head(tiny):
    """Layers come in program order: the embedding, then each block's attention and ffn, then the head."""
    layers = _layers(tiny, "llama-tiny")
    kinds = [l.kind for l in layers.layers]
    assert kinds[0] == "embedding" and kinds[-1] == "head"
    assert kinds[1:-1] == ["attention", "ffn"] * len(layers.blocks)
    assert [l.block for l in layers.layers[1:-1]] == [b.index for b in layers.blocks for _ in (0, 1)]


def test_the_largest_of_two_feed_forward_pairs_is_the_feed_forward():
    """Gemma 4's block gates a per-layer input after its MLP (per_layer_input_gate E → 8, per_layer_projection
    8 → E): two projection pairs of the feed-forward's shape, the MLP's output feeding the second pair. The
    MLP is the feed-forward (it was once the small pair, leaving the MLP replicated); the pair runs replicated
    and the plan reports it so."""
    import torch

    import shardwise
    from shardwise.models.presets import build_hf

    model = build_hf("gemma4_text")
    ids = torch.zeros(2, 8, dtype=torch.long)
    layers = capture_program(model, (ids,), {"use_cache": False}).meta[LAYERS]
    ffns = layers.by_kind("ffn")
    assert [f.name for f in ffns] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert {r: p.weight for r, p in ffns[0].projections.items()} == {
        "w_gate": "p_model_layers_0_mlp_gate_proj_weight", "w_in": "p_model_layers_0_mlp_up_proj_weight",
        "w_out": "p_model_layers_0_mlp_down_proj_weight"}
    plan = shardwise.plan(model, (ids,), {"use_cache": False}, mesh="1x1x4")
    replicated = {r.name for r in plan.sharding.replicated}
    assert not any(".mlp." in name for name in replicated)
    assert "model.layers.0.per_layer_input_gate.weight" in replicated
    assert plan.sharding.flops_fraction > 0.95


def test_a_projection_that_does_not_read_the_hidden_state_is_not_a_latent():
    """Gemma 3n's AltUp `prediction_coefs` (4 → 16) mixes its four streams into the one that reaches q: it
    reaches q without passing another projection, as a multi-head latent's code does, but it reads the 4
    stream weights, not the hidden state. It is no latent (it was once reported `latent-replicated`); it runs
    replicated and the plan names it so, while DeepSeek's q_a/kv_a stay latents (test_experts_matrix.py)."""
    import torch

    import shardwise
    from shardwise.models.presets import build_hf

    model = build_hf("gemma3n_text")
    ids = torch.zeros(2, 8, dtype=torch.long)
    layers = capture_program(model, (ids,), {"use_cache": False}).meta[LAYERS]
    attns = layers.by_kind("attention")
    assert attns and all("latent" not in a.info for a in attns), [a.info.get("latent") for a in attns]
    plan = shardwise.plan(model, (ids,), {"use_cache": False}, mesh="1x1x4")
    replicated = {r.name for r in plan.sharding.replicated}
    assert "model.layers.0.altup.prediction_coefs.weight" in replicated, sorted(replicated)
    assert plan.main.latent == "", plan.main.latent  # "" : the plan has no latent projections to lay out
