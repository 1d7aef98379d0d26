"""Greedy generation with sharded prefill and decode programs and a sharded KV cache.

    tokens = shardwise.generate(model, ids, 16, mesh="2x2x1", simulate=True)    # [B, P + 16]

Two plans from the same model: prefill (the P prompt tokens, written into a cache of P + new
positions) and decode (one token at a time). Each is captured as a pure step (models/steps.py) and
planned for its phase; its KV cache stays split on every rank between steps (by KV heads or by batch,
as planned). When the two plans split the cache differently, a bridge program redistributes it once,
between the phases, with explicit collectives (reported). Ranks run simulated in this process, or as
this rank of the current torch.distributed world.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ..ir.layout import Layout
from ..ir.mesh import Mesh
from ..ir.plan import CollectiveRecord, Plan
from ..models.steps import Step, empty_cache, step_inputs
from ..passes.emit import emit
from ..passes.graph_utils import SIGNATURE, STATE, Signature
from ..passes.insert_collectives import collectives, insert_collectives
from ..strategies.rules import IN_LAYOUTS, LAYOUT
from .lower import shard_tensor
from .simulate import Trace, run_lockstep, run_recorded, sim_group_name


@dataclass
class Generation:
    tokens: torch.Tensor  # [B, P + new]: the prompt and the generated tokens
    prefill: Plan
    decode: Plan
    bridge: list[CollectiveRecord] = field(default_factory=list)  # cache redistribution between the phases
    traces: dict[str, Trace] = field(default_factory=dict)  # simulated runs: what each phase executed


def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, mesh: Mesh | str,
             layouts: str | dict | None = None, prefill_layouts: str | dict | None = None,
             decode_layouts: str | dict | None = None, simulate: bool = False, hardware: str = "tpu-v4",
             weight_dtype: str | None = None, details: bool = False, weights=None,
             record: bool = False) -> torch.Tensor | Generation:
    """Greedy tokens of `model` after `input_ids`, every step run sharded over `mesh`.

    Layouts not forced (`layouts` for both phases, or per phase) are chosen by the planner for each
    phase. `simulate=True` runs every rank in this process; otherwise this process is one rank of the
    current torch.distributed world (launch with torchrun). `details=True` returns a Generation with
    the two plans and the cache bridge.

    A model on the meta device is planned there and run with its shards read from `weights` (a
    WeightSource such as SafetensorsSource), on the device of `input_ids`. `record=True` records
    every collective each phase executes (Generation.traces)."""
    from .. import api

    mesh = Mesh.parse(mesh)
    B, P = input_ids.shape
    S = P + max_new_tokens
    step = Step(model, last_only=True).eval()
    where = next(model.parameters()).device
    cache = empty_cache(model, B, S, device=input_ids.device)
    pre_args = step_inputs(model, input_ids, 0, cache)
    dec_args = step_inputs(model, input_ids[:, -1:], P, cache)

    def to_model(args: tuple) -> tuple:  # capture where the model lives, run on real tensors
        return tuple(tuple(t.to(where) for t in a) if isinstance(a, tuple) else a.to(where) for a in args)
    common = dict(mesh=mesh, hardware=hardware, weight_dtype=weight_dtype)
    prefill = api.plan(step, to_model(pre_args), {}, layouts=prefill_layouts or layouts, phase="prefill", **common)
    decode = api.plan(step, to_model(dec_args), {}, layouts=decode_layouts or layouts, phase="decode", **common)
    bridge = CacheBridge(prefill.program, decode.program, mesh)
    run_on = input_ids.device if where.type == "meta" else None
    runner = (SimulatedRanks(mesh, weights=weights, device=run_on) if simulate
              else ThisRank(mesh, weights=weights, device=run_on, record=record))

    flat_pre = prefill.program.flat_inputs(pre_args, {})
    outs = runner.run("prefill", prefill.program, flat_pre, prefill.program.input_layouts())
    token = _next_token(outs)
    caches = bridge(runner, [o[1:] for o in outs])
    generated = [token]
    for i in range(1, max_new_tokens):
        pos = torch.tensor(P + i - 1, dtype=torch.long, device=input_ids.device)
        flat = [[token, pos, *c] for c in caches]
        outs = runner.run("decode", decode.program, flat, None)
        token = _next_token(outs)
        caches = [o[1:] for o in outs]
        generated.append(token)
    tokens = torch.cat([input_ids, *generated], dim=1)
    if not details:
        return tokens
    return Generation(tokens, prefill, decode, bridge.records, runner.traces)


def _next_token(outs: list[list[Any]]) -> torch.Tensor:
    """Greedy next token from rank 0's logits (replicated: every rank has the same) → [B, 1]."""
    return outs[0][0][:, -1].argmax(-1, keepdim=True)


