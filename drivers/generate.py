"""Greedy generation with sharded prefill and decode programs and a sharded KV cache.

    tokens = shardwise.generate(model, ids, 16, mesh="2x2x1", simulate=True)    # [B, P + 16]
    tokens = shardwise.generate(model, ids, 16, attention_mask=mask, mesh="2x2x1", simulate=True)

Two plans from the same model: prefill (the P prompt tokens, written into a cache of P + new
positions) and decode (one token at a time). Each is captured as a pure step (models/steps.py) and
planned for its phase; its KV cache stays split on every rank between steps (by KV heads or by batch,
as planned). When the two plans split the cache differently, a bridge program redistributes it once,
between the phases, with explicit collectives (reported). Ranks run simulated in this process, or as
this rank of the current torch.distributed world.

Prompts of different lengths are left-padded to one length P and given with `attention_mask` [B, P]
(1 = token, 0 = padding), as for Hugging Face's `model.generate`. The mask, extended by ones over the
new tokens, is one more input of both steps ([B, P + new], after the caches): each step numbers its
tokens `cumsum(mask) - 1` and hides the padded cache positions, so every row gets the tokens it would
get alone. The mask is an input like the ids (replicated on every rank unless the plan splits it); the
steps without a mask, and their plans, are unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import ShardwiseError
from ..ir.layout import Layout
from ..ir.mesh import Mesh
from ..ir.meta import IN_LAYOUTS, LAYOUT, SIGNATURE, STATE
from ..ir.plan import CollectiveRecord, Plan
from ..models.steps import Step, check_takes_mask, empty_cache, step_inputs
from ..passes.graph_utils import Signature
from ..passes.insert_collectives import collectives, insert_collectives
from ..passes.pipeline import run
from ..planning.planner import plan
from ..planning.program import emit_rank
from ..runtime.distributed import mesh_groups
from ..runtime.lower import shard_tensor
from ..runtime.simulate import Trace, run_lockstep, run_recorded, sim_group_name


@dataclass
class Generation:
    tokens: torch.Tensor  # [B, P + new]: the prompt and the generated tokens
    prefill: Plan
    decode: Plan
    bridge: list[CollectiveRecord] = field(default_factory=list)  # cache redistribution between the phases
    traces: dict[str, Trace] = field(default_factory=dict)  # simulated runs: what each phase executed
    logits: list[torch.Tensor] = field(default_factory=list)  # per new token, the [B, V] logits it was chosen from
    # seconds each step of each phase took in this process ("prefill": one; "decode": one per token after the
    # first), from its inputs to its outputs: on real ranks this rank's (a step ends at its last collective)
    step_s: dict[str, list[float]] = field(default_factory=dict)


def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, mesh: Mesh | str,
             layouts: str | dict | None = None, prefill_layouts: str | dict | None = None,
             decode_layouts: str | dict | None = None, simulate: bool = False, hardware: str = "tpu-v4",
             weight_dtype: str | None = None, details: bool = False, weights=None,
             record: bool = False, attention_mask: torch.Tensor | None = None) -> torch.Tensor | Generation:
    """Greedy tokens of `model` after `input_ids`, every step run sharded over `mesh`.

    Layouts not forced (`layouts` for both phases, or per phase) are chosen by the planner for each
    phase. `simulate=True` runs every rank in this process; otherwise this process is one rank of the
    current torch.distributed world (launch with torchrun). `details=True` returns a Generation with
    the two plans, the cache bridge and each new token's logits.

    A model on the meta device is planned there and run with its shards read from `weights` (a
    WeightSource such as SafetensorsSource), on the device of `input_ids`. `record=True` records
    every collective each phase executes (Generation.traces).

    `attention_mask` [B, P] (1 = token, 0 = padding): prompts of different lengths, left-padded; the
    tokens are those Hugging Face's `model.generate(input_ids, attention_mask=...)` gives greedily."""
    mesh = Mesh.parse(mesh)
    _check_call(model, input_ids, max_new_tokens, weights)
    mask = cache_mask(model, input_ids, attention_mask, max_new_tokens)
    B, P = input_ids.shape
    S = P + max_new_tokens
    step = Step(model, last_only=True).eval()
    where = next(model.parameters()).device
    cache = empty_cache(model, B, S, device=input_ids.device)
    pre_args = step_inputs(model, input_ids, 0, cache, mask)
    dec_args = step_inputs(model, input_ids[:, -1:], P, cache, mask)

    def to_model(args: tuple) -> tuple:  # capture where the model lives, run on real tensors
        return tuple(tuple(t.to(where) for t in a) if isinstance(a, tuple) else a.to(where) for a in args)
    common = dict(mesh=mesh, hardware=hardware, weight_dtype=weight_dtype)
    prefill = plan(step, to_model(pre_args), {}, layouts=prefill_layouts or layouts, phase="prefill", **common)
    decode = plan(step, to_model(dec_args), {}, layouts=decode_layouts or layouts, phase="decode", **common)
    bridge = CacheBridge(prefill.program, decode.program, mesh)
    run_on = input_ids.device if where.type == "meta" else None
    runner = (SimulatedRanks(mesh, weights=weights, device=run_on) if simulate
              else ThisRank(mesh, weights=weights, device=run_on, record=record))

    flat_pre = prefill.program.flat_inputs(pre_args, {})
    step_s: dict[str, list[float]] = {"prefill": [], "decode": []}
    t0 = time.perf_counter()
    outs = runner.run("prefill", prefill.program, flat_pre, prefill.program.input_layouts())
    step_s["prefill"].append(time.perf_counter() - t0)
    token = _next_token(outs)
    logits = [outs[0][0][:, -1]] if details else []
    caches = bridge(runner, [o[1:] for o in outs])
    masks = _per_rank(runner, mask, decode.program, len(dec_args[2]) + len(dec_args[3]) + 2)
    generated = [token]
    for i in range(1, max_new_tokens):
        pos = torch.tensor(P + i - 1, dtype=torch.long, device=input_ids.device)
        flat = [[token, pos, *c, *m] for c, m in zip(caches, masks)]
        t0 = time.perf_counter()
        outs = runner.run("decode", decode.program, flat, None)
        step_s["decode"].append(time.perf_counter() - t0)
        token = _next_token(outs)
        if details:
            logits.append(outs[0][0][:, -1])
        caches = [o[1:] for o in outs]
        generated.append(token)
    tokens = torch.cat([input_ids, *generated], dim=1)
    if not details:
        return tokens
    return Generation(tokens, prefill, decode, bridge.records, runner.traces, logits, step_s)


