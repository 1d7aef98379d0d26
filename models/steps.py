"""One step of generation with the KV cache as explicit inputs and outputs, for every model family.

    step = as_step(model)                         # RefDecoder: itself; HF models: HFStep(model)
    k, v = empty_cache(model, batch, length)      # per layer a [B, K, S, D] zero tensor (cache_shapes)
    logits, k, v = step(ids, pos, k, v)           # ids [B, L] written at positions pos .. pos+L-1
    logits, k, v = step(ids, pos, k, v, mask)     # left-padded prompts: mask [B, S] over the whole cache

The same step serves prefill (L = prompt length, pos = 0) and decode (L = 1, pos = tokens so far), so
torch.export captures each phase as a pure function whose cache layout the planner can choose.

HF models keep their cache in `Cache` objects that update tensors in place; `Step` hands them a
functional static layer instead (`index_copy`, not `index_copy_`), so the new cache is an output. The
cache's shapes (KV heads, head dims, per layer) are read from the model's own cache after one token
(`cache_shapes`), never guessed from configuration names; a model whose cache holds anything but keys
and values (a recurrent state, an indexer) is refused there.

Padding: a batch of prompts of different lengths is left-padded, and `mask` (1 = token, 0 = padding)
covers every cache position (the prompt's mask, then ones for the tokens to come). As in Hugging Face
generation, the tokens' positions are `cumsum(mask) - 1` (0 at padding), computed inside the step (so
they are part of the captured graph, row by row), and the mask hides the padded cache positions from
every later query. The step without a mask is unchanged (all-ones mask, positions pos + arange(L)).
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
import torch.nn as nn

from ..errors import ShardwiseError
from .presets import check_shape, vocab_size
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

        def get_seq_length(self) -> int:
            """The tokens cached before this step: a number in [0, cache length) (under export, a symbol
            with that range, so a model may compare it with sizes)."""
            n = self.cumulative_length.item()
            torch._check(n >= 0)
            torch._check(n < self.max_cache_len)
            return n

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            positions = torch.arange(key_states.shape[-2], device=key_states.device) + self.cumulative_length
            self.keys = self.keys.index_copy(2, positions, key_states)
            self.values = self.values.index_copy(2, positions, value_states)
            return self.keys, self.values

    return FunctionalStaticLayer


class Step(nn.Module):
    """Any supported causal LM as a pure step function of (ids, pos, k_cache, v_cache[, attention_mask]).

    `last_only`: return logits for the last position only ([B, 1, V]), as serving does. HF models get
    the cache positions, an all-ones mask of the cache's length (the causal mask hides what is not
    written yet) and, unless they number positions themselves, the positions of their tokens.
    With `attention_mask` ([B, S] long, left padding: 0 at padded cache positions, then 1s) the model gets
    that mask instead, and the positions Hugging Face generation gives (`padded_positions`) whenever its
    forward takes `position_ids` (as `generate` passes them); a model that does not derives them itself.
    """

    shardwise_root = "model"  # capture names layers and weights as the model does, without "model."

    def __init__(self, model: nn.Module, *, last_only: bool = False):
        super().__init__()
        self.model = model
        self.last_only = last_only

    def forward(self, input_ids, pos, k_cache, v_cache, attention_mask=None):
        if isinstance(self.model, RefDecoder):
            if attention_mask is not None:
                check_takes_mask(self.model)
            return self.model(input_ids, pos, k_cache, v_cache, last_only=self.last_only)
        from transformers.cache_utils import Cache

        layer = _functional_layer_class()
        cache = Cache(layers=[layer(k, v, pos) for k, v in zip(k_cache, v_cache)])
        B, L = input_ids.shape
        S = k_cache[0].shape[2]
        positions = torch.arange(L, device=input_ids.device) + pos  # [L]
        if attention_mask is None:
            # every cache position may be attended (the causal mask hides those not written yet): a mask of the
            # static cache length, so no model sizes its mask from the position (a data-dependent shape)
            mask = torch.ones(B, S, dtype=torch.long, device=input_ids.device)
            extra = {} if _counts_own_positions(self.model) else {"position_ids": positions[None].expand(B, L)}
        else:
            mask = attention_mask  # [B, S]: padding hidden from every query, the causal mask hides the future
            extra = {"position_ids": padded_positions(mask, positions)} if _takes_positions(self.model) else {}
        out = self.model(input_ids=input_ids, **{_cache_kwarg(self.model): cache}, cache_position=positions,
                         attention_mask=mask, use_cache=True, logits_to_keep=1 if self.last_only else 0, **extra)
        return out.logits, tuple(l.keys for l in cache.layers), tuple(l.values for l in cache.layers)


def _cache_kwarg(model: nn.Module) -> str:
    """transformers 5 names the cache argument `cache`; earlier versions `past_key_values`."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _counts_own_positions(model: nn.Module) -> bool:
    """Whether the model numbers positions itself from the token ids: a position table with a padding row
    (RoBERTa's family starts at padding_idx + 1 and skips padding tokens). Every other model is given
    the positions of its tokens in the cache (some would otherwise derive them from the mask's length)."""
    if model not in _OWN_POSITIONS:
        _OWN_POSITIONS[model] = any(isinstance(m, nn.Embedding) and m.padding_idx is not None and "position" in name
                                    for name, m in model.named_modules())
    return _OWN_POSITIONS[model]


