"""From a model and a question (phase, batch, chips, hardware, objective) to a Plan with costs.

    prototype  capture one block of the model for the phase (its step with a KV cache), once
    search     strategies/planner.py: every candidate layout on every mesh, costed on the prototype
    record     the chosen candidates applied to the prototype, summarized, block rows counted N times
    program    built only when asked for (emit / simulate): the full model captured and given the
               same per-block choices, then collectives inserted
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import PlanError, ShardwiseError
from .ir.hardware import Hardware
from .ir.mesh import Mesh
from .ir.plan import LayerPlan, Plan
from .passes.assign_layouts import ASSIGNMENT, assign_layouts
from .passes.attribute import OUTPUT
from .passes.find_layers import LAYERS, Layers, block_of
from .passes.insert_collectives import insert_collectives, plan_conversions
from .passes.pipeline import Pass, run_pipeline
from .passes.propagate import UNKNOWN, propagate
from .passes.summarize import replicated_weights, summarize
from .strategies.cost import Precision
from .strategies.family import ATTENTION_MODES, all_members, parse_ffn
from .strategies.cost import LayerCost
from .strategies.planner import Candidate, Choice, reset, search


@dataclass
class Question:
    meshes: list[Mesh]
    hw: Hardware
    precision: Precision
    objective: str = "latency"
    overlap: bool = False
    request: dict[str, str] = field(default_factory=dict)  # forced layouts by kind
    phase: str = "prefill"
    model: str = ""


def candidates_of(request: dict[str, str]) -> tuple[list, tuple[str, ...], dict[str, str]]:
    members = [parse_ffn(request["ffn"])] if "ffn" in request else all_members()
    modes = (request["attention"],) if "attention" in request else ATTENTION_MODES
    forced = {k: v for k, v in request.items() if k in ("embedding", "head")}
    return members, modes, forced


def choose(proto: fx.GraphModule, q: Question, n_blocks: int) -> tuple[Choice, list]:
    members, modes, forced = candidates_of(q.request)
    return search(proto, q.meshes, objective=q.objective, hw=q.hw, precision=q.precision, n_blocks=n_blocks,
                  overlap=q.overlap, members=members, attention=modes, forced=forced)


def block_choices(layers: Layers, chosen: list[Candidate], forced: dict[str, str]) -> dict[str, str]:
    """Per-layer layout names of a graph with len(chosen) blocks (or any, if one candidate is chosen)."""
    out = {}
    for l in layers.layers:
        c = chosen[min(l.block or 0, len(chosen) - 1)] if l.block is not None else chosen[0]
        if l.kind == "ffn":
            out[l.name] = c.member.name
        elif l.kind == "attention":
            out[l.name] = c.attention
        else:
            out[l.name] = forced.get(l.kind, "auto" if l.kind == "embedding" else "vocab")
    return out


def apply(gm: fx.GraphModule, mesh: Mesh, choices: dict[str, str], *, insert: bool) -> list:
    reset(gm)
    run_pipeline(gm, [
        Pass("assign_layouts", lambda g: assign_layouts(g, mesh, choices), needs=(LAYERS,), makes=(ASSIGNMENT,)),
        Pass("propagate", lambda g: propagate(g, mesh), needs=(ASSIGNMENT,), makes=(UNKNOWN,)),
    ])
    conversions = plan_conversions(gm, mesh)
    if insert:
        insert_collectives(gm, mesh)
    return conversions


def record(proto: fx.GraphModule, choice: Choice, q: Question, n_blocks: int) -> Plan:
    """The Plan of a choice: layer rows of the prototype with costs, one group of block rows per run of
    blocks sharing a candidate (counted as many times), and a row per transition between runs."""
    from .strategies.cost import layer_costs

    mesh = choice.mesh
    _, _, forced = candidates_of(q.request)
    layers: Layers = proto.meta[LAYERS]
    runs = _runs(choice.blocks)
    plan: Plan | None = None
    rows: list[LayerPlan] = []
    for k, (cand, start, end) in enumerate(runs):
        conversions = apply(proto, mesh, block_choices(layers, [cand], forced), insert=False)
        part = summarize(proto, mesh, conversions, model=q.model, hardware=q.hw.name, phase=q.phase)
        costs = layer_costs(proto, mesh, conversions, q.precision)
        plan = plan or part
        in_block = {l.name for l in layers.layers if l.block is not None}
        for row in part.layers:
            if (row.name not in in_block and k > 0 and row.kind == "embedding") or (
                    row.name not in in_block and k < len(runs) - 1 and row.kind in ("head", "output")):
                continue  # the embedding feeds the first run, the head reads the last
            c = costs.get(row.name)
            if c is not None:
                row.cost = {**c.times(q.hw, overlap=q.overlap), "flops": c.flops, "weight_bytes": c.weight_bytes,
                            "kv_bytes": c.kv_bytes, "comm_bytes": c.comm_bytes()}
            if row.name in in_block and len(layers.blocks) == 1 and n_blocks > 1:
                row.count = end - start + 1
                row.name = _blocks_named(row.name, layers.blocks[0].name, start, end)
            rows.append(row)
        if k < len(runs) - 1:
            rows.append(_transition_row(cand, runs[k + 1][0], end, proto, q))
    plan.layers = _order(rows)
    return plan


def _runs(blocks: list[Candidate]) -> list[tuple[Candidate, int, int]]:
    runs: list[tuple[Candidate, int, int]] = []
    for i, c in enumerate(blocks):
        if runs and runs[-1][0] is c:
            runs[-1] = (c, runs[-1][1], i)
        else:
            runs.append((c, i, i))
    return runs


def _order(rows: list[LayerPlan]) -> list[LayerPlan]:
    first = [r for r in rows if r.kind == "embedding"]
    last = [r for r in rows if r.kind in ("head", "output")]
    return first + [r for r in rows if r not in first and r not in last] + last


def _transition_row(a: Candidate, b: Candidate, after: int, proto: fx.GraphModule, q: Question) -> LayerPlan:
    """The residual stream redistributed between two runs of blocks (what the DP charged)."""
    from .ir.plan import CollectiveRecord
    from .strategies.cost import Comm
    from .strategies.planner import _residual_itemsize, _transition_steps

    layers: Layers = proto.meta[LAYERS]
    mesh = a.mesh
    shape = (layers.dims["B"], layers.dims["L"], layers.dims["E"])
    item = q.precision.nbytes("activations", _residual_itemsize(proto))
    steps = _transition_steps(a.member, b.member, mesh, shape, item) or ()
    row = LayerPlan(name=f"after block {after}", kind="transition", block=after,
                    layout=f"{a.member.on(mesh)} → {b.member.on(mesh)}")
    for s in steps:
        if s.communicates:
            row.collectives.append(CollectiveRecord(
                node=f"residual→{s.kind}", kind=s.kind, group=mesh.format_atoms(s.atoms), src=s.src.notation(mesh, "BLE"),
                dst=s.dst.notation(mesh, "BLE"), bytes=s.bytes, wire_bytes=s.wire_bytes, axes=list(s.axes)))
    cost = LayerCost(comm=[Comm(s, item) for s in steps])
    row.cost = {**cost.times(q.hw), "comm_bytes": cost.comm_bytes()}
    return row


def _blocks_named(name: str, block: str, start: int, end: int) -> str:
    head, _, idx = block.rpartition(".")
    if not idx.isdigit():
        return name
    return name.replace(block, f"{head}.[{start}-{end}]" if end > start else f"{head}.{start}", 1)


def totals(plan: Plan, choice: Choice, q: Question, *, params: float, weight_bytes: float, tokens: int) -> None:
    mesh = choice.mesh
    latency = choice.total
    plan.totals = {
        "latency": latency,
        "mfu": 2 * params * tokens / (mesh.size * q.hw.peak_flops * latency),
        "chip_ms_per_token": latency * mesh.size / tokens * 1e3,
        "tokens_per_step": tokens,
        "params": params,
    }
    if any(t > 0 for t in choice.transitions):
        plan.totals["transitions"] = sum(choice.transitions)
    mem = _chain_memory(choice)
    plan.memory.update({"weights_total": weight_bytes, "weights_per_chip": mem["weights"],
                        "replicated_per_chip": mem["weights"] - weight_bytes / mesh.size,
                        "kv_cache_per_chip": mem["kv_cache"], "hbm_per_chip": q.hw.hbm_bytes})
    plan.settings.update({"objective": q.objective, "weights": q.precision.weights or "as captured",
                          "kv": q.precision.kv or "as captured",
                          "overlap": q.overlap, "layouts": dict(q.request), "chosen": choice.first.name,
                          "family": family_class(choice.first)})


def _chain_memory(choice: Choice) -> dict[str, float]:
    """Per chip: the first candidate's whole model with each block replaced by its own candidate's block."""
    first = choice.first.memory
    out = {}
    for kind, block in (("weights", "block_weights"), ("kv_cache", "block_kv_cache")):
        out[kind] = first[kind] + sum(c.memory[block] - first[block] for c in choice.blocks)
    return out


def family_class(c: Candidate) -> str:
    """The paper's name for a member on any mesh: by which roles have axes."""
    m = c.member
    if m.batch and not m.e and not m.f:
        ffn = "WG-XYZ"
    elif m.batch:
        ffn = "WG-X" if len(m.batch) == 1 else "WG-XY"
    elif m.e and m.f:
        ffn = "2D WS"
    elif m.replicated_residual:
        ffn = "1D WS (all-reduce)"
    else:
        ffn = "1D WS"
    return f"{ffn} + attention by {c.core or c.attention}"