def _check_call(model, input_ids, max_new_tokens: int, weights) -> None:
    """What generation needs: a model with weights (or a source of them), [batch, prompt] integer ids, and a
    whole number of new tokens."""
    if not isinstance(model, nn.Module):
        raise ShardwiseError(f"generate(model, ...): expected a torch.nn.Module, got {type(model).__name__}")
    if weights is None and any(p.device.type == "meta" for p in model.parameters()):
        raise ShardwiseError("the model is on the meta device (shapes only, no weights): give its weights, "
                             "e.g. weights=SafetensorsSource('model.safetensors'), or build it with weights")
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.is_floating_point() \
            or input_ids.numel() == 0:
        found = (f"{input_ids.dtype} {list(input_ids.shape)}" if isinstance(input_ids, torch.Tensor)
                 else type(input_ids).__name__)
        raise ShardwiseError(f"input_ids: expected a non-empty [batch, prompt] tensor of token ids, got {found}")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ShardwiseError(f"max_new_tokens={max_new_tokens!r}: expected a whole number ≥ 1")


def cache_mask(model: nn.Module, input_ids: torch.Tensor, attention_mask, max_new_tokens: int) -> torch.Tensor | None:
    """The padding mask over the whole cache ([B, P + new] long: the prompt's mask, then ones), or None when
    no mask is given. Refused unless it is a [B, P] mask of 0s and 1s, left-padded, every row with a token."""
    if attention_mask is None:
        return None
    check_takes_mask(model)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        found = (f"{attention_mask.dtype} {list(attention_mask.shape)}" if isinstance(attention_mask, torch.Tensor)
                 else type(attention_mask).__name__)
        raise ShardwiseError(f"attention_mask: expected a tensor of input_ids' shape {list(input_ids.shape)} "
                             f"(1 = token, 0 = padding), got {found}")
    if attention_mask.is_complex() or not ((attention_mask == 0) | (attention_mask == 1)).all():
        bad = attention_mask[(attention_mask != 0) & (attention_mask != 1)] if not attention_mask.is_complex() else None
        raise ShardwiseError(f"attention_mask: expected only 0 (padding) and 1 (token), found "
                             f"{bad.unique()[:5].tolist() if bad is not None else attention_mask.dtype}")
    m = attention_mask.to(torch.long)
    empty = (m.sum(-1) == 0).nonzero().flatten()
    if len(empty):
        raise ShardwiseError(f"attention_mask: row {empty[0].item()} masks every position (all padding): every "
                             f"prompt needs at least one token to generate from")
    right = (m[:, 1:] < m[:, :-1]).any(-1).nonzero().flatten()
    if len(right):
        raise ShardwiseError(f"attention_mask: row {right[0].item()} has padding after a token "
                             f"({m[right[0]].tolist()}): generation appends new tokens at the end of every row, so "
                             f"pad the prompts on the left (tokenizer.padding_side = 'left'), as Hugging Face "
                             f"recommends for decoder-only models")
    ones = torch.ones(m.shape[0], max_new_tokens, dtype=torch.long, device=m.device)
    return torch.cat([m, ones], dim=1).to(input_ids.device)


