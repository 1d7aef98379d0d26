"""Layers recognised by what the graph computes, not by op or module names.

Falcon writes its projections `input @ self.weight.T` (`numpy_T` + `matmul`), fuses q, k and v into one
projection three ways (multiquery: [.., H + 2, D] sliced by heads; per head: [.., H, 3, D]; grouped by
KV heads: new_decoder_architecture), calls its KV-head count `num_kv_heads` and keeps 1 KV head under
multi_query whatever that count says. Hand-written models below spell a linear `x @ self.weight.T` and
attention as matmul → softmax → matmul. Each must be found (attention and feed-forward), sharded, give
the unsharded numbers (atol 1e-5, see test_numerics.py), and Falcon must also decode with its KV cache
split. Models that are not decoder-only attention transformers are refused with a ShardwiseError.
"""

import math

import pytest
import torch
import torch.nn as nn

import shardwise
from shardwise.drivers.generate import reference_generate
from shardwise.ir.meta import LAYERS
from shardwise.models.presets import build_hf
from shardwise.models.steps import cache_shapes
from shardwise.planning.program import capture_program

ATOL = 1e-5
FALCONS = {  # name → config overrides; heads 4, KV heads as Falcon computes them
    "multiquery": ({"multi_query": True}, 1),
    "per-head": ({"multi_query": False}, 4),
    "new-decoder-kv2": ({"new_decoder_architecture": True, "num_kv_heads": 2}, 4),  # K broadcast to H, then cached
    "new-decoder-kv4": ({"new_decoder_architecture": True, "num_kv_heads": 4}, 4),
}
_built: dict[str, nn.Module] = {}


def _falcon(name: str) -> nn.Module:
    if name not in _built:
        _built[name] = build_hf("falcon", **FALCONS[name][0])
    return _built[name]


def _ids(vocab: int, batch: int = 2, seq: int = 8) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))


def _layers(model, args, kwargs=None):
    return capture_program(model, args, kwargs or {}).meta[LAYERS]


def _sharded_equals_unsharded(model, args, kwargs, mesh, layouts=None):
    plan = shardwise.plan(model, args, kwargs, mesh=mesh, layouts=layouts)
    with torch.no_grad():
        got = shardwise.simulate(plan, args, kwargs)
        want = model(*args, **kwargs)
    got, want = (x if isinstance(x, torch.Tensor) else x.logits for x in (got, want))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    return plan


# ------------------------------------------------------------------------------------ Falcon
@pytest.mark.parametrize("name", list(FALCONS))
def test_falcon_layers_found(name):
    """Every block has an attention (q, k, v, o) and a feed-forward, whatever the fused QKV's layout."""
    model = _falcon(name)
    layers = _layers(model, (_ids(256),), {"use_cache": False})
    kinds = [l.kind for l in layers.layers]
    assert kinds == ["embedding"] + ["attention", "ffn"] * 2 + ["head"]
    attn = layers.by_kind("attention")[0]
    assert {"q", "k", "v", "o"} <= set(attn.projections)
    assert (attn.dims["H"], attn.dims["D"]) == (4, 16)
    assert attn.dims["K"] == FALCONS[name][1]
    assert all(b.attention and b.ffn for b in layers.blocks)


def test_falcon_multiquery_is_unfused_by_heads():
    """[.., H + 2, D] sliced into heads 0..H-1, [H] and [H+1]: three projections of H·D, D and D features."""
    attn = _layers(_falcon("multiquery"), (_ids(256),), {"use_cache": False}).by_kind("attention")[0]
    assert [attn.projections[r].out_features for r in "qkv"] == [64, 16, 16]
    assert attn.info["variant"] == "MQA" and not attn.info["fused_qkv"]


@pytest.mark.parametrize("name", list(FALCONS))
def test_falcon_cache_shape_is_what_it_computes(name):
    """The KV cache is allocated as the model fills it: 1 KV head under multi_query (its config says 4)."""
    K = FALCONS[name][1]
    assert cache_shapes(_falcon(name)) == [((K, 16), (K, 16))] * 2


