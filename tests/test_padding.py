"""Real prompts: a batch of prompts of different lengths, left-padded, with an attention mask.

`shardwise.generate(model, ids, n, attention_mask=mask, ...)` must give, in float32, exactly the tokens of
Hugging Face's own greedy generation with the same padding, `model.generate(ids, attention_mask=mask,
max_new_tokens=n, do_sample=False)`: positions `cumsum(mask) - 1` per row, padded cache positions hidden
from every later step. Checked on simulated ranks for Llama (RoPE, GQA) on 1x1x4 and 2x2x1 with attention
split by heads and by batch (and a weight-gathered feed-forward that splits the batch of the residual),
and for GPT-2, whose learned absolute position table is indexed by those positions (RoPE is blind to a
shift of a row's positions, so Llama checks the mask, GPT-2 the positions), BLOOM (ALiBi from the mask,
no positions given) and RoBERTa as a decoder (positions of its own unless given). `reference_generate`
takes the same mask. In bfloat16 the sharded logits of every step stay within a stated tolerance of the
unsharded model's. Masks generation cannot serve are refused with a ShardwiseError that says why.
"""

import pytest
import torch

import shardwise
from shardwise.drivers.generate import generate, reference_generate
from shardwise.models.presets import build_hf

PAD = 0
NEW = 4  # new tokens per prompt
LENGTHS = [7, 4, 2, 5]  # prompt lengths, padded on the left to 7

_models: dict[tuple[str, torch.dtype], torch.nn.Module] = {}


def _model(arch: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny seeded HF model (vocab 256, hidden 64, 4 heads; Llama with 2 KV heads), pad token set."""
    if (arch, dtype) not in _models:
        model = build_hf(arch, seed=0, dtype=dtype)
        model.generation_config.pad_token_id = PAD
        _models[arch, dtype] = model
    return _models[arch, dtype]


def _prompts(lengths=LENGTHS, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) [B, P]: random tokens, rows shorter than P left-padded with PAD under mask 0."""
    P = max(lengths)
    ids = torch.randint(1, 256, (len(lengths), P), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(len(lengths), P, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, P - n:] = 1
        ids[row, :P - n] = PAD
    return ids, mask


def _hf_tokens(model, ids, mask, new=NEW) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)


@pytest.fixture(scope="module")
def llama():
    model = _model("llama")
    ids, mask = _prompts()
    return model, ids, mask, _hf_tokens(model, ids, mask)


# ------------------------------------------------------------------------------------ float32: HF's tokens exactly
def test_reference_generate_takes_the_mask(llama):
    """The unsharded loop with the mask gives HF's tokens; every row the tokens it gets alone, unpadded;
    the padding matters (without the mask the padded rows go elsewhere)."""
    model, ids, mask, want = llama
    assert torch.equal(reference_generate(model, ids, NEW, attention_mask=mask), want)
    P = ids.shape[1]
    for row, n in enumerate(LENGTHS):
        alone = reference_generate(model, ids[row:row + 1, P - n:], NEW)
        assert torch.equal(alone[0, n:], want[row, P:]), f"row {row}"
    assert not torch.equal(reference_generate(model, ids, NEW), want)
    full = torch.ones_like(mask)  # an all-ones mask is the unpadded step's answer
    assert torch.equal(reference_generate(model, ids, NEW, attention_mask=full), reference_generate(model, ids, NEW))


@pytest.mark.parametrize("mesh,layouts", [
    ("1x1x4", "attn=heads"),  # 2 KV heads on 4 ranks: KV heads replicated ×2
    ("1x1x4", "attn=batch"),
    ("2x2x1", "attn=batch"),
    ("2x2x1", "ffn=wg_x,attn=heads"),  # the residual (and so the positions' users) split by batch over x
])
def test_llama_padded_tokens_equal_hf_generate(llama, mesh, layouts):
    """Sharded prefill + decode with the mask equals HF's greedy generation with the same padding, and the
    mask costs no communication: it is an input like the ids (replicated), every split of it a local slice."""
    model, ids, mask, want = llama
    gen = generate(model, ids, NEW, attention_mask=mask, mesh=mesh, layouts=layouts, simulate=True, details=True)
    assert torch.equal(gen.tokens, want), f"{gen.tokens}\n!=\n{want}"
    plain = generate(model, ids, NEW, mesh=mesh, layouts=layouts, simulate=True, details=True)
    for phase in ("prefill", "decode"):
        with_mask = [(c.kind, c.bytes) for c in gen.traces[phase].collectives]
        without = [(c.kind, c.bytes) for c in plain.traces[phase].collectives]
        assert with_mask == without, phase


def test_gpt2_learned_positions_equal_hf_generate():
    """GPT-2 adds a learned position table row per token: padded rows must read rows 0.., not their index."""
    model = _model("gpt2")
    ids, mask = _prompts([3, 6, 1])
    want = _hf_tokens(model, ids, mask)
    assert torch.equal(reference_generate(model, ids, NEW, attention_mask=mask), want)
    tokens = generate(model, ids, NEW, attention_mask=mask, mesh="2x2x1", layouts="attn=batch", simulate=True)
    assert torch.equal(tokens, want)


@pytest.mark.parametrize("arch", ["bloom", "roberta"])
def test_models_that_position_themselves_equal_hf_generate(arch):
    """BLOOM takes no position_ids (ALiBi biases from the mask itself: its heads' slopes split by heads here);
    RoBERTa as a decoder numbers positions from its ids unless given them, and generation gives them."""
    model = _model(arch)
    ids, mask = _prompts([2, 5, 4])
    want = _hf_tokens(model, ids, mask)
    assert torch.equal(reference_generate(model, ids, NEW, attention_mask=mask), want)
    if arch == "bloom":
        tokens = generate(model, ids, NEW, attention_mask=mask, mesh="1x1x4", layouts="attn=heads", simulate=True)
        assert torch.equal(tokens, want)


# ------------------------------------------------------------------------------------ bfloat16: logits within tolerance
BF16_ULPS = 8


def test_bf16_logits_within_tolerance_of_the_unsharded_model():
    """bfloat16 weights, run in bfloat16: every step's logits within atol = 8 · 2^-8 · max(1, max |logit|) of
    the unsharded bf16 model's, fed the same tokens (one forward over the whole padded sequence, no cache).

    Why 8 ulps: bfloat16 keeps 8 significant bits, so each rounding moves a value by up to u = 2^-8 of its
    magnitude. Sharding adds roundings the unsharded model does not make: each rank's partial sum of a split
    contraction is rounded to bf16 before the collective adds them, and the sum is rounded again, about 2 per
    sharded reduction; 2 blocks × 2 reductions (attention output, FFN down projection) + the head give ≤ 5,
    so ≤ ~10 u if all pushed one way. They mostly cancel and the norms rescale rather than amplify: measured
    here 1 u, and at most 3 u over 108 bf16 draws in test_fuzz.py, whose tolerance this is. A step that
    ignored the padding is off by ~100 u, checked below, so the tolerance still sees the mask.
    """
    model = _model("llama", torch.bfloat16)
    ids, mask = _prompts()
    P = ids.shape[1]
    gen = generate(model, ids, NEW, attention_mask=mask, mesh="2x2x1", layouts="attn=heads", simulate=True,
                   details=True)
    got = torch.stack(gen.logits, 1).float()  # [B, NEW, V]
    assert gen.logits[0].dtype == torch.bfloat16 and got.shape[1] == NEW
    full = torch.cat([mask, torch.ones(len(ids), NEW, dtype=torch.long)], 1)
    positions = (full.cumsum(-1) - 1).masked_fill(full == 0, 0)
    with torch.no_grad():
        want = model(input_ids=gen.tokens[:, :-1], attention_mask=full[:, :-1], position_ids=positions[:, :-1],
                     use_cache=False).logits[:, P - 1:].float()
        unpadded = model(input_ids=gen.tokens[:, :-1], use_cache=False).logits[:, P - 1:].float()
    atol = BF16_ULPS * 2.0**-8 * max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got, want, atol=atol, rtol=0)
    assert float((unpadded - want).abs().max()) > 4 * atol  # padding attended and mis-positioned: far outside