# ------------------------------------------------------------------------------------ runners
class SimulatedRanks:
    """Every rank's program in this process (emitted once per phase)."""

    def __init__(self, mesh: Mesh, *, weights=None, device=None):
        self.mesh, self.weights, self.device = mesh, weights, device
        self.programs: dict[str, list[fx.GraphModule]] = {}
        self.traces: dict[str, Trace] = {}

    def run(self, phase: str, program, flat_or_per_rank, layouts: dict[int, Layout] | None) -> list[list[Any]]:
        if phase not in self.programs:
            gm = program.gm if hasattr(program, "gm") else program
            self.programs[phase] = [emit(gm, self.mesh, r, group_name=sim_group_name, weights=self.weights,
                                         device=self.device) for r in range(self.mesh.size)]
        if layouts is not None:  # one flat input list, shared: split the sharded ones per rank
            inputs = [[shard_tensor(x, layouts[i], self.mesh, r) if i in layouts else x
                       for i, x in enumerate(flat_or_per_rank)] for r in range(self.mesh.size)]
        else:
            inputs = flat_or_per_rank
        trace = self.traces.setdefault(phase, Trace())
        return [list(o) for o in run_lockstep(self.programs[phase], inputs, self.mesh, trace=trace)]


class ThisRank:
    """This process's rank of the current torch.distributed world."""

    def __init__(self, mesh: Mesh, *, weights=None, device=None, record: bool = False):
        import torch.distributed as dist

        from .distributed import mesh_groups

        self.mesh, self.rank = mesh, dist.get_rank()
        self.groups = mesh_groups(mesh)
        self.weights, self.device, self.record = weights, device, record
        self.programs: dict[str, fx.GraphModule] = {}
        self.traces: dict[str, Trace] = {}

    def run(self, phase: str, program, flat_or_per_rank, layouts: dict[int, Layout] | None) -> list[list[Any]]:
        if phase not in self.programs:
            gm = program.gm if hasattr(program, "gm") else program
            self.programs[phase] = emit(gm, self.mesh, self.rank, group_name=self.groups, weights=self.weights,
                                        device=self.device)
        if layouts is not None:
            flat = [shard_tensor(x, layouts[i], self.mesh, self.rank) if i in layouts else x
                    for i, x in enumerate(flat_or_per_rank)]
        else:
            flat = flat_or_per_rank[0]
        with torch.no_grad():
            if self.record:
                return [list(run_recorded(self.programs[phase], flat, self.traces.setdefault(phase, Trace())))]
            return [list(self.programs[phase](*flat))]


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
            for node, c in collectives(self.gm):
                if c.communicates:
                    self.records.append(CollectiveRecord(
                        node=node.name, kind=c.kind, group=mesh.format_atoms(c.atoms), src=c.src.notation(mesh, "BKSD"),
                        dst=c.dst.notation(mesh, "BKSD"), bytes=c.bytes, wire_bytes=c.wire_bytes, axes=list(c.axes)))

    def __call__(self, runner, caches: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        if not self.needed:
            return caches
        return runner.run("bridge", self.gm, caches, None)


def _bridge_graph(pairs: list[tuple[Layout, Layout]], decode_gm: fx.GraphModule, mesh: Mesh) -> fx.GraphModule:
    sig = decode_gm.meta[SIGNATURE]
    vals = {n.name: n.meta["val"] for n in decode_gm.graph.nodes if n.op == "placeholder"}
    cache_names = sig.inputs[2:]
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
    return insert_collectives(gm, mesh)


def reference_generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """The same greedy loop, unsharded: the numbers every sharded generation is checked against."""
    B, P = input_ids.shape
    step = Step(model, last_only=True).eval()
    cache = empty_cache(model, B, P + max_new_tokens)
    with torch.no_grad():
        logits, k, v = step(*step_inputs(model, input_ids, 0, cache))
        tokens = [logits[:, -1].argmax(-1, keepdim=True)]
        for i in range(1, max_new_tokens):
            logits, k, v = step(*step_inputs(model, tokens[-1], P + i - 1, (k, v)))
            tokens.append(logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat([input_ids, *tokens], dim=1)
