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


class HFStep(nn.Module):
    """A Hugging Face causal LM as a pure step function of (ids, pos, k_cache, v_cache)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, pos, k_cache, v_cache):
        from transformers.cache_utils import Cache

        layer = _functional_layer_class()
        cache = Cache(layers=[layer(k, v, pos) for k, v in zip(k_cache, v_cache)])
        B, L = input_ids.shape
        positions = torch.arange(L, device=input_ids.device) + pos  # [L]
        out = self.model(input_ids=input_ids, past_key_values=cache, cache_position=positions,
                         position_ids=positions[None].expand(B, L), use_cache=True)
        return out.logits, tuple(l.keys for l in cache.layers), tuple(l.values for l in cache.layers)


def as_step(model: nn.Module) -> nn.Module:
    return model if isinstance(model, RefDecoder) else HFStep(model)


def cache_dims(model: nn.Module) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of a model's cache."""
    if isinstance(model, RefDecoder):
        c = model.cfg
        return c.n_layers, c.n_kv_heads, c.d_head
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
    make = lambda: tuple(torch.zeros(batch, K, length, D, dtype=dtype or p.dtype, device=device or p.device)  # noqa: E731
                         for _ in range(layers))
    return make(), make()


def step_inputs(model: nn.Module, ids: torch.Tensor, pos: int, cache: tuple) -> tuple:
    """Positional arguments of one step."""
    return (ids, torch.tensor(pos, dtype=torch.long, device=ids.device), cache[0], cache[1])
