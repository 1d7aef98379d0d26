"""Named models: tiny ones with random weights to run, and published shapes to plan on the meta device.

| preset             | model                          | notes                                              |
|--------------------|--------------------------------|----------------------------------------------------|
| ref-tiny           | RefDecoder, serial, MHA, GELU  | 8 heads, E 64, F 256, 2 layers                     |
| ref-tiny-parallel  | RefDecoder, parallel, MQA, SwiGLU | PaLM-style block in miniature                    |
| ref-tiny-gqa       | RefDecoder, serial, GQA (K=2), SwiGLU |                                              |
| gpt2-tiny          | HF GPT2LMHeadModel             | fused QKV (Conv1D), tied embeddings, biases        |
| llama-tiny         | HF LlamaForCausalLM            | 8 heads, 2 KV heads (GQA)                          |
| palm-8b/62b/540b   | RefDecoder with PaLM shapes    | parallel, MQA, SwiGLU, V 256128, D 256 (meta only) |
| llama2-7b/70b      | HF LlamaForCausalLM shapes     | meta only                                          |
| mixtral-8x7b       | HF Mixtral (family "hf")       | 8 experts, top-2, GQA (meta only)                  |
| qwen3-235b-a22b    | HF Qwen3-MoE (family "hf")     | 128 experts, top-8, GQA 64/4 (meta only)           |
| gpt-oss-120b       | HF GPT-OSS (family "hf")       | 128 experts, top-4, sliding/full (meta only)       |
| deepseek-v3        | HF DeepSeek-V3 (family "hf")   | MLA, 256 routed + 1 shared, top-8 (meta only)      |
| mixtral-tiny       | HF Mixtral (family "hf")       | 4 experts, top-2, E 64: random weights, to run     |
| deepseek-v3-tiny   | HF DeepSeek-V3 (family "hf")   | MLA, dense block + 4 routed + 1 shared, E 64       |

palm-540b has 64 heads: PaLM 540B's 48, padded to 64 as the paper served it (PAPER.md), which is the
configuration its latency figures describe.

The mixture-of-experts presets (family "hf") are built by `transformers.AutoConfig.for_model(arch, **config)`
and `AutoModelForCausalLM.from_config` on the meta device in bf16: their experts are transformers 5's
stacked `[num_experts, ·, ·]` weights run by grouped matmuls (its default experts implementation). A
preset may say what its planning assumes (`Preset.assumes`): planning captures one block (a prototype,
`build_model(name, layers=1)`) and counts it for every block, so a model whose blocks differ is planned
as its repeated block, and a preset says how that differs from the model.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn as nn

from ..errors import ShardwiseError
from .reference import RefConfig, RefDecoder


@dataclass(frozen=True)
class Preset:
    name: str
    family: str  # "ref", "gpt2", "llama", or "hf" (any transformers architecture: `extra["arch"]`)
    config: dict[str, Any]
    description: str
    shape_only: bool = False  # published sizes: plan them on the meta device
    extra: dict[str, Any] = field(default_factory=dict)  # "hf": arch; "repeated": config of a prototype block
    assumes: str = ""  # what planning from one block assumes of this model, where its blocks differ


_TINY = dict(vocab=256, d_model=64, d_ff=256, n_layers=2, n_heads=8, max_seq=128)
_PALM = dict(vocab=256128, parallel=True, activation="swiglu", norm="rmsnorm", n_kv_heads=1, head_dim=256, max_seq=4096)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("ref-tiny", "ref", dict(_TINY, n_kv_heads=8), "reference decoder: serial blocks, MHA, GELU, LayerNorm"),
        Preset("ref-tiny-parallel", "ref", dict(_TINY, n_kv_heads=1, parallel=True, activation="swiglu", norm="rmsnorm"),
               "reference decoder: parallel blocks, MQA, SwiGLU, RMSNorm (PaLM in miniature)"),
        Preset("ref-tiny-gqa", "ref", dict(_TINY, n_kv_heads=2, activation="swiglu", norm="rmsnorm"),
               "reference decoder: serial blocks, GQA (2 KV heads), SwiGLU, RMSNorm"),
        Preset("gpt2-tiny", "gpt2", dict(vocab_size=256, n_embd=64, n_layer=2, n_head=8, n_positions=128),
               "HF GPT2LMHeadModel: fused QKV, biases, tied embeddings"),
        Preset("llama-tiny", "llama", dict(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                           num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128),
               "HF LlamaForCausalLM: 8 heads, 2 KV heads (GQA), SwiGLU, RMSNorm"),
        Preset("palm-8b", "ref", dict(_PALM, d_model=4096, d_ff=16384, n_layers=32, n_heads=16),
               "PaLM 8B shapes (parallel, MQA, SwiGLU)", shape_only=True),
        Preset("palm-62b", "ref", dict(_PALM, d_model=8192, d_ff=32768, n_layers=64, n_heads=32),
               "PaLM 62B shapes (parallel, MQA, SwiGLU)", shape_only=True),
        Preset("palm-540b", "ref", dict(_PALM, d_model=18432, d_ff=73728, n_layers=118, n_heads=64),
               "PaLM 540B shapes, heads padded 48→64 as served in the paper", shape_only=True),
        Preset("llama2-7b", "llama", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                          max_position_embeddings=4096), "Llama 2 7B shapes", shape_only=True),
        Preset("llama2-70b", "llama", dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                                           num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                                           max_position_embeddings=4096), "Llama 2 70B shapes (GQA, 8 KV heads)",
               shape_only=True),
    ]
}
GPT_OSS_ASSUMES = (
    "every layer is planned as layer 0 (sliding attention, window 128) over the whole KV cache: the step's static "
    "cache gives every layer the full context, masked, so the 18 sliding layers' KV cache (bytes and reads) is "
    "counted at the full context, not at 128 positions")
DEEPSEEK_V3_ASSUMES = (
    "all 61 layers are planned as mixture-of-experts layers (the prototype is one MoE block, the kind of 58 of "
    "them): the first 3 layers' dense FFN (F 18432, 0.40B parameters each) is counted as 256 routed experts + 1 "
    "shared (11.32B each), 32.8B parameters (65.5 GB in bf16) more than the model has; attention is transformers' "
    "MLA: the cache holds the compressed latent (512 + 64 values per token and layer), and every step expands "
    "the whole cache through kv_b_proj into per-head keys and values")
# Mixture-of-experts models at scale (family "hf": config attributes as transformers names them). Every figure
# is the model's published config.json; "verified" says which the installed transformers (5.24) confirms as
# its config class's defaults, and what it could not confirm.
_MOE = [
    # mistralai/Mixtral-8x7B-v0.1: hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads, 8 experts,
    # top-2, vocab 32000, 32768 positions. Verified: all but the positions are MixtralConfig's defaults (whose
    # docstring names this checkpoint); max_position_embeddings (default 131072) could not be.
    Preset("mixtral-8x7b", "hf",
           {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
            "max_position_embeddings": 32768},
           "Mixtral 8x7B shapes: 8 experts (F 14336), top-2, GQA 32/8", shape_only=True, extra={"arch": "mixtral"}),
    # Qwen/Qwen3-235B-A22B: hidden 4096, moe_intermediate 1536 (every layer sparse: decoder_sparse_step 1, no
    # mlp_only_layers; intermediate 12288 is unused), 94 layers, 64 heads, 4 KV heads, head_dim 128 (not hidden /
    # heads = 64), 128 experts, top-8, vocab 151936, 40960 positions. Verified against Qwen3MoeConfig's defaults
    # (which describe Qwen3-30B-A3B): 4 KV heads, 128 experts, top-8, vocab 151936, decoder_sparse_step 1; not
    # verifiable there: hidden 4096, moe_intermediate 1536, intermediate 12288, 94 layers, 64 heads, head_dim
    # 128 and the positions (defaults 2048, 768, 6144, 24, 32, none, 32768).
    Preset("qwen3-235b-a22b", "hf",
           {"hidden_size": 4096, "intermediate_size": 12288, "moe_intermediate_size": 1536, "num_hidden_layers": 94,
            "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
            "num_experts_per_tok": 8, "vocab_size": 151936, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "max_position_embeddings": 40960},
           "Qwen3-235B-A22B shapes: 128 experts (F 1536), top-8, GQA 64/4, head dim 128", shape_only=True,
           extra={"arch": "qwen3_moe"}),
    # openai/gpt-oss-120b: hidden 2880, intermediate 2880 (per expert), 36 layers, 64 heads, 8 KV heads, head_dim
    # 64, 128 experts, top-4, vocab 201088, layers alternating sliding (window 128) and full attention, 131072
    # positions. Verified: every figure is GptOssConfig's default (though its docstring names gpt-oss-20b, whose
    # 24 layers and 32 experts differ).
    Preset("gpt-oss-120b", "hf",
           {"hidden_size": 2880, "intermediate_size": 2880, "num_hidden_layers": 36, "num_attention_heads": 64,
            "num_key_value_heads": 8, "head_dim": 64, "num_local_experts": 128, "num_experts_per_tok": 4,
            "vocab_size": 201088, "sliding_window": 128, "max_position_embeddings": 131072},
           "gpt-oss-120b shapes: 128 experts (F 2880, gate/up interleaved, biases), top-4, GQA 64/8, "
           "sliding/full attention alternating", shape_only=True, extra={"arch": "gpt_oss"},
           assumes=GPT_OSS_ASSUMES),
    # deepseek-ai/DeepSeek-V3: hidden 7168, moe_intermediate 2048, intermediate 18432 (the first 3 dense layers),
    # 61 layers, 128 heads, MLA (q_lora_rank 1536, kv_lora_rank 512, qk_nope 128, qk_rope 64, v_head 128), 256
    # routed experts + 1 shared, top-8 (n_group 8, topk_group 4), vocab 129280, 163840 positions. Verified: all
    # but the positions are DeepseekV3Config's defaults (default 4096; the model reaches 163840 by YaRN rope
    # scaling, left at the default here: it changes no shape). Its multi-token-prediction layer is not built
    # (transformers' model has none).
    Preset("deepseek-v3", "hf",
           {"hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
            "first_k_dense_replace": 3, "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536,
            "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
            "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
            "vocab_size": 129280, "max_position_embeddings": 163840},
           "DeepSeek-V3 shapes: MLA, 256 routed experts (F 2048) + 1 shared, top-8 of 4 groups; first 3 layers dense",
           shape_only=True, extra={"arch": "deepseek_v3", "repeated": {"first_k_dense_replace": 0}},
           assumes=DEEPSEEK_V3_ASSUMES),
]
# The same architectures in miniature, random weights on the CPU (real-rank tests: each worker rebuilds the
# model from its preset on the meta device and reads its shards of a file).
_MOE_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=128, num_experts_per_tok=2, bos_token_id=0, eos_token_id=1, pad_token_id=None)
_MOE += [
    Preset("mixtral-tiny", "hf", dict(_MOE_TINY, num_key_value_heads=2, head_dim=16, num_local_experts=4),
           "HF Mixtral in miniature: 4 experts (F 256), top-2, GQA 4/2", extra={"arch": "mixtral"}),
    Preset("deepseek-v3-tiny", "hf",
           dict(_MOE_TINY, num_key_value_heads=4, moe_intermediate_size=64, n_routed_experts=4, n_shared_experts=1,
                first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32,
                v_head_dim=32, n_group=1, topk_group=1),
           "HF DeepSeek-V3 in miniature: MLA, a dense block then 4 routed experts (F 64) + 1 shared, top-2",
           extra={"arch": "deepseek_v3"}),
]
PRESETS.update({p.name: p for p in _MOE})
_LAYERS_KEY = {"ref": "n_layers", "gpt2": "n_layer", "llama": "num_hidden_layers", "hf": "num_hidden_layers"}


def get(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ShardwiseError(f"unknown model {name!r}: known presets are {', '.join(PRESETS)}") from None


def build_model(
    name: str, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
    seed: int = 0, layers: int | None = None,
) -> nn.Module:
    """Build a preset (random weights from `seed`). Shape-only presets default to the meta device in
    bf16 (the published models' dtype); the tiny ones to float32 on the CPU.

    `layers` fewer than the model has builds its first blocks; where the model's first blocks are not of
    its repeated kind (`extra["repeated"]`: DeepSeek-V3's dense layers), of the repeated kind: the planner
    builds one block as its prototype and counts it for every block (`Preset.assumes` says what that
    counts differently)."""
    p = get(name)
    device = torch.device(device or ("meta" if p.shape_only else "cpu"))
    dtype = dtype or (torch.bfloat16 if p.shape_only else torch.float32)
    cfg = dict(p.config)
    if layers is not None:
        if layers < cfg[_LAYERS_KEY[p.family]]:
            cfg.update(p.extra.get("repeated", {}))
        cfg[_LAYERS_KEY[p.family]] = layers
    torch.manual_seed(seed)
    with torch.device(device), _skip_init(device.type == "meta"):
        model = _construct(p.family, cfg, p.extra.get("arch"))
    model = model.to(dtype).eval()
    if p.family == "hf":
        _keep_in_fp32(model, dtype)
    return model


def _keep_in_fp32(model: nn.Module, dtype: torch.dtype) -> None:
    """The weights a transformers model keeps in float32 when loaded in bf16 or fp16 (its
    `_keep_in_fp32_modules_strict`, matched as `from_pretrained` matches them: a regular expression searched
    in each state key), back in float32 after `model.to(dtype)`: DeepSeek-V3's router weight and score bias,
    so the preset has the dtypes (and the router the graph) the published checkpoint loads with."""
    patterns = getattr(model, "_keep_in_fp32_modules_strict", None)
    if not patterns or dtype not in (torch.bfloat16, torch.float16):
        return
    import re

    keep = re.compile("|".join(f"(?:{p})" for p in sorted(patterns)))
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if keep.search(name) and t.is_floating_point():
            t.data = t.data.to(torch.float32)


@contextmanager
def _skip_init(skip: bool):
    """On the meta device there are no values to initialize (and some init ops are slow there)."""
    if not skip:
        yield
        return
    names = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
             "trunc_normal_", "zeros_", "ones_", "constant_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *a, **k: tensor)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def _construct(family: str, cfg: dict[str, Any], arch: str | None = None) -> nn.Module:
    if family == "ref":
        return RefDecoder(RefConfig(**cfg))
    import transformers  # optional dependency: only HF presets need it

    if family == "gpt2":
        c = transformers.GPT2Config(**cfg, attn_implementation="sdpa", bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(c)
    if family == "llama":
        c = transformers.LlamaConfig(**cfg, attn_implementation="sdpa", bos_token_id=0, eos_token_id=0,
                                     pad_token_id=None)
        return transformers.LlamaForCausalLM(c)
    if family == "hf":  # experts as transformers 5 builds them by default: stacked weights, grouped matmuls
        c = transformers.AutoConfig.for_model(arch, **cfg)
        return transformers.AutoModelForCausalLM.from_config(c)
    raise AssertionError(family)


def example_inputs(model: nn.Module, batch: int, seq: int, *, seed: int = 0) -> tuple[tuple, dict]:
    """(args, kwargs) for one prefill step of a preset model: random token ids [batch, seq]."""
    check_shape(model, batch=batch, seq=seq)
    device = next(model.parameters()).device
    vocab = vocab_size(model)
    if device.type == "meta":
        ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
    else:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    kwargs = {} if isinstance(model, RefDecoder) else {"use_cache": False}
    return (ids,), kwargs


def vocab_size(model: nn.Module) -> int:
    """The number of token ids the model embeds (an HF model's input table: its config may name it in a
    sub-configuration, as multimodal ones do)."""
    if isinstance(model, RefDecoder):
        return model.cfg.vocab
    table = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return table.num_embeddings if isinstance(table, nn.Embedding) else model.config.vocab_size


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's position embeddings hold (None: no limit it states)."""
    cfg = model.cfg if isinstance(model, RefDecoder) else getattr(model, "config", None)
    for name in ("max_seq", "n_positions", "max_position_embeddings"):
        if isinstance(getattr(cfg, name, None), int):
            return getattr(cfg, name)
    return None


def check_shape(model: nn.Module, *, batch: int, seq: int, context: int | None = None) -> None:
    """Batch, sequence and cache length: positive whole numbers the model can hold, or a ShardwiseError."""
    for name, v in (("batch", batch), ("seq", seq), ("context", context)):
        if v is None and name == "context":
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ShardwiseError(f"{name}={v!r}: expected a whole number ≥ 1")
    longest = max_positions(model)
    need = max(seq, context or 0)
    if longest is not None and need > longest:
        raise ShardwiseError(f"{type(model).__name__} holds at most {longest} positions (its position embeddings), "
                             f"but {need} were asked for (seq={seq}, context={context}); use seq and context ≤ {longest}")


def with_layers(p: Preset, layers: int) -> Preset:
    cfg = dict(p.config)
    cfg[_LAYERS_KEY[p.family]] = layers
    return replace(p, config=cfg)


# ------------------------------------------------------------------------------------ any HF architecture
@dataclass(frozen=True)
class Small:
    """The sizes a Hugging Face configuration is shrunk to (`tiny_hf_config`).

    4 query heads divide a mesh of 4 chips; 2 KV heads (where the family has grouped KV heads) do not,
    so those are split as far as they go and replicated over the rest. The intermediate size is 4 × E,
    so attention, feed-forward and the tables keep the proportions of a real model.
    """

    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 256
    expert_ffn: int = 64
    vocab: int = 256
    positions: int = 128
    experts: int = 4
    experts_per_token: int = 2
    rank: int = 32  # low-rank projections (MLA's q/kv LoRA ranks)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


# what each size is called across families (config attribute names, sub-configurations included)
_HF_NAMES = {
    "layers": {"num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "encoder_layers"},
    "hidden": {"hidden_size", "n_embd", "d_model", "emb_dim", "embed_dim", "n_embed", "model_dim", "dim",
               "word_embed_proj_dim", "embedding_size"},
    "heads": {"num_attention_heads", "n_head", "n_heads", "num_heads", "attention_heads", "decoder_attention_heads",
              "encoder_attention_heads", "swa_num_attention_heads"},
    "kv_heads": {"num_key_value_heads", "num_kv_heads", "n_kv_heads", "kv_n_heads", "multi_query_group_num",
                 "swa_num_key_value_heads"},
    "vocab": {"vocab_size", "n_words", "encoder_hash_byte_group_vocab"},  # (BLT's hash n-gram tables: 500002)
    "positions": {"max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"},
    "experts": {"num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"},
    "experts_per_token": {"num_experts_per_tok", "moe_k", "moe_topk", "moe_top_k", "num_experts_per_token"},
    "rank": {"q_lora_rank", "kv_lora_rank", "o_lora_rank"},
}
_LAYER_LISTS = ("layer_types", "layers_block_type", "block_types")
# widths a family sets apart from the hidden size, shrunk in their default's proportion to it (hidden / width):
# Gemma 3n / 4's per-layer inputs (256 of 2048) and Gemma 3n's LAuReL low-rank residual (64 of 2048). Left at
# their defaults, the tiny model's pieces around them (replicated) outweighed its feed-forwards
_PER_HIDDEN = {"hidden_size_per_layer_input": 8, "laurel_rank": 32}
# constraints of a family's configuration the generic shrinking cannot see (checked by its validator)
_HF_QUIRKS: dict[str, dict[str, Any]] = {
    "mamba2": {"num_heads": 8},  # its SSM heads: hidden · expand = heads · head_dim
    "zaya": {"num_experts_per_tok": 1},  # routes every token to one expert only
    "gemma3n_text": {"num_kv_shared_layers": 0},  # 2 layers leave none to share another's cache
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},  # its default leaves them unset
}


def tiny_hf_config(arch: str, small: Small | None = None, **overrides):
    """The default configuration of Hugging Face architecture `arch` (a key of the installed
    transformers' auto mappings, e.g. "llama", "falcon"), shrunk to `small`'s sizes.

    The shrinking is generic: every attribute (in sub-configurations too) whose name is one of the
    spellings of a size (`_HF_NAMES`) takes the small value; every intermediate size (a name with
    "intermediate", "ffn" or "inner") the small feed-forward width; every head dimension (rotary and
    value parts included) is scaled so the head dim becomes E / heads, keeping their ratios; sizes
    given per layer keep the first layer's, per-layer tables keep the first layers' entries, and lists
    of per-layer types keep one layer of each kind, in order; a head dim or KV head count the default
    leaves unset (None) is set; special token ids outside the small vocabulary move inside it. `overrides`
    are set last, as given (e.g. `multi_query=False` for Falcon).
    """
    from transformers import AutoConfig

    small = small or Small()
    default = AutoConfig.for_model(arch)
    kwargs = _shrink(default.to_dict(), small, _had_gqa(default.to_dict()))
    kwargs["is_decoder"] = True  # a causal-LM head on an encoder family (BERT, RoBERTa) attends causally only so
    kwargs.update(_HF_QUIRKS.get(arch, {}))
    kwargs.update(overrides)
    return AutoConfig.for_model(arch, **kwargs)


def _had_gqa(cfg: dict) -> bool | None:
    """Whether the default configuration has fewer KV heads than query heads (None: it names no KV heads)."""
    heads = next((cfg[k] for k in _HF_NAMES["heads"] if isinstance(cfg.get(k), int)), None)
    kv = next((cfg[k] for k in _HF_NAMES["kv_heads"] if isinstance(cfg.get(k), int)), None)
    return None if kv is None or heads is None else kv < heads


def _shrink(cfg: dict, small: Small, gqa: bool | None) -> dict:
    """The attributes of one (sub-)configuration that change, by the rules of `tiny_hf_config`."""
    out: dict[str, Any] = {}
    # head dims keep their ratios (MLA: rope, no-rope and value parts), scaled by a power of two so sums stay sums
    per_head = 2.0 ** round(math.log2(small.head_dim / _head_dim(cfg)))
    n_layers = next((cfg[k] for k in _HF_NAMES["layers"] if isinstance(cfg.get(k), int)), None)
    for key, value in cfg.items():
        if isinstance(value, dict) and value and all(str(k).isdigit() for k in value):  # per layer index
            out[key] = {k: v for k, v in value.items() if int(k) < small.layers}
        elif isinstance(value, dict) and key.endswith("config"):
            out[key] = {**value, **_shrink(value, small, _had_gqa(value) if gqa is None else gqa)}
        elif key in _LAYER_LISTS and isinstance(value, list) and value:
            kinds = list(dict.fromkeys(value))  # one layer of each kind, in order
            out[key] = (kinds * small.layers)[:small.layers]
        elif isinstance(value, list) and value and len(value) == n_layers:  # a value per layer: the first ones
            first = [_shrunk_size(key, v, small, gqa, per_head) if isinstance(v, int) else None for v in value]
            out[key] = [v if f is None else f for v, f in zip(value, first)][:small.layers]
        elif value is None or (isinstance(value, int) and not isinstance(value, bool)):
            new = _shrunk_size(key, value, small, gqa, per_head)
            if new is not None:
                out[key] = new
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(cfg.get(key), list):
            out[key] = [t for t in cfg[key] if t < small.vocab] or None
    return out


def _head_dim(cfg: dict) -> float:
    """The default head dim: `head_dim` if set, else hidden / heads."""
    if isinstance(cfg.get("head_dim"), int) and cfg["head_dim"] > 0:
        return cfg["head_dim"]
    hidden = next((cfg[k] for k in _HF_NAMES["hidden"] if isinstance(cfg.get(k), int)), None)
    heads = next((cfg[k] for k in _HF_NAMES["heads"] if isinstance(cfg.get(k), int)), None)
    return hidden / heads if hidden and heads else Small().head_dim


def _shrunk_size(key: str, value: int | None, small: Small, gqa: bool | None, per_head: float) -> int | None:
    """The small value of one integer attribute (None: keep it). An unset (None) size the model would
    divide by gets the small value too; other unset attributes stay unset."""
    size = next((s for s, names in _HF_NAMES.items() if key in names), None)
    if size == "kv_heads":
        return small.heads if value is None else 1 if value == 1 else small.kv_heads if gqa else small.heads
    if size is None and key.endswith("embedding_size") and value is not None:  # RemBERT's input/output widths
        size = "hidden"
    if size is not None:
        return getattr(small, size) if value is not None or size in ("experts", "experts_per_token") else None
    if key in _PER_HIDDEN and value:
        return max(2, small.hidden // _PER_HIDDEN[key])
    if key.endswith("head_dim") or key in ("kv_channels", "dim_head", "rotary_dim"):
        if value is None:
            return small.head_dim if key == "head_dim" else None
        return max(2, round(value * per_head))
    if value is None:
        return None
    if ("intermediate" in key or "ffn" in key or key in ("n_inner", "d_ff", "dim_ff", "dff")) and value > 1:
        return small.expert_ffn if ("moe" in key or "expert" in key) else small.ffn
    if key in ("n_group", "topk_group", "num_expert_group"):
        return 1
    if key == "first_k_dense_replace":
        return min(value, 1)
    if key.endswith(("_token_id", "_token_index")) and value >= small.vocab:
        return small.vocab - 1
    return None


def build_hf(arch: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, small: Small | None = None,
             **overrides) -> nn.Module:
    """A Hugging Face causal LM of architecture `arch` with `tiny_hf_config`'s sizes and random weights
    from `seed` (no weights are downloaded), in eval mode."""
    from transformers import AutoModelForCausalLM

    config = tiny_hf_config(arch, small, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if hasattr(model, "set_default_language") and getattr(config, "languages", None):
        model.set_default_language(config.languages[0])  # X-MOD's adapters are per language: pick one
    return model.to(dtype).eval()
