"""Recording a choice as a Plan: layer rows with costs, runs of blocks, transitions, totals, explain.

The chosen candidates are applied to the prototype one run of blocks at a time and summarized; a
block's rows stand for every block of its run (`count`); a row per transition between runs says what
the residual's redistribution costs; totals and memory are the whole model's, per chip.
"""

from __future__ import annotations

from dataclasses import replace

import torch.fx as fx

from ..ir.kinds import LayerKind
from ..ir.meta import LAYERS, PLAN
from ..ir.plan import (
    CollectiveRecord,
    LayerPlan,
    Memory,
    Plan,
    Settings,
    Totals,
)
from ..passes.attribute import OUTPUT
from ..passes.find_layers import Layers
from ..passes.pipeline import run
from ..passes.summarize import summarize
from ..strategies.cost import Comm, LayerCost
from .apply import apply, choices_for
from .candidate import Candidate, Choice
from .costing import experts_notes, idle_expert_params, layer_costs, param_count
from .question import Question
from .search import residual_itemsize, transition_steps
from .sharding import Tally, blocks_named


def record(proto: fx.GraphModule, choice: Choice, results: list, q: Question, n_blocks: int) -> Plan:
    """The Plan of a choice: layer rows of the prototype with costs, one group of block rows per run of
    blocks sharing a candidate (counted as many times), a row per transition between runs, the runs,
    totals, memory per chip, settings and the explanation of every candidate."""
    mesh = choice.mesh
    layers: Layers = proto.meta[LAYERS]
    runs = _runs(choice.blocks, n_blocks if len(layers.blocks) == 1 else max(1, len(layers.blocks)))
    plan: Plan | None = None
    rows: list[LayerPlan] = []
    in_block = {l.name for l in layers.layers if l.block is not None}
    tally = Tally(mesh)
    for k, (cand, start, end) in enumerate(runs):
        conversions = apply(proto, mesh, choices_for(layers, [cand], choice.forced(q.forced)))
        run(proto, summarize, mesh, conversions, model=q.model, hardware=q.hw.name, phase=q.phase,
            quantize=q.precision.weights)
        part = proto.meta[PLAN]
        if len(layers.blocks) == 1:  # a prototype: its block stands for blocks start..end of this run
            tally.add(proto, start, end, first=k == 0, last=k == len(runs) - 1)
        elif k == len(runs) - 1:  # the whole graph, as it is left planned
            tally.add(proto, 0, 0, first=True, last=True)
        costs = layer_costs(proto, mesh, conversions, q.precision, loop=q.collective_matmul)
        loads = experts_notes(proto, mesh)
        renamed: dict[str, str] = {}
        plan = plan or part
        for row in part.layers:
            if (row.name not in in_block and k > 0 and row.kind == LayerKind.EMBEDDING) or (
                    row.name not in in_block and k < len(runs) - 1 and row.kind in (LayerKind.HEAD, LayerKind.OUTPUT)):
                continue  # the embedding feeds the first run, the head reads the last
            c = costs.get(row.name)
            if c is not None:
                _mark(row, c, q)
                row.cost = {**c.times(q.hw, overlap=q.overlap), "flops": c.flops, "weight_bytes": c.weight_bytes,
                            "kv_bytes": c.kv_bytes, "comm_bytes": c.comm_bytes()}
            if row.name in loads:
                row.notes.append(loads[row.name])
            if row.name in in_block and len(layers.blocks) == 1 and n_blocks > 1:
                row.count = end - start + 1
                renamed[row.name] = blocks_named(row.name, layers.blocks[0].name, start, end)
                row.name = renamed[row.name]
            rows.append(row)
        for row in part.layers:  # a feed-forward computing beside an attention's collectives, by its row's name
            for r in row.collectives:
                r.beside = renamed.get(r.beside, r.beside)
        if k < len(runs) - 1:
            rows.append(_transition_row(cand, runs[k + 1][0], end, proto, q))
    plan.layers = _order(rows)
    plan.runs = [c.run(start, end) for c, start, end in runs]
    params, weight_bytes = param_count(proto, n_blocks, q.precision)
    dims = layers.dims
    _totals(plan, choice, q, params=params, weight_bytes=weight_bytes,
            tokens=max(1, dims.get("B", 1) * dims.get("L", 1)), idle_experts=idle_expert_params(proto, n_blocks))
    plan.explain = explain(choice, results, n_blocks)
    plan.sharding = tally.sharding()
    plan.notes = list(q.notes) + ([note] if (note := plan.sharding.experts_note()) else [])
    return plan


def _mark(row: LayerPlan, cost: LayerCost, q: Question) -> None:
    """The row's collectives as the cost model prices them (the trace draws them so): their time on the
    hardware, and which are looped. summarize records, and layer_costs prices, the same conversions step by
    step in the same order. `beside`: the prototype's name of the layer, renamed with the rows."""
    comms = [(c, t) for c, t in cost.priced(q.hw) if c.step.communicates]
    if [c.step.kind for c, _ in comms] != [r.kind for r in row.collectives]:
        raise AssertionError(f"{row.name}: the plan records collectives {[r.kind for r in row.collectives]}, the cost "
                             f"model prices {[c.step.kind for c, _ in comms]}")
    beside = {id(c): b.layer for b in cost.branches for c in b.comm}
    for r, (c, t) in zip(row.collectives, comms):
        r.looped, r.time, r.beside = c.looped, t, beside.get(id(c), "")


