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

palm-540b has 64 heads: PaLM 540B's 48, padded to 64 as the paper served it (PAPER.md), which is the
configuration its latency figures describe.
"""

from __future__ import annotations

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
    family: str  # "ref", "gpt2" or "llama"
    config: dict[str, Any]
    description: str
    shape_only: bool = False  # published sizes: plan them on the meta device
    extra: dict[str, Any] = field(default_factory=dict)


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
_LAYERS_KEY = {"ref": "n_layers", "gpt2": "n_layer", "llama": "num_hidden_layers"}


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
    bf16 (the published models' dtype); the tiny ones to float32 on the CPU."""
    p = get(name)
    device = torch.device(device or ("meta" if p.shape_only else "cpu"))
    dtype = dtype or (torch.bfloat16 if p.shape_only else torch.float32)
    cfg = dict(p.config)
    if layers is not None:
        cfg[_LAYERS_KEY[p.family]] = layers
    torch.manual_seed(seed)
    with torch.device(device), _skip_init(device.type == "meta"):
        model = _construct(p.family, cfg)
    return model.to(dtype).eval()


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


def _construct(family: str, cfg: dict[str, Any]) -> nn.Module:
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
    raise AssertionError(family)


def example_inputs(model: nn.Module, batch: int, seq: int, *, seed: int = 0) -> tuple[tuple, dict]:
    """(args, kwargs) for one prefill step of a preset model: random token ids [batch, seq]."""
    check_shape(model, batch=batch, seq=seq)
    device = next(model.parameters()).device
    vocab = model.cfg.vocab if isinstance(model, RefDecoder) else model.config.vocab_size
    if device.type == "meta":
        ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
    else:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    kwargs = {} if isinstance(model, RefDecoder) else {"use_cache": False}
    return (ids,), kwargs


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