_OWN_POSITIONS: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def check_takes_mask(model: nn.Module) -> None:
    """Refuse a padding mask for a model whose step takes none: the reference decoder numbers positions once
    for the whole batch (its rotary tables are [L, D], not per row)."""
    if isinstance(model, RefDecoder):
        raise ShardwiseError("attention_mask: the reference decoder (RefDecoder) numbers positions once for the "
                             "whole batch and takes no padding mask; generate padded prompts with a Hugging Face "
                             "model, or give prompts of one length without attention_mask")


def padded_positions(mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B, L] positions of the tokens at cache indices `positions` ([L]) of left-padded rows, as Hugging Face
    generation numbers them: `cumsum(mask) - 1` (the count of real tokens before), 0 at padding."""
    counted = (mask.cumsum(-1) - 1).index_select(1, positions)
    return counted.masked_fill(mask.index_select(1, positions) == 0, 0)


def _takes_positions(model: nn.Module) -> bool:
    """Whether Hugging Face generation hands the model `position_ids` (its forward accepts them); a model
    that does not (BLOOM's ALiBi) derives positions from the mask itself."""
    import inspect

    return "position_ids" in inspect.signature(model.forward).parameters


def as_step(model: nn.Module, *, last_only: bool = False) -> nn.Module:
    return Step(model, last_only=last_only)


CacheShape = tuple[tuple[int, int], tuple[int, int]]  # per layer: (K, D) of its keys, (K, D) of its values


def cache_shapes(model: nn.Module) -> list[CacheShape]:
    """Per layer, the (KV heads, head dim) of its keys and of its values: what the model computes.

    Read from the model's own cache after one token (HF models): Falcon's multiquery keeps 1 KV head
    whatever its config calls the count, MLA keeps keys and values of different head dims, and a
    sliding-window layer keeps what a full one does. A model whose cache holds a recurrent state
    instead of keys and values (state-space and linear-attention mixers) is refused: its step is not
    attention over a KV cache. The result is remembered per model and number of layers.
    """
    if isinstance(model, RefDecoder):
        c = model.cfg
        return [((c.n_kv_heads, c.d_head), (c.n_kv_heads, c.d_head)) for _ in model.blocks]
    key = tuple(id(m) for m in model.modules())  # a prototype (one block) differs from the whole model
    known = _SHAPES.get(model)
    if known is None or known[0] != key:
        _SHAPES[model] = known = (key, _probe_cache(model))
    return known[1]


_SHAPES: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, list[CacheShape]]] = weakref.WeakKeyDictionary()


_KV_LAYERS = {"DynamicLayer", "DynamicSlidingWindowLayer", "StaticLayer", "StaticSlidingWindowLayer"}


@contextmanager
def _meta_experts(model: nn.Module, device: torch.device):
    """On the meta device, a mixture's experts run as transformers' `batched_mm` for the probe: its
    `grouped_mm` takes torch._grouped_mm off the CPU, whose meta kernel accepts bf16 only (a float32
    checkpoint built on meta could not be probed). The cache's shapes do not depend on how experts run."""
    impl = getattr(getattr(model, "config", None), "_experts_implementation", None)
    if device.type != "meta" or impl != "grouped_mm" or not hasattr(model, "set_experts_implementation"):
        yield
        return
    model.set_experts_implementation("batched_mm")
    try:
        yield
    finally:
        model.set_experts_implementation(impl)


