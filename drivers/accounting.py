"""Bytes moved: what the plan predicts per layer and kind, against what the ranks actually executed.

Predicted: the Plan's records (the collectives `plan_conversions` gives, attributed to layers).
Measured: every `_c10d_functional` collective a rank ran, with the size of the tensor it was handed,
charged in the same accounting (all-gather: output, reduce-scatter / all-to-all: input, all-reduce:
twice the input), attributed to a layer through the global node it lowers. Equal means the cost
model and the emitted program describe the same communication.
"""

from __future__ import annotations

from collections import defaultdict

import torch.fx as fx

from ..ir.meta import CONVERSION, LAYERS
from ..ir.plan import Plan
from ..passes.attribute import Attribution
from ..runtime.simulate import Executed


def predicted(plan: Plan) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = defaultdict(int)
    for layer in plan.layers:
        for c in layer.collectives:
            out[(layer.name, c.kind)] += c.bytes * layer.count
    return dict(out)


def measured(executed: list[Executed], gm: fx.GraphModule) -> dict[tuple[str, str], int]:
    """Per (layer, kind) bytes of what one rank ran (every rank runs the same collectives)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    attribution = Attribution(gm.meta[LAYERS])
    out: dict[tuple[str, str], int] = defaultdict(int)
    for e in executed:
        out[(attribution.of_conversion(nodes[e.origin].meta[CONVERSION], nodes), e.kind)] += e.bytes
    return dict(out)


def compare(plan: Plan, executed: list[Executed], gm: fx.GraphModule) -> list[tuple[str, str, int, int]]:
    """(layer, kind, predicted, measured) for every layer and kind either side has."""
    p, m = predicted(plan), measured(executed, gm)
    return [(layer, kind, p.get((layer, kind), 0), m.get((layer, kind), 0)) for layer, kind in sorted(set(p) | set(m))]


def compare_generation(gen, tokens: int) -> list[tuple[str, str, int, int]]:
    """Both phases of a Generation: prefill ran once, decode tokens − 1 times (the same program each step)."""
    rows = [(f"prefill/{l}", k, p, m) for l, k, p, m in
            compare(gen.prefill, gen.traces["prefill"].collectives, gen.prefill.program.gm)]
    steps = tokens - 1
    if steps:
        rows += [(f"decode/{l}", k, p * steps, m) for l, k, p, m in
                 compare(gen.decode, gen.traces["decode"].collectives, gen.decode.program.gm)]
    return rows


def format_comparison(rows: list[tuple[str, str, int, int]]) -> str:
    from ..ir.collective import format_bytes

    w = max([len(r[0]) for r in rows] + [5])
    lines = [f"{'layer':<{w}}  {'collective':<15}{'predicted':>12}{'measured':>12}"]
    for layer, kind, p, m in rows:
        flag = "" if p == m else "   ≠"
        lines.append(f"{layer:<{w}}  {kind:<15}{format_bytes(p):>12}{format_bytes(m):>12}{flag}")
    return "\n".join(lines)