def _per_rank(runner: _Ranks, mask: torch.Tensor | None, program, index: int) -> list[list[torch.Tensor]]:
    """The decode inputs after the caches (the mask), per rank held, split as the decode plan says (input `index`)."""
    if mask is None:
        return [[] for _ in runner.ranks]
    layout = program.input_layouts().get(index)
    return [[mask if layout is None else shard_tensor(mask, layout, runner.mesh, r)] for r in runner.ranks]


def _next_token(outs: list[list[Any]]) -> torch.Tensor:
    """Greedy next token from rank 0's logits (replicated: every rank has the same) → [B, 1]."""
    return outs[0][0][:, -1].argmax(-1, keepdim=True)


# ------------------------------------------------------------------------------------ runners
class _Ranks:
    """The ranks this process runs: each phase's programs emitted once, inputs split per rank."""

    def __init__(self, mesh: Mesh, ranks: list[int], group_name, *, weights=None, device=None):
        self.mesh, self.ranks, self.group_name = mesh, ranks, group_name
        self.weights, self.device = weights, device
        self.programs: dict[str, list[fx.GraphModule]] = {}
        self.traces: dict[str, Trace] = {}

    def run(self, phase: str, program, inputs: list, layouts: dict[int, Layout] | None) -> list[list[Any]]:
        """Run `phase` on every rank held here. `inputs`: one flat input list shared by all ranks, split
        per rank by `layouts`; or (layouts None) a list of per-rank input lists."""
        if phase not in self.programs:
            gm = program.gm if hasattr(program, "gm") else program
            quantize = getattr(program, "quantize", None)  # the plan's weight dtype ("int8": held as int8)
            self.programs[phase] = [emit_rank(gm, self.mesh, r, group_name=self.group_name, weights=self.weights,
                                              device=self.device, quantize=quantize) for r in self.ranks]
        if layouts is not None:
            inputs = [[shard_tensor(x, layouts[i], self.mesh, r) if i in layouts else x for i, x in enumerate(inputs)]
                      for r in self.ranks]
        with torch.no_grad():
            return self._execute(self.programs[phase], inputs, self.traces.setdefault(phase, Trace()))

    def _execute(self, programs, inputs, trace: Trace) -> list[list[Any]]:
        raise NotImplementedError