def _probe_cache(model: nn.Module) -> list[CacheShape]:
    """Run one token through `model` with its own cache and read each layer's key and value shapes."""
    p = next(model.parameters())
    ids = torch.zeros(1, 1, dtype=torch.long, device=p.device)
    name = type(model).__name__
    try:
        with torch.no_grad(), _meta_experts(model, p.device):
            out = model(input_ids=ids, use_cache=True)
    except Exception as e:  # the model's own code failed on one token: say so, with its error
        raise ShardwiseError(f"{name} does not run with its own cache: one token through model(input_ids, "
                             f"use_cache=True) failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}), so the "
                             f"shape of its KV cache is unknown; check that the model generates with its cache") from e
    cache = out.get("cache") if "cache" in out else out.get("past_key_values")  # `cache` since transformers 5
    cache = getattr(cache, "self_attention_cache", cache)  # a decoder's cache beside its (empty) cross-attention one
    if cache is not None and type(cache).__name__ not in ("DynamicCache", "StaticCache"):
        raise ShardwiseError(f"{name} is not a decoder-only attention transformer: it keeps a {type(cache).__name__} as "
                             f"its cache, a cache class of its own that holds more than key/value layers (the state of "
                             f"recurrent or linear-attention blocks); shardwise shards decoder-only transformers whose "
                             f"every block attends over a KV cache")
    layers = getattr(cache, "layers", None)
    if not layers:
        raise ShardwiseError(f"{name} keeps no KV cache (its forward returns {type(cache).__name__} as its cache, not "
                             f"per-layer keys and values), so it cannot decode one token at a time with the cache split "
                             f"over ranks; shardwise decodes transformers whose cache is a transformers Cache of "
                             f"key/value layers (a prefill-only plan, shardwise.plan(model, args), still works)")
    shapes = []
    for i, layer in enumerate(layers):
        if type(layer).__name__ not in _KV_LAYERS:
            raise ShardwiseError(
                f"{name} is not a decoder-only attention transformer: layer {i} keeps a {type(layer).__name__} in its "
                f"cache, not a plain key/value layer ({', '.join(sorted(_KV_LAYERS))}), so its mixer keeps other "
                f"state (a recurrent or convolutional state, compressed or indexed keys), which shardwise does not "
                f"split; it shards transformers whose every block attends over a KV cache [B, K, S, D]")
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor) or k.ndim != 4 or v.ndim != 4:
            raise ShardwiseError(
                f"{name} is not a decoder-only attention transformer: layer {i} keeps a {type(layer).__name__} in its "
                f"cache (a recurrent state: a state-space, convolutional or linear-attention mixer), not keys and "
                f"values [B, K, S, D]; shardwise shards transformers whose every block attends over a KV cache, "
                f"and not hybrids of attention and recurrent blocks")
        if k.shape[2] != 1:
            raise ShardwiseError(
                f"{name} attends over positions of its own: layer {i} cached {k.shape[2]} positions for the 1 token "
                f"it was given (prompt or memory tokens besides the ones it is fed), which a KV cache of the tokens "
                f"generated does not hold; shardwise does not shard such a model")
        extra = [a for a, t in vars(layer).items() if isinstance(t, torch.Tensor) and t.ndim >= 2
                 and t is not k and t is not v]
        if extra:
            raise ShardwiseError(
                f"{name} attends over more than a KV cache: layer {i} keeps {', '.join(extra)} in its cache "
                f"({type(layer).__name__}) besides keys and values (a sparse-attention indexer, compressed keys), "
                f"which shardwise does not split; it shards attention over keys and values [B, K, S, D]")
        shapes.append(((k.shape[1], k.shape[3]), (v.shape[1], v.shape[3])))
    return shapes


def cache_dims(model: nn.Module) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of a model's cache: its first layer's keys, counted for every layer."""
    shapes = cache_shapes(model)
    (K, D), _ = shapes[0]
    return len(shapes), K, D


def empty_cache(model: nn.Module, batch: int, length: int, *, dtype=None, device=None):
    """(k_cache, v_cache): per layer a zero [batch, K, length, D] tensor, K and D as that layer computes them."""
    shapes = cache_shapes(model)
    p = next(model.parameters())

    def zeros(which: int) -> tuple[torch.Tensor, ...]:
        return tuple(torch.zeros(batch, s[which][0], length, s[which][1], dtype=dtype or p.dtype,
                                 device=device or p.device) for s in shapes)

    return zeros(0), zeros(1)


def step_inputs(model: nn.Module, ids: torch.Tensor, pos: int, cache: tuple,
                mask: torch.Tensor | None = None) -> tuple:
    """Positional arguments of one step (`mask` [B, S], the padding mask over the cache, last when given)."""
    args = (ids, torch.tensor(pos, dtype=torch.long, device=ids.device), cache[0], cache[1])
    return args if mask is None else (*args, mask)


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
    vocab = vocab_size(model)
    if p.device.type == "meta":
        ids = torch.zeros(batch, L, dtype=torch.long, device=p.device)
    else:
        ids = torch.randint(0, vocab, (batch, L), generator=torch.Generator().manual_seed(seed)).to(p.device)
    pos = 0 if phase == "prefill" else S - 1
    return step_inputs(model, ids, pos, empty_cache(model, batch, S))
