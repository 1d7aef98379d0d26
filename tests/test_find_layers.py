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
