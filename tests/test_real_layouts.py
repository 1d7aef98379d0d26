"""Issue 4 on real torch.distributed ranks (gloo, torchrun on 127.0.0.1), via `verify --nproc N --bytes`.

Each worker builds the model on the meta device, plans it, emits its program reading only its shards
from a safetensors file, and runs it on real process groups; rank 0 reports the result and the
collective bytes each layer executed, which must equal the plan's prediction.
"""

import pytest

import shardwise

CASES = [
    ("llama-tiny", "2x2x1", "ffn=ws2d,attn=heads", "prefill", 4),
    ("gpt2-tiny", "2x2x1", "ffn=wg_xyz", "prefill", 4),
    ("ref-tiny-parallel", "2x2x1", "ffn=ws2d,attn=batch", "decode", 4),
    ("llama-tiny", "2x2x2", "ffn=ws2d,attn=batch", "decode", 8),
]


@pytest.mark.parametrize("model, mesh, layouts, phase, nproc", CASES, ids=lambda v: str(v))
def test_real_ranks(model, mesh, layouts, phase, nproc):
    report = shardwise.verify(model, mesh=mesh, layouts=layouts, phase=phase, nproc=nproc, bytes=True, tokens=16)
    assert report.ranks == "gloo"
    assert report.ok, str(report)
    if phase == "prefill":
        assert report.max_abs_diff <= 1e-5
    else:
        assert report.tokens_equal is True
    assert report.bytes_rows and all(p == m for _, _, p, m in report.bytes_rows)
    assert len(set(report.param_bytes_per_rank)) == 1  # every rank holds the same share