class SimulatedRanks(_Ranks):
    """Every rank's program in this process, run in lockstep."""

    def __init__(self, mesh: Mesh, *, weights=None, device=None):
        super().__init__(mesh, list(range(mesh.size)), sim_group_name, weights=weights, device=device)

    def _execute(self, programs, inputs, trace):
        return [list(o) for o in run_lockstep(programs, inputs, self.mesh, trace=trace)]


class ThisRank(_Ranks):
    """This process's rank of the current torch.distributed world (`record`: trace its collectives)."""

    def __init__(self, mesh: Mesh, *, weights=None, device=None, record: bool = False):
        import torch.distributed as dist

        super().__init__(mesh, [dist.get_rank()], mesh_groups(mesh), weights=weights, device=device)
        self.record = record

    def _execute(self, programs, inputs, trace):
        if self.record:
            return [list(run_recorded(programs[0], inputs[0], trace))]
        return [list(programs[0](*inputs[0]))]


# ------------------------------------------------------------------------------------ the cache bridge
class CacheBridge:
    """Moves the KV cache from the layout prefill leaves it in to the layout decode reads it in."""

    def __init__(self, prefill, decode, mesh: Mesh):
        src = prefill.output_layouts()
        dst = decode.input_layouts()
        self.pairs = [(src[j], dst[j + 1]) for j in sorted(src)]  # outputs 1.. ↔ decode inputs 2..
        self.needed = any(a != b for a, b in self.pairs)
        self.records: list[CollectiveRecord] = []
        self.gm = _bridge_graph(self.pairs, decode.gm, mesh) if self.needed else None
        if self.gm is not None:
            self.records = [CollectiveRecord.of(c, mesh, "BKSD", node=node.name)
                            for node, c in collectives(self.gm) if c.communicates]

    def __call__(self, runner, caches: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        if not self.needed:
            return caches
        return runner.run("bridge", self.gm, caches, None)


def _bridge_graph(pairs: list[tuple[Layout, Layout]], decode_gm: fx.GraphModule, mesh: Mesh) -> fx.GraphModule:
    sig = decode_gm.meta[SIGNATURE]
    vals = {n.name: n.meta["val"] for n in decode_gm.graph.nodes if n.op == "placeholder"}
    cache_names = sig.inputs[2:2 + len(pairs)]  # the caches (the mask, when given, comes after them)
    g = fx.Graph()
    phs = []
    for name, (have, _) in zip(cache_names, pairs):
        ph = g.placeholder(name)
        ph.meta.update(val=vals[name], **{LAYOUT: have})
        phs.append(ph)
    out = g.output(tuple(phs))
    out.meta[IN_LAYOUTS] = {"outputs": [want for _, want in pairs]}
    gm = fx.GraphModule(nn.Module(), g)
    gm.meta[SIGNATURE] = Signature(params={}, inputs=list(cache_names), in_spec=None, out_spec=None)
    gm.meta[STATE] = {}
    return run(gm, insert_collectives, mesh)


def reference_generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The same greedy loop, unsharded: the numbers every sharded generation is checked against
    (`attention_mask`: left-padded prompts, as `generate` takes them)."""
    B, P = input_ids.shape
    mask = cache_mask(model, input_ids, attention_mask, max_new_tokens)
    step = Step(model, last_only=True).eval()
    cache = empty_cache(model, B, P + max_new_tokens)
    with torch.no_grad():
        logits, k, v = step(*step_inputs(model, input_ids, 0, cache, mask))
        tokens = [logits[:, -1].argmax(-1, keepdim=True)]
        for i in range(1, max_new_tokens):
            logits, k, v = step(*step_inputs(model, tokens[-1], P + i - 1, (k, v), mask))
            tokens.append(logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat([input_ids, *tokens], dim=1)
