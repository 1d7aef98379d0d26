"""A small reference decoder: serial or parallel blocks, MHA/MQA/GQA, GELU or SwiGLU, RoPE.

Shapes (paper notation): B batch, L tokens in this step, E d_model, F d_ff, H query heads,
K key/value heads, D head dim, V vocab, S cache length.

Two ways to call it:
  model(ids)                          prefill without a cache → logits [B, L, V]
  model(ids, pos, k_cache, v_cache)   one step with a static cache of S positions: one [B, K, S, D]
                                      tensor per layer in each tuple; `pos` a 0-dim int64 tensor; the L
                                      new tokens are written at positions pos .. pos+L-1 and attend to
                                      every earlier position → (logits [B, L, V], new k_cache, new v_cache)
The cache is explicit input and output, so torch.export captures the step as a pure function and the
planner can choose how to split it (by KV heads or by batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class RefConfig:
    vocab: int = 256
    d_model: int = 64
    d_ff: int = 256
    n_layers: int = 2
    n_heads: int = 8
    n_kv_heads: int = 8
    head_dim: int | None = None
    parallel: bool = False  # PaLM / GPT-J block: attention and FFN read the same normed input
    activation: str = "gelu"  # "gelu" or "swiglu"
    norm: str = "layernorm"  # "layernorm" or "rmsnorm"
    max_seq: int = 128
    tie_embeddings: bool = False
    rope_base: float = 10000.0

    @property
    def d_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _norm(cfg: RefConfig) -> nn.Module:
    return RMSNorm(cfg.d_model) if cfg.norm == "rmsnorm" else nn.LayerNorm(cfg.d_model)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: RefConfig):
        super().__init__()
        self.cfg = cfg
        H, K, D, E = cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_model
        self.q_proj = nn.Linear(E, H * D, bias=False)
        self.k_proj = nn.Linear(E, K * D, bias=False)
        self.v_proj = nn.Linear(E, K * D, bias=False)
        self.o_proj = nn.Linear(H * D, E, bias=False)

    def forward(self, x, cos, sin, mask, cache: tuple[torch.Tensor, torch.Tensor] | None, pos):
        D = self.cfg.d_head
        B, L, _ = x.shape
        # head counts come from the tensors (-1), so the module also runs under tensor parallelism
        # (DTensor's Colwise/Rowwise hand each rank its local heads)
        q = self.q_proj(x).view(B, L, -1, D).transpose(1, 2)  # q: [B, H, L, D]
        k = self.k_proj(x).view(B, L, -1, D).transpose(1, 2)  # k: [B, K, L, D]
        v = self.v_proj(x).view(B, L, -1, D).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        new_cache = None
        if cache is not None:
            positions = torch.arange(L, device=x.device) + pos  # where the new tokens go
            k = cache[0].index_copy(2, positions, k)  # k: [B, K, S, D]
            v = cache[1].index_copy(2, positions, v)
            new_cache = (k, v)
        H, K = q.shape[1], k.shape[1]
        if K != H:  # repeat_kv: [B, K, S, D] → [B, H, S, D]
            S = k.shape[2]
            k = k[:, :, None].expand(B, K, H // K, S, D).reshape(B, H, S, D)
            v = v[:, :, None].expand(B, K, H // K, S, D).reshape(B, H, S, D)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(B, L, -1)  # [B, L, H·D]
        return self.o_proj(out), new_cache


class FeedForward(nn.Module):
    def __init__(self, cfg: RefConfig):
        super().__init__()
        self.gated = cfg.activation == "swiglu"
        if self.gated:
            self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: RefConfig):
        super().__init__()
        self.parallel = cfg.parallel
        self.norm1 = _norm(cfg)
        self.attn = Attention(cfg)
        if not cfg.parallel:
            self.norm2 = _norm(cfg)
        self.mlp = FeedForward(cfg)

    def forward(self, x, cos, sin, mask, cache, pos):
        h = self.norm1(x)
        a, new_cache = self.attn(h, cos, sin, mask, cache, pos)
        if self.parallel:  # x + (attn(h) + ffn(h)): one sum of partials, then one reduce-scatter
            return x + (a + self.mlp(h)), new_cache
        x = x + a
        return x + self.mlp(self.norm2(x)), new_cache


class RefDecoder(nn.Module):
    def __init__(self, cfg: RefConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = _norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        D = cfg.d_head
        if torch.get_default_device().type == "meta":  # no values: skip torch's Python meta path for arange
            inv_freq = torch.empty((D + 1) // 2, dtype=torch.float32, device="meta")
        else:
            inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # [L, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [L, D], computed in float32
        dtype = self.embed.weight.dtype
        return emb.cos()[None, None].to(dtype), emb.sin()[None, None].to(dtype)  # [1, 1, L, D]

    def forward(self, input_ids, pos=None, k_cache=None, v_cache=None, last_only: bool = False):
        B, L = input_ids.shape
        x = self.embed(input_ids)  # [B, L, E]
        if k_cache is None:
            cos, sin = self._rope(torch.arange(L, device=input_ids.device))
            mask, pos_t = None, None
        else:
            S = k_cache[0].shape[2]
            positions = torch.arange(L, device=input_ids.device) + pos
            cos, sin = self._rope(positions)
            # query i (at position pos + i) sees keys at positions ≤ pos + i
            mask = torch.arange(S, device=input_ids.device)[None, :] <= positions[:, None]  # [L, S]
            pos_t = pos
        new_k, new_v = [], []
        for i, block in enumerate(self.blocks):
            cache = None if k_cache is None else (k_cache[i], v_cache[i])
            x, c = block(x, cos, sin, mask, cache, pos_t)
            if c is not None:
                new_k.append(c[0])
                new_v.append(c[1])
        if last_only:  # serving needs only the next token's logits
            x = x[:, -1:]
        logits = self.lm_head(self.norm(x))  # [B, L, V] (L = 1 when last_only)
        if k_cache is None:
            return logits
        return logits, tuple(new_k), tuple(new_v)


class FFNStack(nn.Module):
    """Residual feed-forward blocks only (no norm, no attention): the paper's FFN communication analysis.

    x [B, L, E] → for each block: x + W_out · gelu(W_in · x)
    """

    def __init__(self, d_model: int, d_ff: int, n_layers: int = 1):
        super().__init__()
        self.blocks = nn.ModuleList(_FFNBlock(d_model, d_ff) for _ in range(n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class _FFNBlock(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.mlp = FeedForward(RefConfig(d_model=d_model, d_ff=d_ff, activation="gelu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)
