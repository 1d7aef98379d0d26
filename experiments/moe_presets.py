"""Mixture-of-experts models at scale: the four MoE presets planned for prefill and decode on H200s.

    python -m shardwise.experiments.moe_presets                      # the table, printed
    python -m shardwise.experiments.moe_presets --readme README.md   # also rewrite the README's table
    python -m shardwise.experiments.moe_presets deepseek-v3          # some of the presets

Each preset (models/presets.py: mixtral-8x7b, qwen3-235b-a22b, gpt-oss-120b, deepseek-v3, published
shapes built on the meta device in bf16, nothing materialised) is planned by `shardwise.plan` from a
chip count (every mesh of that many chips searched) on the `h200` profile (141 GB HBM: data-sheet
figures, efficiencies assumed, not fitted: ir/hardware.py; every chip behind one NVLink switch, which 64
chips in 8 nodes are not, so their communication is a lower bound):

  chips     8 for Mixtral 8x7B (87 GiB of bf16 weights: one HGX node; it fits one chip, 8 is how it is
            served), 64 for the others (Qwen3 438 GiB, gpt-oss 218 GiB, DeepSeek-V3 1.25 TiB: 8 nodes, the
            smallest power of two that holds DeepSeek-V3 with room for its cache)
  decode    64 and 256 sequences, one token each after a 2048-position KV cache: 64 is the paper's
            low-latency decode batch; at 256 a top-8-of-256 router touches every expert of a block
            (1 − (1 − 8/256)^256 > 99.9%; at 64, 87%), so the step reads all expert weights and the cost
            of a token falls
  prefill   1 × 2048 tokens (one prompt: latency) and 8 × 2048 (16384 tokens: throughput)

Columns: the mesh and the member of the layout family chosen for most blocks (`Plan.main`; other runs
in a footnote), how attention is split, the experts row's layout and how its experts are split (or why
they run replicated), the predicted step latency, weights + KV cache per chip, and the plan's MFU
(2 · the parameters a token uses · tokens / (chips · peak · latency): a mixture's routed experts count
k / X of their weights, as a token runs k of the X experts). The presets' planning assumptions
(`Preset.assumes`: DeepSeek-V3's 3 dense layers planned as MoE layers, gpt-oss's sliding layers at full
context) are printed under the table.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import dataclass

from .. import api
from ..errors import ShardwiseError
from ..ir.kinds import LayerKind
from ..ir.plan import Plan
from ..models import presets
from ..planning.search import meshes_for

HARDWARE = "h200"
CONTEXT = 2048
CHIPS = {"mixtral-8x7b": 8, "qwen3-235b-a22b": 64, "gpt-oss-120b": 64, "deepseek-v3": 64}
# (phase, batch, tokens per sequence)
CASES = (("prefill", 1, 2048), ("prefill", 8, 2048), ("decode", 64, 1), ("decode", 256, 1))
README_START = "<!-- moe-presets: written by python -m shardwise.experiments.moe_presets --readme README.md -->"
README_END = "<!-- moe-presets: end -->"
GiB = 1024**3


@dataclass
class Row:
    model: str
    phase: str
    batch: int
    seq: int
    chips: int
    weights: str = "bf16"
    plan: Plan | None = None
    error: str = ""
    seconds: float = 0.0


def plan_row(row: Row) -> Row:
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NotShardedWarning: the table says what runs replicated
            row.plan = api.plan(row.model, chips=row.chips, hardware=HARDWARE, phase=row.phase, batch=row.batch,
                                seq=row.seq, context=CONTEXT, weight_dtype=row.weights)
    except ShardwiseError as e:
        row.error = _why(e, row)
    row.seconds = time.perf_counter() - start
    return row


def _why(error: ShardwiseError, row: Row) -> str:
    """Why no mesh of the chip count has a plan, in one line: the cheapest refusal on the first mesh searched
    (a search over every mesh names each mesh only; planning that mesh alone names its candidates' reasons)."""
    mesh = str(meshes_for(row.chips)[0])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            api.plan(row.model, mesh=mesh, hardware=HARDWARE, phase=row.phase, batch=row.batch, seq=row.seq,
                     context=CONTEXT, weight_dtype=row.weights)
    except ShardwiseError as e:
        said = [l.strip() for l in str(e).splitlines()[1:] if l.startswith("  ")]
        if said:
            return f"on {mesh}, {said[0]}" + (f" (+{len(said) - 1} other refusals)" if len(said) > 1 else "")
    return str(error).splitlines()[0]


def run(models: list[str]) -> list[Row]:
    rows = []
    for name in models:
        for phase, batch, seq in CASES:
            row = plan_row(Row(name, phase, batch, seq, CHIPS[name]))
            rows.append(row)
            print(f"{name} {phase} {batch}×{seq}: {row.seconds:.1f} s", file=sys.stderr)
    return rows


# ------------------------------------------------------------------------------------ the table
def _experts(plan: Plan) -> str:
    rows = [l for l in plan.layers if l.kind == LayerKind.EXPERTS]
    if not rows:
        s = plan.sharding
        n = f"{s.experts_per_block} experts per block" if s and s.experts_per_block else "experts"
        return f"replicated: not recognised ({n})"
    r = max(rows, key=lambda l: l.count)
    how = {"parallel": "parallel", "a2a": "parallel, all-to-all"}.get(r.choice.partition(":")[2], "sliced")
    return f"{how}: `{r.weights['w_out']['at_rest']}`"


def _shape(row: Row) -> str:
    return f"{row.batch}×{row.seq}" if row.phase == "prefill" else f"{row.batch} (ctx {CONTEXT})"


def markdown(rows: list[Row]) -> str:
    header = ("model", "weights", "phase", "batch", "chips", "mesh", "blocks", "attention", "experts", "ms/step",
              "GiB/chip (w + KV)", "MFU")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes: list[str] = []
    for r in rows:
        head = f"| {r.model} | {r.weights} | {r.phase} | {_shape(r)} | {r.chips} |"
        if r.plan is None:
            lines.append(f"{head} no plan: {r.error} | | | | | | |")
            continue
        p = r.plan
        main = p.main
        blocks = main.member + ("" if len(p.runs) == 1 else f" ({main.count} of {sum(x.count for x in p.runs)})")
        if len(p.runs) > 1:
            notes.append(f"{r.model} {r.weights} {r.phase} {_shape(r)}: {p.chosen}")
        t, m = p.totals, p.memory
        attention = main.attention + (f", latent {main.latent}" if main.latent else "")
        lines.append(f"{head} {p.mesh} | {blocks} | {attention} | {_experts(p)} | {t.latency * 1e3:.3g} | "
                     f"{m.weights_per_chip / GiB:.1f} + {m.kv_cache_per_chip / GiB:.2g} | {t.mfu * 100:.1f}% |")
    out = "\n".join(lines)
    if notes:
        out += "\n\nRuns of blocks where the plan mixes layouts: " + "; ".join(notes) + "."
    assumed = [(n, presets.get(n).assumes) for n in dict.fromkeys(r.model for r in rows) if presets.get(n).assumes]
    if assumed:
        out += "\n\nWhat the presets' plans assume:\n\n" + "\n".join(f"- {n}: {a}." for n, a in assumed)
    return out + "\n"


def write_readme(rows: list[Row], path: str) -> None:
    """Put the table between the markers of the README at `path` (replacing what was there)."""
    with open(path) as f:
        text = f.read()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{path} has no moe-presets markers: put {README_START!r} and {README_END!r} where the "
                         f"table goes")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    with open(path, "w") as f:
        f.write(head + README_START + "\n\n" + markdown(rows) + "\n" + README_END + tail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=list(CHIPS), help="presets (default: all four)")
    parser.add_argument("--readme", metavar="PATH", help="rewrite the table between the README's markers")
    a = parser.parse_args(argv)
    unknown = [m for m in a.models if m not in CHIPS]
    if unknown:
        parser.error(f"not a mixture-of-experts preset: {', '.join(unknown)} (known: {', '.join(CHIPS)})")
    start = time.perf_counter()
    rows = run(a.models)
    print(markdown(rows))
    print(f"{len(rows)} plans in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if a.readme:
        write_readme(rows, a.readme)
        print(f"wrote the table into {a.readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