@pytest.mark.parametrize("mesh", ["1x1x4", "2x2x1"])
@pytest.mark.parametrize("name", list(FALCONS))
def test_falcon_sharded_numbers_and_decode(name, mesh):
    """Prefill logits equal the unsharded model's; 6 greedy tokens with the KV cache split equal its own."""
    model = _falcon(name)
    ids = _ids(256)
    plan = _sharded_equals_unsharded(model, (ids,), {"use_cache": False}, mesh, "ffn=ws2d" if mesh == "2x2x1" else None)
    assert not [r for r in plan.memory.replicated if "query_key_value" in r.key and name == "per-head"]
    tokens = shardwise.generate(model, ids, 6, mesh=mesh, simulate=True)
    assert torch.equal(tokens, reference_generate(model, ids, 6))


# ------------------------------------------------------------------------------------ hand-written models
class TransposedLinear(nn.Module):
    """A linear written by hand: `x @ self.weight.T + self.bias` (exports as numpy_T/t + matmul)."""

    def __init__(self, n_in: int, n_out: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / math.sqrt(n_in))
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1) if bias else None

    def forward(self, x):
        y = x @ self.weight.T
        return y + self.bias if self.bias is not None else y


class Stored(nn.Module):
    """A weight stored [in, out] and used as `x @ self.weight` (no transpose at all)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / math.sqrt(n_in))

    def forward(self, x):
        return torch.matmul(x, self.weight)


class Block(nn.Module):
    """Pre-norm block; attention by SDPA or spelled out (scores, optional ALiBi-style bias, mask, softmax)."""

    def __init__(self, E: int, H: int, F: int, explicit: bool, alibi: bool):
        super().__init__()
        self.H, self.D, self.explicit, self.alibi = H, E // H, explicit, alibi
        self.ln1, self.ln2 = nn.LayerNorm(E), nn.LayerNorm(E)
        self.q, self.k, self.v = TransposedLinear(E, E), TransposedLinear(E, E), TransposedLinear(E, E)
        self.o = TransposedLinear(E, E)
        self.up, self.down = Stored(E, F), TransposedLinear(F, E)

    def attend(self, q, k, v):
        if not self.explicit:
            return nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        L = q.shape[2]
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.D)
        if self.alibi:
            slopes = torch.arange(1, self.H + 1, dtype=q.dtype).view(1, self.H, 1, 1) / self.H
            scores = scores + slopes * torch.arange(L, dtype=q.dtype).view(1, 1, 1, L)
        causal = torch.ones(L, L, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(causal, float("-inf"))
        return scores.softmax(dim=-1) @ v

    def forward(self, x):
        B, L, E = x.shape
        h = self.ln1(x)
        q, k, v = (p(h).view(B, L, self.H, self.D).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = self.attend(q, k, v).transpose(1, 2).reshape(B, L, E)
        x = x + self.o(a)
        return x + self.down(nn.functional.gelu(self.up(self.ln2(x))))


class HandWritten(nn.Module):
    def __init__(self, *, explicit: bool = False, alibi: bool = False, V: int = 128, E: int = 64, H: int = 4,
                 F: int = 256, n: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(V, E)
        self.blocks = nn.ModuleList(Block(E, H, F, explicit, alibi) for _ in range(n))
        self.norm = nn.LayerNorm(E)
        self.head = TransposedLinear(E, V, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))


def _targets(gm) -> set:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


def test_transposed_linear_is_a_projection():
    """`x @ W.T` and `x @ W` on weight placeholders become linear / mm: every layer is found."""
    model = HandWritten()
    gm = capture_program(model, (_ids(128),), {})
    targets = _targets(gm)
    assert torch.ops.aten.matmul.default not in targets and torch.ops.aten.numpy_T.default not in targets
    layers = gm.meta[LAYERS]
    assert [l.kind for l in layers.layers] == ["embedding"] + ["attention", "ffn"] * 2 + ["head"]
    ffn = layers.by_kind("ffn")[0]
    assert ffn.projections["w_in"].rows_out is False and ffn.projections["w_out"].rows_out is True
    assert ffn.dims == {"E": 64, "F": 256}


@pytest.mark.parametrize("mesh, layouts", [("1x1x4", "ffn=ws1d,attn=heads"), ("2x2x1", "ffn=ws2d,attn=heads"),
                                           ("2x2x1", "ffn=ws2d,attn=batch")])
def test_transposed_linear_sharded_numbers(mesh, layouts):
    plan = _sharded_equals_unsharded(HandWritten(), (_ids(128, batch=4),), {}, mesh, layouts)
    assert plan.memory.replicated_per_chip < 0.05 * plan.memory.weights_total / plan.mesh.size


@pytest.mark.parametrize("alibi", [False, True], ids=["causal", "alibi"])
def test_explicit_attention_becomes_sdpa(alibi):
    """matmul → (+ bias) → masked_fill → softmax → matmul is rewritten as one scaled_dot_product_attention
    (the bias and the mask folded into its attn_mask, the 1/√D into its scale), found as attention."""
    model = HandWritten(explicit=True, alibi=alibi)
    gm = capture_program(model, (_ids(128),), {})
    targets = _targets(gm)
    assert torch.ops.aten.scaled_dot_product_attention.default in targets
    assert not targets & {torch.ops.aten.softmax.int, torch.ops.aten._softmax.default}
    attn = gm.meta[LAYERS].by_kind("attention")
    assert len(attn) == 2 and (attn[0].dims["H"], attn[0].dims["K"], attn[0].dims["D"]) == (4, 4, 16)


@pytest.mark.parametrize("alibi", [False, True], ids=["causal", "alibi"])
@pytest.mark.parametrize("mesh, layouts", [("1x1x4", "ffn=ws1d,attn=heads"), ("2x2x1", "ffn=ws2d,attn=batch")])
def test_explicit_attention_sharded_numbers(alibi, mesh, layouts):
    """The rewritten attention gives the explicit one's numbers, sharded by heads or by batch."""
    _sharded_equals_unsharded(HandWritten(explicit=True, alibi=alibi), (_ids(128, batch=4),), {}, mesh, layouts)


