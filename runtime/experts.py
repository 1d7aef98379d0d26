"""`shardwise::experts_ffn`: a mixture of experts' gated feed-forward over the routed tokens, one op.

    experts_ffn(x [T, E], w_gate [X, E, F], w_up [X, E, F], w_down [X, F, E], starts [X], ends [X], act,
                b_gate [X, F]?, b_up [X, F]?, b_down [X, E]?, down_bias_at)
      = for each expert i: rows starts[i]:ends[i] of x → act(x·w_gate[i] + b_gate[i], x·w_up[i] + b_up[i])
        → ·w_down[i] + b_down[i]; every other row 0

canonicalize fuses three forms into it:
  - transformers' grouped matmuls (gate, up, down over tokens sorted by expert, expert i's rows ending at
    offs[i]), with starts = offs − counts: Mixtral, Qwen3-MoE, OLMoE, DeepSeek-V3;
  - gpt-oss's: gate and up in one weight, interleaved along its last dim ([X, E, 2F], gate at the even
    columns, up at the odd: `w_up` is None and `w_gate` holds both, likewise the biases), biases on both
    projections, and its clamped gate `(clamp(u, −l, l) + 1) · g·σ(α·g)`, g = clamp(gate, max=l);
  - Llama 4's: every expert over every token ([X, T, E] by `bmm`, the tokens not routed to an expert
    scaled by 0), where expert i's rows are the i-th block of T: starts = i·T, ends = (i + 1)·T.
Unsplit it computes what they compute, matmul for matmul (the same `torch.mm` on the same row slices,
the biases added after each matmul, the same pointwise ops in the same order).

Its point is that it also runs on a slice of the experts: a rank holding experts a..b (their weights,
starts and ends) computes only their rows and leaves the others 0, so the ranks' outputs are a partial
sum over the experts' atoms (expert parallel); with each expert's F split, a partial sum over F's
atoms too (expert-sliced). An interleaved gate_up split in contiguous pieces of its 2F columns gives
each rank whole (gate, up) pairs, so it splits like F. The gate and up biases split with F. The down
bias must be added once per sum: a rank adds its columns of it (`b_down`'s local [X, E/n], at
`down_bias_at` in the output's columns; E is split over the F atoms, so each column's bias is added
by exactly one of them), or none (`down_bias_at` = −1, set by emit for a rank that repeats a column
range another rank of the sum already adds). Unsplit, down_bias_at is 0: the whole bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_ACTS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}
GPT_OSS = "gpt_oss"  # activation name: gpt-oss's clamped GLU, spelled "gpt_oss:<alpha>:<limit>"


def gpt_oss_activation(alpha: float, limit: float) -> str:
    """The activation argument of experts_ffn for gpt-oss's gate with these constants (repr: exact floats)."""
    return f"{GPT_OSS}:{alpha!r}:{limit!r}"


def _gated(activation: str):
    """(gate, up) → the gated hidden state, in the order of ops of the model it was read from."""
    name, _, params = activation.partition(":")
    if name == GPT_OSS:
        alpha, limit = (float(p) for p in params.split(":"))

        def combine(gate, up):
            gate = gate.clamp(min=None, max=limit)
            up = up.clamp(min=-limit, max=limit)
            return (up + 1) * (gate * torch.sigmoid(gate * alpha))
        return combine
    act = _ACTS[name]
    return lambda gate, up: act(gate) * up


@torch.library.custom_op("shardwise::experts_ffn", mutates_args=())
def experts_ffn(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor | None, w_down: torch.Tensor,
                starts: torch.Tensor, ends: torch.Tensor, activation: str, b_gate: torch.Tensor | None = None,
                b_up: torch.Tensor | None = None, b_down: torch.Tensor | None = None,
                down_bias_at: int = 0) -> torch.Tensor:
    combine = _gated(activation)
    out = torch.zeros(x.size(0), w_down.size(2), device=x.device, dtype=x.dtype)
    cols = slice(down_bias_at, down_bias_at + (b_down.size(1) if b_down is not None else 0))
    for i, (s, e) in enumerate(zip(starts.tolist(), ends.tolist())):
        s, e = int(s), int(e)
        if e <= s:
            continue
        rows = x[s:e]
        gate = torch.mm(rows, w_gate[i])
        if b_gate is not None:
            gate = gate + b_gate[i]
        if w_up is None:  # gate and up interleaved in one weight (gpt-oss)
            gate, up = gate[:, ::2], gate[:, 1::2]
        else:
            up = torch.mm(rows, w_up[i])
            if b_up is not None:
                up = up + b_up[i]
        torch.mm(combine(gate, up), w_down[i], out=out[s:e])
        if b_down is not None and down_bias_at >= 0:
            out[s:e, cols] += b_down[i]
    return out


@experts_ffn.register_fake
def _(x, w_gate, w_up, w_down, starts, ends, activation, b_gate=None, b_up=None, b_down=None, down_bias_at=0):
    return x.new_empty(x.size(0), w_down.size(2))


ACTIVATIONS = tuple(_ACTS) + (GPT_OSS,)
