"""Fit TPU v4's unpublished cost-model constants, once, on PaLM 540B's four published rows.

PAPER.md gives TPU v4's peak FLOP/s, HBM size and bandwidth, and interconnect, but not what a real
program achieves. Four constants are fitted here, for the profile as a whole (never per row or model):
  flops_efficiency    the fraction of peak FLOP/s large matmuls reach
  hbm_efficiency      the fraction of HBM bandwidth weight and KV streaming reach
  collective_latency  seconds per collective, whatever its size
  hop_latency         seconds per step of a ring: a collective over g chips takes g − 1 steps
  link_efficiency     achievable fraction of the chip's 270 GB/s of links in collectives; collectives
                      are not limited by the axes they span (axis_bandwidth = None), as PAPER.md's
                      model charges every collective against one per-chip bandwidth
Method: every candidate layout of each row is costed once on the one-block prototype (FLOPs, bytes
and the collectives of the real passes do not depend on these constants); a grid over the constants
re-times the candidates, lets the planner choose per row on the paper's 4×4×4 mesh, and keeps the
constants under which all four rows choose the paper's layouts with the smallest worst latency error.
The fitted profile is then checked with the full planner (`shardwise inspect palm-540b --chips 64`),
which also searches mesh shapes: experiments/palm_table.py prints that table.

    python -m shardwise.experiments.fit_tpu_v4           # the grid and the best constants (~1 min)
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

from ..ir.hardware import TPU_V4, Hardware
from ..ir.mesh import Mesh
from ..models.presets import build_model
from ..models.steps import Step, phase_inputs
from ..planning.program import capture_program
from ..planning.search import _chain, plan_mesh
from ..strategies.cost import Precision


@dataclass(frozen=True)
class Row:
    phase: str
    batch: int
    weights: str
    published: float  # seconds per step (decode: per generated token)
    ffn: str  # the paper's feed-forward layout
    attention: str  # and attention split

    @property
    def seq(self) -> int:
        return 2048 if self.phase == "prefill" else 1

    @property
    def context(self) -> int:
        # decode generates 64 tokens after a 2048 context: time the step at the midpoint, 2048 + 32
        return 2048 if self.phase == "prefill" else 2048 + 32


ROWS = [  # PAPER.md, PaLM 540B on 64 TPU v4 chips
    Row("prefill", 1, "int8", 0.29, "2D WS", "heads"),
    Row("decode", 64, "int8", 1.82 / 64, "2D WS", "batch"),
    Row("prefill", 512, "bf16", 85.2, "WG-XYZ", "batch"),
    Row("decode", 512, "bf16", 6.0 / 64, "2D WS", "batch"),
]
N_BLOCKS = 118


def costed(row: Row, mesh: Mesh, hw: Hardware):
    """The row's candidates on `mesh`, costed once (times are recomputed per hardware below)."""
    small = build_model("palm-540b", layers=1)
    proto = capture_program(Step(small, last_only=True),
                            phase_inputs(small, row.phase, batch=row.batch, seq=row.seq, context=row.context), {})
    choice = plan_mesh(proto, mesh, hw=hw, precision=Precision(weights=row.weights), n_blocks=N_BLOCKS)
    shape = (row.batch, row.seq, small.cfg.d_model)
    return choice.candidates, shape


def predict(cands, shape, mesh: Mesh, hw: Hardware, row: Row):
    ok = []
    for c in cands:
        if c.refused:
            continue
        c = replace(c, times={k: part.times(hw) for k, part in c.parts.items()})
        ok.append(c)
    blocks, total, _ = _chain(ok, N_BLOCKS, mesh, shape, hw, Precision(weights=row.weights))
    return blocks[0], total


def matches(c, row: Row) -> bool:
    return c.run(0, 0).describe() == f"{row.ffn} + attention by {row.attention}"


def grid():
    flops = [0.7, 0.75, 0.8, 0.85, 0.9]
    hbm = [0.6, 0.7, 0.8, 0.9, 1.0]
    latency = [0.0, 2e-6, 5e-6, 10e-6]
    hop = [0.0, 0.25e-6, 0.5e-6, 1e-6, 1.5e-6]
    link = [60 / 270, 80 / 270, 100 / 270, 120 / 270, 150 / 270, 200 / 270, 1.0]
    return itertools.product(flops, hbm, latency, hop, link)


def fit(verbose: bool = True, *, data=None, rows: list[Row] = ROWS):
    """The grid point under which `rows` choose the paper's layouts with the smallest worst error."""
    mesh = Mesh.parse("4x4x4")
    base = replace(TPU_V4, axis_bandwidth=None)
    data = data or [(row, *costed(row, mesh, base)) for row in ROWS]
    fit_on = [d for d in data if d[0] in rows]
    best = None
    for f, h, lat, hop, link in grid():
        hw = replace(base, flops_efficiency=f, hbm_efficiency=h, collective_latency=lat, hop_latency=hop,
                     link_efficiency=link)
        errs, ok = [], True
        for row, cands, shape in fit_on:
            c, t = predict(cands, shape, mesh, hw, row)
            ok &= matches(c, row)
            errs.append(abs(math.log(t / row.published)))
        if ok and (best is None or max(errs) < best[0]):
            best = (max(errs), hw)
    if best is None:
        raise SystemExit("no constants in the grid make all four rows choose the paper's layouts")
    err, hw = best
    if verbose:
        print(f"best: flops_efficiency={hw.flops_efficiency} hbm_efficiency={hw.hbm_efficiency} "
              f"collective_latency={hw.collective_latency * 1e6:.1f}us hop_latency={hw.hop_latency * 1e6:.2f}us "
              f"link_efficiency={hw.link_efficiency * 270:.0f}/270 "
              f"(worst latency error ×{math.exp(err):.3f})")
        for row, cands, shape in data:
            c, t = predict(cands, shape, mesh, hw, row)
            print(f"  {row.phase:7} batch {row.batch:4} {row.weights}: {c.run(0, 0).describe():32} "
                  f"predicted {t * 1e3:10.2f} ms  published {row.published * 1e3:10.2f} ms  ×{t / row.published:.2f}")
    return hw, data


def leave_one_out(data) -> None:
    """Fit on three rows, predict the fourth: does the profile predict what it was not fitted on?"""
    mesh = Mesh.parse("4x4x4")
    print("leave one out (fit on the other three rows, predict this one):")
    for held in ROWS:
        hw, _ = fit(False, data=data, rows=[r for r in ROWS if r != held])
        row, cands, shape = next(d for d in data if d[0] == held)
        c, t = predict(cands, shape, mesh, hw, row)
        print(f"  {row.phase:7} batch {row.batch:4} {row.weights}: {c.run(0, 0).describe():32} predicted {t * 1e3:10.2f} ms "
              f"published {row.published * 1e3:10.2f} ms  ×{t / row.published:.2f}  "
              f"({'same layout' if matches(c, row) else 'DIFFERENT layout'} as the paper)")


if __name__ == "__main__":
    _, data = fit()
    leave_one_out(data)
