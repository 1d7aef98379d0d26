"""Expert and latent-attention layouts on real torch.distributed ranks: 4 gloo processes on 127.0.0.1.

Tiny random Mixtral and DeepSeek-V3 (presets mixtral-tiny, deepseek-v3-tiny): each worker builds the
model on the meta device, plans it, reads only its shards of a safetensors file of the parent's
weights and runs its program on real process groups. One case per layout family:

  experts sliced     Mixtral, each expert's F over the 4 ranks (2x2x1), greedy decode with the KV cache
  experts parallel   Mixtral, one expert per rank (1x1x4), greedy decode with the KV cache
  experts a2a        Mixtral, tokens and experts split over x, F over y (weight-gathered X, 2x2x1): the
                     routed rows sent to their experts' ranks by uneven all-to-alls, greedy decode
  latent split       DeepSeek-V3 (dense block, then a mixture with a shared expert), its latent
                     projections split and its experts parallel (1x1x4), prefill logits

Tokens must equal the unsharded model's greedy tokens; logits within 1e-5 in float32 (the simulated-rank
tests give the reasons); the collective bytes every layer executed equal the plan's prediction.

And a Mixtral checkpoint directory as transformers writes it (`save_pretrained`: every expert stored on its
own, `block_sparse_moe.experts.{i}.w1/w2/w3`, as published checkpoints are): 4 gloo ranks each read only
their experts' pieces from the files, about 1/4 of the checkpoint, and generate its greedy tokens.
"""

import pytest

import shardwise

CASES = [
    ("mixtral-tiny", "2x2x1", "experts=sliced", "decode"),
    ("mixtral-tiny", "1x1x4", "experts=parallel", "decode"),
    ("mixtral-tiny", "2x2x1", "ffn=wg_x,experts=a2a", "decode"),
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


def test_a_checkpoint_storing_experts_one_by_one_on_4_gloo_ranks(tmp_path):
    from shardwise.models.checkpoint import Checkpoint
    from shardwise.models.presets import build_hf

    build_hf("mixtral").save_pretrained(tmp_path)
    assert any(".block_sparse_moe.experts.3.w1.weight" in k for k in Checkpoint.open(tmp_path).shapes)
    report = shardwise.verify(str(tmp_path), mesh="1x1x4", layouts="experts=parallel", phase="decode", nproc=4,
                              batch=2, seq=4, tokens=6)
    assert report.ranks == "gloo" and report.ok and report.tokens_equal is True, str(report)
    assert len(set(report.bytes_read)) == 1 and report.bytes_read[0] < 0.27 * report.checkpoint_bytes
