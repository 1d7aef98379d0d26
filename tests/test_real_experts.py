"""Expert and latent-attention layouts on real torch.distributed ranks: 4 gloo processes on 127.0.0.1.

Tiny random Mixtral and DeepSeek-V3 (presets mixtral-tiny, deepseek-v3-tiny): each worker builds the
model on the meta device, plans it, reads only its shards of a safetensors file of the parent's
weights and runs its program on real process groups. One case per layout family:

  experts sliced     Mixtral, each expert's F over the 4 ranks (2x2x1), greedy decode with the KV cache
  experts parallel   Mixtral, one expert per rank (1x1x4), greedy decode with the KV cache
  latent split       DeepSeek-V3 (dense block, then a mixture with a shared expert), its latent
                     projections split and its experts parallel (1x1x4), prefill logits

Tokens must equal the unsharded model's greedy tokens (transformers' from_pretrained, whole); logits
within 1e-5 in float32 (the simulated-rank tests give the reasons and the exact collective bytes).
"""

import pytest
import torch

import shardwise

CASES = [
    ("mixtral-tiny", "2x2x1", "experts=sliced", "decode"),
    ("mixtral-tiny", "1x1x4", "experts=parallel", "decode"),
    ("deepseek-v3-tiny", "1x1x4", "experts=parallel,latent=split", "prefill"),
]


@pytest.mark.parametrize("model, mesh, layouts, phase", CASES, ids=lambda v: str(v))
def test_expert_layouts_on_4_gloo_ranks(model, mesh, layouts, phase):
    report = shardwise.verify(model, mesh=mesh, layouts=layouts, phase=phase, nproc=4, batch=2, seq=8, tokens=8,
                              bytes=True)
    assert report.ranks == "gloo"
    assert report.ok, str(report)
    if phase == "prefill":
        assert report.max_abs_diff <= 1e-5
    else:
        assert report.tokens_equal is True
    assert report.bytes_rows and all(p == m for _, _, p, m in report.bytes_rows)  # per layer, as predicted
    assert max(report.param_bytes_per_rank) < 0.35 * report.param_bytes_total