def _runs(blocks: list[Candidate], n_blocks: int) -> list[tuple[Candidate, int, int]]:
    """(candidate, first block, last block) per run; one candidate for all stands for every block."""
    if len(blocks) == 1:
        return [(blocks[0], 0, n_blocks - 1)]
    runs: list[tuple[Candidate, int, int]] = []
    for i, c in enumerate(blocks):
        if runs and runs[-1][0] is c:
            runs[-1] = (c, runs[-1][1], i)
        else:
            runs.append((c, i, i))
    return runs


def _order(rows: list[LayerPlan]) -> list[LayerPlan]:
    first = [r for r in rows if r.kind == LayerKind.EMBEDDING]
    last = [r for r in rows if r.kind in (LayerKind.HEAD, LayerKind.OUTPUT)]
    return first + [r for r in rows if r not in first and r not in last] + last


def _transition_row(a: Candidate, b: Candidate, after: int, proto: fx.GraphModule, q: Question) -> LayerPlan:
    """The residual stream redistributed between two runs of blocks (what the DP charged)."""
    layers: Layers = proto.meta[LAYERS]
    mesh = a.mesh
    shape = (layers.dims["B"], layers.dims["L"], layers.dims["E"])
    item = q.precision.nbytes("activations", residual_itemsize(proto))
    steps = transition_steps(a.member, b.member, mesh, shape, item) or ()
    row = LayerPlan(name=f"after block {after}", kind=LayerKind.TRANSITION, block=after,
                    choice=f"{a.member.on(mesh)} → {b.member.on(mesh)}")
    cost = LayerCost(comm=[Comm(s, item) for s in steps])
    row.collectives = [replace(CollectiveRecord.of(c.step, mesh, "BLE", node=f"residual→{c.step.kind}"), time=t)
                       for c, t in cost.priced(q.hw) if c.step.communicates]
    row.cost = {**cost.times(q.hw), "comm_bytes": cost.comm_bytes()}
    return row


def _totals(plan: Plan, choice: Choice, q: Question, *, params: float, weight_bytes: float, tokens: int,
            idle_experts: float = 0.0) -> None:
    mesh = choice.mesh
    latency = choice.total
    active = params - idle_experts  # a token's matmuls use every parameter but the experts it is not routed to
    plan.totals = Totals(latency=latency, mfu=2 * active * tokens / (mesh.size * q.hw.peak_flops * latency),
                         chip_ms_per_token=latency * mesh.size / tokens * 1e3, tokens_per_step=tokens, params=params,
                         transitions=sum(choice.transitions))
    mem = _chain_memory(choice)
    plan.memory = Memory(weights_total=weight_bytes, weights_per_chip=mem["weights"],
                         replicated_per_chip=mem["weights"] - weight_bytes / mesh.size,
                         kv_cache_per_chip=mem["kv_cache"], hbm_per_chip=q.hw.hbm_bytes)
    plan.settings = Settings(objective=q.objective, weights=q.precision.weights or "as captured",
                             kv=q.precision.kv or "as captured", overlap=q.overlap, collective_matmul=q.collective_matmul,
                             requested=dict(q.request),
                             context=q.context)


def _chain_memory(choice: Choice) -> dict[str, float]:
    """Per chip: the first candidate's whole model with each block replaced by its own candidate's block."""
    first = choice.first.memory
    out = {}
    for kind, block in (("weights", "block_weights"), ("kv_cache", "block_kv_cache")):
        out[kind] = first[kind] + sum(c.memory[block] - first[block] for c in choice.blocks)
    return out


def explain(choice: Choice, results: list, n_blocks: int) -> list[str]:
    """Every candidate of the chosen mesh with its cost and why it lost; other meshes' best."""
    win = choice.first

    def chain(c: Candidate) -> float:
        t = c.times
        return (t.get("embedding", {}).get("time", 0) + n_blocks * c.block_time() + t.get("head", {}).get("time", 0)
                + t.get(OUTPUT, {}).get("time", 0))

    def parts(c: Candidate) -> dict[str, float]:
        return {k: n_blocks * sum(c.times[p][k] for p in ("attention", "ffn", "experts") if p in c.times)
                for k in ("compute", "memory", "comm")}

    lines = [f"candidates on mesh {choice.mesh} (per step; blocks ×{n_blocks}):"]
    width = max(22, *(len(c.name) for c in choice.candidates))
    base, wparts = chain(win), parts(win)
    for c in sorted(choice.candidates, key=lambda c: (c.refused is not None, chain(c) if not c.refused else 0)):
        if c.refused:
            lines.append(f"  {c.name:<{width}} refused: {c.refused}")
            continue
        t = chain(c)
        if c is win or c.same_layout(win):
            verdict = "chosen"
        else:
            p = parts(c)
            worst = max(p, key=lambda k: p[k] - wparts[k])
            delta = p[worst] - wparts[worst]
            rel = delta / wparts[worst] if wparts[worst] else float("inf")
            verdict = f"+{(t - base) * 1e3:.3f} ms: +{rel * 100:.0f}% {_WORD[worst]}" if t > base else "tie"
        lines.append(f"  {c.name:<{width}} {t * 1e3:10.3f} ms  {verdict}")
    others = [(m, r) for m, r in results if m != choice.mesh]
    if others:
        lines.append("other meshes (best candidate):")
        for m, r in others:
            lines.append(f"  {str(m):<10} " + (f"{r.total * 1e3:10.3f} ms  {r.first.name}" if isinstance(r, Choice)
                                                else "no plan: " + r.splitlines()[0]))
    return lines


_WORD = {"compute": "compute", "memory": "memory traffic", "comm": "communication"}