# ------------------------------------------------------------------------------------ refusals
def _refused(model, ids, mask, match):
    for run in (lambda: generate(model, ids, 2, attention_mask=mask, mesh="1x1x2", simulate=True),
                lambda: reference_generate(model, ids, 2, attention_mask=mask)):
        with pytest.raises(shardwise.ShardwiseError, match=match):
            run()


def test_right_padding_is_refused_with_the_fix():
    ids, mask = _prompts([4, 2])
    _refused(_model("llama"), ids, mask.flip(1), r"row 1 has padding after a token.*pad the prompts on the left")
    holes = torch.tensor([[1, 1, 1, 1], [0, 1, 0, 1]])
    _refused(_model("llama"), ids, holes, "row 1 has padding after a token")


@pytest.mark.parametrize("mask,match", [
    (torch.ones(2, 3, dtype=torch.long), r"expected a tensor of input_ids' shape \[2, 4\].*got torch.int64 \[2, 3\]"),
    ([[1, 1, 1, 1], [0, 0, 1, 1]], "expected a tensor of input_ids' shape.*got list"),
    (torch.tensor([[1, 1, 1, 1], [0, 2, 1, 1]]), r"only 0 \(padding\) and 1 \(token\), found \[2\]"),
    (torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]), "row 1 masks every position.*at least one token"),
])
def test_malformed_masks_are_refused(mask, match):
    ids, _ = _prompts([4, 2])
    _refused(_model("llama"), ids, mask, match)


def test_reference_decoder_refuses_a_mask(tiny):
    """RefDecoder numbers positions once for the batch (rotary tables [L, D]): a mask is refused, not ignored."""
    ids, mask = _prompts([4, 2])
    _refused(tiny("ref-tiny"), ids, mask, "reference decoder.*takes no padding mask")
