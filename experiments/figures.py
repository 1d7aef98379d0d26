"""Every figure of the README, regenerated into docs/ (PNG and SVG), with the sweep behind them (CSV).

    python -m shardwise.experiments.figures             # ~45 s on two cores
    python -m shardwise.experiments.figures --out DIR   # elsewhere

    docs/figure1_cost_vs_latency    PAPER.md's Figure 1: PaLM 8B / 62B / 540B on 8–256 TPU v4 chips
                                    (the paper's meshes and named layouts), int8 weights, batch 1–1024,
                                    the Pareto frontier of each, prefill and decode; stars: Table 2's four
                                    operating points (64 chips, their own weight precisions)
    docs/layout_map                 PaLM 540B: the layout chosen at every tokens per step × chip count,
                                    with Figure 3's crossovers (experiments/paper_checks.py)
    docs/breakdown                  every layout at Table 2's low-latency decode point and its
                                    high-throughput prefill point: compute / memory / communication
    docs/sweep.csv                  every point of the sweep, one row each
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from ..report.engine import Engine, paper_mesh
from ..report.figures import breakdown, cost_vs_latency, layout_map, layout_times
from ..report.sweep import Sweep, SweepRow, run_sweep
from .fit_tpu_v4 import ROWS, Row
from .paper_checks import figure3_crossovers

MODELS = ["palm-8b", "palm-62b", "palm-540b"]
CHIPS = [8, 16, 32, 64, 128, 256]
BATCHES = [1, 4, 16, 64, 256, 1024]  # Figure 1's grid
MAP_BATCHES = [2, 8, 32, 128, 512]  # with BATCHES: every power of two from 1 to 1024, for the layout map
CONTEXT = 2048
DOCS = Path(__file__).resolve().parent.parent / "docs"


def table2_points(sweep: Sweep) -> list[tuple[Row, SweepRow]]:
    """PAPER.md's Table 2 rows (experiments.fit_tpu_v4.ROWS) with the sweep's point for each: PaLM 540B
    on 64 chips at the row's phase, batch and weight precision, objective latency."""
    out = []
    for row in ROWS:
        [point] = sweep.select(model="palm-540b", phase=row.phase, batch=row.batch, weights=row.weights, chips=64,
                               objective="latency")
        out.append((row, point))
    return out


def sweeps(workers: int) -> Sweep:
    """Figure 1's grid (int8), the layout map's extra batches and Table 2's bf16 points, in one table."""
    common = {"context": CONTEXT, "workers": workers}
    parts = [
        run_sweep(MODELS, chips=CHIPS, batches=BATCHES, weights=["int8"], **common),
        run_sweep(["palm-540b"], chips=CHIPS, batches=MAP_BATCHES, phases=["prefill"], weights=["int8"], **common),
    ]
    for row in ROWS:
        if row.weights != "int8" or row.batch not in BATCHES + MAP_BATCHES:
            parts.append(run_sweep(["palm-540b"], chips=[64], batches=[row.batch], phases=[row.phase],
                                   weights=[row.weights], progress=False, **common))
    rows = [r for p in parts for r in p.rows]
    return Sweep(rows, sum(p.seconds for p in parts))


def breakdown_panels(engine: Engine) -> list[tuple[str, list]]:
    """Table 2's low-latency decode and high-throughput prefill points on 64 chips (mesh 4×4×4)."""
    panels = []
    for row in (ROWS[1], ROWS[2]):
        proto = engine.prototype("palm-540b", row.phase, row.batch, row.seq, CONTEXT)
        choice = engine.choice("palm-540b", phase=row.phase, batch=row.batch, seq=row.seq, context=CONTEXT,
                               weights=row.weights, mesh=paper_mesh(64), members="paper")
        title = (f"PaLM 540B {row.phase}, batch {row.batch}, {row.weights} weights, 64 chips ({choice.mesh}): "
                 f"the paper uses {row.ffn} + attention by {row.attention}")
        panels.append((title, layout_times(choice, proto.n_blocks)))
    return panels


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DOCS, help="folder for the figures (default: docs/)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="sweep processes")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    a.out.mkdir(parents=True, exist_ok=True)
    sweep = sweeps(a.workers)
    sweep.to_csv(a.out / "sweep.csv")
    stars = [(f"Table 2: {r.phase} B{r.batch} {r.weights}: {p.ffn}+{p.attention}", p) for r, p in table2_points(sweep)]
    written = cost_vs_latency(sweep, a.out / "figure1_cost_vs_latency", models=MODELS, highlight=stars)
    written += layout_map(sweep, "palm-540b", a.out / "layout_map", crossovers=figure3_crossovers())
    written += breakdown(breakdown_panels(Engine()), a.out / "breakdown")
    for path in written:
        print(f"wrote {path}")
    print(f"{len(sweep.rows)} points planned in {sweep.seconds:.1f} s; all figures in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
