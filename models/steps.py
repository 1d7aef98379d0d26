"""One step of generation with the KV cache as explicit inputs and outputs, for every model family.

    step = as_step(model)                         # RefDecoder: itself; HF models: HFStep(model)
    k, v = empty_cache(model, batch, length)      # per layer a [B, K, S, D] zero tensor
    logits, k, v = step(ids, pos, k, v)           # ids [B, L] written at positions pos .. pos+L-1

The same step serves prefill (L = prompt length, pos = 0) and decode (L = 1, pos = tokens so far), so
torch.export captures each phase as a pure function whose cache layout the planner can choose.

HF models keep their cache in `Cache` objects that update tensors in place; `HFStep` hands them a
functional static layer instead (`index_copy`, not `index_copy_`), so the new cache is an output.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ShardwiseError
from .presets import check_shape
from .reference import RefDecoder


def _functional_layer_class():
    from transformers.cache_utils import StaticLayer

    class FunctionalStaticLayer(StaticLayer):
        """A static cache layer over given tensors whose update returns new tensors (no mutation)."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor):
            super().__init__(max_cache_len=keys.shape[2])
            self.keys, self.values = keys, values
            self.cumulative_length = pos
            self.device = keys.device
            self.batch_size, self.num_heads = keys.shape[:2]
            self.k_head_dim, self.v_head_dim = keys.shape[-1], values.shape[-1]
            self.is_initialized = True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            positions = torch.arange(key_states.shape[-2], device=key_states.device) + self.cumulative_length
            self.keys = self.keys.index_copy(2, positions, key_states)
            self.values = self.values.index_copy(2, positions, value_states)
            return self.keys, self.values

    return FunctionalStaticLayer


class Step(nn.Module):
    """Any supported causal LM as a pure step function of (ids, pos, k_cache, v_cache).

    `last_only`: return logits for the last position only ([B, 1, V]), as serving does.
    """

    shardwise_root = "model"  # capture names layers and weights as the model does, without "model."

    def __init__(self, model: nn.Module, *, last_only: bool = False):
        super().__init__()
        self.model = model
        self.last_only = last_only

    def forward(self, input_ids, pos, k_cache, v_cache):
        if isinstance(self.model, RefDecoder):
            return self.model(input_ids, pos, k_cache, v_cache, last_only=self.last_only)
        from transformers.cache_utils import Cache

        layer = _functional_layer_class()
        cache = Cache(layers=[layer(k, v, pos) for k, v in zip(k_cache, v_cache)])
        B, L = input_ids.shape
        positions = torch.arange(L, device=input_ids.device) + pos  # [L]
        out = self.model(input_ids=input_ids, **{_cache_kwarg(self.model): cache}, cache_position=positions,
                         position_ids=positions[None].expand(B, L), use_cache=True,
                         logits_to_keep=1 if self.last_only else 0)
        return out.logits, tuple(l.keys for l in cache.layers), tuple(l.values for l in cache.layers)


def _cache_kwarg(model: nn.Module) -> str:
    """transformers 5 names the cache argument `cache`; earlier versions `past_key_values`."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def as_step(model: nn.Module, *, last_only: bool = False) -> nn.Module:
    return Step(model, last_only=last_only)


def cache_dims(model: nn.Module) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of a model's cache."""
    if isinstance(model, RefDecoder):
        c = model.cfg
        return len(model.blocks), c.n_kv_heads, c.d_head
    c = model.config
    heads = c.num_attention_heads if hasattr(c, "num_attention_heads") else c.n_head
    kv = getattr(c, "num_key_value_heads", None) or heads
    hidden = c.hidden_size if hasattr(c, "hidden_size") else c.n_embd
    layers = c.num_hidden_layers if hasattr(c, "num_hidden_layers") else c.n_layer
    return layers, kv, getattr(c, "head_dim", None) or hidden // heads


def empty_cache(model: nn.Module, batch: int, length: int, *, dtype=None, device=None):
    """(k_cache, v_cache): per layer a zero [batch, K, length, D] tensor."""
    layers, K, D = cache_dims(model)
    p = next(model.parameters())

    def zeros() -> tuple[torch.Tensor, ...]:
        return tuple(torch.zeros(batch, K, length, D, dtype=dtype or p.dtype, device=device or p.device)
                     for _ in range(layers))

    return zeros(), zeros()


def step_inputs(model: nn.Module, ids: torch.Tensor, pos: int, cache: tuple) -> tuple:
    """Positional arguments of one step."""
    return (ids, torch.tensor(pos, dtype=torch.long, device=ids.device), cache[0], cache[1])


def phase_inputs(model: nn.Module, phase: str, *, batch: int, seq: int, context: int | None = None,
                 seed: int = 0) -> tuple:
    """Arguments of one step of `phase` for a model (random ids, or zeros on the meta device).

    prefill: `seq` prompt tokens at position 0 into a cache of `context` (default `seq`) positions;
    decode:  one token at the last position of a cache of `context` (default `seq`) positions.
    """
    if phase not in ("prefill", "decode"):
        raise ShardwiseError(f"unknown phase {phase!r}: use 'prefill' or 'decode'")
    check_shape(model, batch=batch, seq=seq, context=context)
    S = context or seq
    L = seq if phase == "prefill" else 1
    if phase == "prefill" and S < seq:
        raise ShardwiseError(f"context {S} is shorter than the {seq} prompt tokens it must hold: "
                             f"give context ≥ seq")
    p = next(model.parameters())
    vocab = model.cfg.vocab if isinstance(model, RefDecoder) else model.config.vocab_size
    if p.device.type == "meta":
        ids = torch.zeros(batch, L, dtype=torch.long, device=p.device)
    else:
        ids = torch.randint(0, vocab, (batch, L), generator=torch.Generator().manual_seed(seed)).to(p.device)
    pos = 0 if phase == "prefill" else S - 1
    return step_inputs(model, ids, pos, empty_cache(model, batch, S))
