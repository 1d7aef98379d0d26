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


# ------------------------------------------------------------------------------------ dispatch and combine
# `moe_ffn` is the whole of a mixture after its router: the routed tokens sorted by expert, their experts,
# the routing weights and the combine back into token order, one op over the *tokens* (transformers'
# grouped_mm experts forward, op for op). Unlike `experts_ffn`, whose rows are the routed rows of every
# token, its output row t depends only on input row t and t's experts: it runs on any subset of the
# tokens. That is what all-to-all dispatch needs: each rank keeps its tokens, sends each routed row to
# the rank holding its expert and gets the results back (`route`, `dispatch_splits`, `run_received`,
# `combine` below, with the two all-to-alls between them in the rank program).

def route(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, num_experts: int):
    """Tokens' routed rows sorted by expert, as the model sorts them: (rows [T·k, E], counts [X] per expert,
    perm (row r of the sorted rows is routed row perm[r] = token perm[r] // k), routing weights [T·k] sorted)."""
    k = ids.size(-1)
    sorted_ids, perm = torch.sort(ids.reshape(-1))
    rows = x[perm // k]
    counts = torch.histc(sorted_ids.float(), bins=num_experts, min=0, max=num_experts - 1)
    return rows, counts.to(torch.int64), perm, weights.reshape(-1)[perm]


def combine(out: torch.Tensor, perm: torch.Tensor, weights_sorted: torch.Tensor, k: int) -> torch.Tensor:
    """The experts' rows (sorted by expert) scaled by their routing weights, back in token order, summed
    over each token's k experts."""
    weighted = out * weights_sorted.unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.size(0), device=perm.device)
    return weighted[inverse].view(-1, k, out.size(-1)).sum(dim=1)


@torch.library.custom_op("shardwise::moe_ffn", mutates_args=())
def moe_ffn(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor | None, w_down: torch.Tensor,
            ids: torch.Tensor, weights: torch.Tensor, activation: str, b_gate: torch.Tensor | None = None,
            b_up: torch.Tensor | None = None, b_down: torch.Tensor | None = None, down_bias_at: int = 0,
            first_expert: int = 0, num_experts: int = 0) -> torch.Tensor:
    """Σ_j weights[t, j] · FFN_{ids[t, j]}(x[t]) for each token t, over the experts held here: experts
    first_expert .. first_expert + w_gate.size(0) − 1 of num_experts (the others add 0)."""
    X = num_experts or w_gate.size(0)
    rows, counts, perm, w_sorted = route(x, ids, weights, X)
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    held = slice(first_expert, first_expert + w_gate.size(0))
    out = experts_ffn(rows, w_gate, w_up, w_down, starts[held], ends[held], activation, b_gate, b_up, b_down,
                      down_bias_at)
    return combine(out, perm, w_sorted, ids.size(-1))


@moe_ffn.register_fake
def _(x, w_gate, w_up, w_down, ids, weights, activation, b_gate=None, b_up=None, b_down=None, down_bias_at=0,
      first_expert=0, num_experts=0):
    return x.new_empty(x.size(0), w_down.size(2), dtype=torch.result_type(x, weights))


def dispatch_splits(counts_all: torch.Tensor, group: int, me: int):
    """From every rank's per-expert counts ([group·X], rank-major; the experts split in `group` equal runs,
    run j on rank j): (rows this rank sends to each rank, rows it receives from each, [group, X/group] the
    rows of each of its experts from each rank)."""
    grid = counts_all.view(group, group, -1)  # [source rank, destination rank, its experts]
    send = grid[me].sum(-1).tolist()
    mine = grid[:, me]
    return send, mine.sum(-1).tolist(), mine


def run_received(rows: torch.Tensor, mine: torch.Tensor, w_gate, w_up, w_down, activation: str, b_gate=None,
                 b_up=None, b_down=None, down_bias_at: int = 0) -> torch.Tensor:
    """This rank's experts over the rows it received (source-major, each source's rows sorted by expert):
    regrouped expert-major, one experts_ffn, and put back in the order they came."""
    by_source = mine.reshape(-1)  # [source, expert] → row counts, in arrival order
    expert_of = torch.arange(mine.size(1), device=rows.device).repeat(mine.size(0)).repeat_interleave(by_source)
    order = torch.sort(expert_of, stable=True).indices  # expert-major, each expert's rows in arrival order
    counts = mine.sum(0)
    ends = torch.cumsum(counts, 0)
    out = experts_ffn(rows[order], w_gate, w_up, w_down, ends - counts, ends, activation, b_gate, b_up,
                      b_down, down_bias_at)
    back = torch.empty_like(out)
    back[order] = out
    return back
