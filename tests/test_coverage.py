"""Coverage of Hugging Face causal-LM architectures (experiments/coverage.py), on a representative subset.

The full sweep (every architecture of the installed transformers' causal-LM mapping, about 200) takes
half an hour on two cores, too long for CI: `python -m shardwise.experiments.coverage` runs it and
writes the README table. Here a fixed subset covers each way a model is recognised or refused, each
architecture within a time budget (`check` turns an overrun into a crash verdict, which fails):

  sharded   Llama (RoPE, SwiGLU), Qwen2 (GQA, 2 KV heads on 4 ranks), GPT-2 (Conv1D, fused QKV), Falcon
            (`x @ W.T`, multiquery), BLOOM (ALiBi in an explicit attention, QKV fused per head), GPT-NeoX
            (parallel block), OPT (positions from the mask), Gemma 2 (soft-capped explicit attention),
            BERT as a decoder (post-norm)
  experts   Mixtral: a mixture of experts, its experts run replicated and reported so
  refused   Mamba (state space), Qwen3-Next (hybrid with linear attention), BART's decoder (cross-attention
            over an encoder's states)
"""

import pytest

from shardwise.experiments import coverage
from shardwise.experiments.coverage import Result, Status

EXPECTED = {
    "llama": Status.SHARDED,
    "qwen2": Status.SHARDED,
    "gpt2": Status.SHARDED,
    "falcon": Status.SHARDED,
    "bloom": Status.SHARDED,
    "gpt_neox": Status.SHARDED,
    "opt": Status.SHARDED,
    "gemma2": Status.SHARDED,
    "bert": Status.SHARDED,
    "mixtral": Status.EXPERTS,
    "mamba": Status.REFUSED,
    "qwen3_next": Status.REFUSED,
    "bart": Status.REFUSED,
}
BUDGET_S = 240  # per architecture: 2 meshes × 2 layouts, prefill and 8 tokens each (about 10 s alone)
REASONS = {  # what a refusal must say
    "mamba": "not a decoder-only attention transformer: block backbone.layers.0",
    "qwen3_next": "not a decoder-only attention transformer",
    "bart": "not a decoder-only model: the captured call reads none of",
}


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    coverage._quiet()


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_architecture(arch):
    """Sharded ones: logits within 1e-5 and 8 greedy tokens equal on 1x1x4 and 2x2x1, by cost and with
    ffn=ws2d, every rank within 1/n + the named replicated pieces, those under 10% of the model."""
    r = coverage.check(arch, timeout_s=BUDGET_S)
    assert r.status == EXPECTED[arch], f"{arch}: {r.status.value}: {r.detail}"
    if r.status == Status.SHARDED:
        assert r.replicated is not None and r.replicated < coverage.MAX_REPLICATED
    if r.status == Status.EXPERTS:
        assert "experts run replicated" in r.detail and "mlp" in r.detail
    if arch in REASONS:
        assert REASONS[arch] in r.detail, r.detail


def test_the_sweep_lists_the_installed_mapping():
    archs = coverage.architectures()
    assert len(archs) > 50 and {"llama", "falcon", "gpt2", "mamba"} <= set(archs)


def test_table_and_markdown_count_every_status():
    results = [Result("a", Status.SHARDED, "ws2d+heads", 1.0, 0.05), Result("b", Status.EXPERTS, "experts run "
               "replicated: layers.0.mlp", 2.0, 0.6), Result("c", Status.REFUSED, "not a | decoder", 0.5),
               Result("d", Status.CRASH, "KeyError", 0.1)]
    counts = coverage.counts(results)
    assert counts[Status.SHARDED] == counts[Status.EXPERTS] == counts[Status.REFUSED] == counts[Status.CRASH] == 1
    text = coverage.table(results)
    assert "4 architectures: 1 fully sharded and correct, 1 experts replicated, 1 refused, 0 wrong, 1 crash" in text
    assert "slowest: b 2 s" in text
    md = coverage.markdown(results)
    assert "| `c` | refused |  | not a \\| decoder |" in md and "**1** fully sharded and correct" in md