def explain(choice: Choice, results: list, n_blocks: int) -> list[str]:
    """Every candidate of the chosen mesh with its cost and why it lost; other meshes' best."""
    win = choice.first

    def chain(c: Candidate) -> float:
        t = c.times
        return (t.get("embedding", {}).get("time", 0) + n_blocks * c.block_time() + t.get("head", {}).get("time", 0)
                + t.get(OUTPUT, {}).get("time", 0))

    def parts(c: Candidate) -> dict[str, float]:
        return {k: n_blocks * sum(c.times[p][k] for p in ("attention", "ffn") if p in c.times)
                for k in ("compute", "memory", "comm")}

    lines = [f"candidates on mesh {choice.mesh} (per step; blocks ×{n_blocks}):"]
    base, wparts = chain(win), parts(win)
    for c in sorted(choice.candidates, key=lambda c: (c.refused is not None, chain(c) if not c.refused else 0)):
        if c.refused:
            lines.append(f"  {c.name:<22} refused: {c.refused}")
            continue
        t = chain(c)
        if c is win or (c.member == win.member and c.attention == win.attention):
            verdict = "chosen"
        else:
            p = parts(c)
            worst = max(p, key=lambda k: p[k] - wparts[k])
            delta = p[worst] - wparts[worst]
            rel = delta / wparts[worst] if wparts[worst] else float("inf")
            verdict = f"+{(t - base) * 1e3:.3f} ms: +{rel * 100:.0f}% {_WORD[worst]}" if t > base else "tie"
        lines.append(f"  {c.name:<22} {t * 1e3:10.3f} ms  {verdict}")
    others = [(m, r) for m, r in results if m != choice.mesh]
    if others:
        lines.append("other meshes (best candidate):")
        for m, r in others:
            lines.append(f"  {str(m):<10} " + (f"{r.total * 1e3:10.3f} ms  {r.first.name}" if isinstance(r, Choice)
                                                else "no plan: " + r.splitlines()[0]))
    return lines


_WORD = {"compute": "compute", "memory": "memory traffic", "comm": "communication"}


def param_count(proto: fx.GraphModule, n_blocks: int, precision: Precision | None = None) -> tuple[float, float]:
    """(parameters, weight bytes) of the whole model from its prototype: the block counted n_blocks times."""
    sig = proto.meta["sw_signature"]
    layers: Layers = proto.meta[LAYERS]
    scale = n_blocks - 1 if len(layers.blocks) == 1 else 0
    counts = {"params": [0.0, 0.0], "bytes": [0.0, 0.0]}  # [whole prototype, its block]
    for n in proto.graph.nodes:
        if n.op != "placeholder" or n.name not in sig.params:
            continue
        v = n.meta["val"]
        in_block = bool(n.users) and block_of(next(iter(n.users))) is not None
        nbytes = v.numel() * (precision or Precision()).nbytes("weights", v.element_size())
        counts["bytes"][0] += nbytes
        counts["bytes"][1] += nbytes if in_block else 0
        if sig.params[n.name] not in sig.buffers:
            counts["params"][0] += v.numel()
            counts["params"][1] += v.numel() if in_block else 0
    return tuple(total + scale * block for total, block in counts.values())