def test_soft_capped_attention_is_found_without_rewriting():
    """Gemma 2 caps its scores with tanh: not an SDPA, but still attention (its softmax is the core)."""
    model = build_hf("gemma2")
    layers = _layers(model, (_ids(256),), {"use_cache": False})
    attn = layers.by_kind("attention")
    assert len(attn) == 2 and all(b.attention and b.ffn for b in layers.blocks)
    _sharded_equals_unsharded(model, (_ids(256),), {"use_cache": False}, "1x1x4")


# ------------------------------------------------------------------------------------ refusals
class RunningSum(nn.Module):
    """Mixes tokens with a gated running sum over the sequence (a linear recurrence), not attention."""

    def __init__(self, E: int):
        super().__init__()
        self.inp, self.out = nn.Linear(E, 2 * E), nn.Linear(E, E)

    def forward(self, x):
        a, b = self.inp(x).chunk(2, dim=-1)
        return x + self.out(a.cumsum(dim=1) * torch.sigmoid(b))


class Recurrent(nn.Module):
    def __init__(self, V: int = 64, E: int = 32, n: int = 2):
        super().__init__()
        self.embed = nn.Embedding(V, E)
        self.layers = nn.ModuleList(RunningSum(E) for _ in range(n))
        self.head = nn.Linear(E, V)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_block_without_attention_is_refused():
    """Projections that feed no attention and are no feed-forward: a ShardwiseError naming the block."""
    with pytest.raises(shardwise.ShardwiseError, match=r"not a decoder-only attention transformer: block layers\.0 .* "
                                                       r"feed no attention"):
        capture_program(Recurrent(), (_ids(64),), {})


def test_state_space_model_is_refused():
    """Mamba keeps a recurrent state in its cache, not keys and values: refused before capture."""
    model = build_hf("mamba")
    with pytest.raises(shardwise.ShardwiseError, match="not a decoder-only attention transformer.*LinearAttention"):
        shardwise.generate(model, _ids(256), 2, mesh="1x1x2", simulate=True)
    with pytest.raises(shardwise.ShardwiseError, match="feed no attention"):
        shardwise.plan(model, (_ids(256),), {"use_cache": False}, mesh="1x1x2")


def test_decoder_of_an_encoder_decoder_is_refused():
    """BART's decoder has cross-attention over encoder states a token-only call never gives."""
    with pytest.raises(shardwise.ShardwiseError, match="not a decoder-only model: .*reads none of .*encoder_attn"):
        shardwise.plan(build_hf("bart"), (_ids(256),), {"use_cache": False}, mesh="1x1x2")
