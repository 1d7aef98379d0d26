"""`shardwise::experts_ffn`: a mixture of experts' gated feed-forward over the routed tokens, one op.

    experts_ffn(x [T, E], w_gate [X, E, F], w_up [X, E, F], w_down [X, F, E], starts [X], ends [X], act)
      = for each expert i: rows starts[i]:ends[i] of x → act(x·w_gate[i]) ⊙ (x·w_up[i]) → ·w_down[i];
        every other row 0

canonicalize fuses transformers' three grouped matmuls (gate, up, down, over tokens sorted by expert,
expert i's rows ending at offs[i]) into it, with starts = offs − counts. Unsplit it computes what they
compute, matmul for matmul (the same `torch.mm` on the same row slices). Its point is that it also
runs on a slice of the experts: a rank holding experts a..b (their weights, starts and ends) computes
only their rows and leaves the others 0, so the ranks' outputs are a partial sum over the experts'
atoms (expert parallel); with each expert's F split, a partial sum over F's atoms too (expert-sliced).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_ACTS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


@torch.library.custom_op("shardwise::experts_ffn", mutates_args=())
def experts_ffn(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                starts: torch.Tensor, ends: torch.Tensor, activation: str) -> torch.Tensor:
    act = _ACTS[activation]
    out = torch.zeros(x.size(0), w_down.size(2), device=x.device, dtype=x.dtype)
    for i, (s, e) in enumerate(zip(starts.tolist(), ends.tolist())):
        s, e = int(s), int(e)
        if e <= s:
            continue
        rows = x[s:e]
        h = act(torch.mm(rows, w_gate[i])) * torch.mm(rows, w_up[i])
        torch.mm(h, w_down[i], out=out[s:e])
    return out


@experts_ffn.register_fake
def _(x, w_gate, w_up, w_down, starts, ends, activation):
    return x.new_empty(x.size(0), w_down.size(2))


ACTIVATIONS = tuple(_ACTS)
