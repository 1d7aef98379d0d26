"""Predicted vs published for PaLM 540B on 64 TPU v4 chips (PAPER.md's four rows), one command.

Each row is planned exactly as `shardwise inspect palm-540b --chips 64 ...` plans it: the planner
searches every mesh of 64 chips and every layout, with the `tpu-v4` profile (constants fitted once by
experiments/fit_tpu_v4.py). Decode rows time one step at context 2048 + 32 (the middle of the 64
generated tokens) and report 64 steps.

    python -m shardwise.experiments.palm_table
"""

from __future__ import annotations

import time

from .. import api
from .fit_tpu_v4 import ROWS


def rows(hardware: str = "tpu-v4"):
    out = []
    for r in ROWS:
        t0 = time.perf_counter()
        plan = api.plan("palm-540b", chips=64, phase=r.phase, batch=r.batch, seq=r.seq, context=r.context,
                        weight_dtype=r.weights, hardware=hardware)
        steps = 1 if r.phase == "prefill" else 64
        out.append((r, plan, steps, time.perf_counter() - t0))
    return out


def main() -> None:
    print("PaLM 540B, 64 TPU v4 chips, context 2048: predicted by shardwise vs published (PAPER.md)\n")
    head = f"{'phase':8}{'batch':>6} {'weights':8}{'layouts chosen':34}{'mesh':7}{'latency':>11}{'published':>11}{'×':>6}{'MFU':>6}{'pub.':>6}"
    print(head)
    print("-" * len(head))
    published_mfu = {0: 0.43, 1: 0.14, 2: 0.76, 3: 0.33}
    for i, (r, plan, steps, took) in enumerate(rows()):
        total = plan.totals.latency * steps
        main = plan.main.describe()
        ok = main == f"{r.ffn} + attention by {r.attention}"
        print(f"{r.phase:8}{r.batch:6} {r.weights:8}{main:34}{str(plan.mesh):7}"
              f"{_fmt(total):>11}{_fmt(r.published * steps):>11}{total / (r.published * steps):6.2f}"
              f"{plan.totals.mfu * 100:5.0f}%{published_mfu[i] * 100:5.0f}%  {'' if ok else 'paper: ' + r.ffn + ' + ' + r.attention}")
        if len(plan.runs) > 1:
            print(f"{'':23}blocks run by run: {plan.family}")
    print("\nlatency: prefill per step; decode for 64 generated tokens. ×: predicted / published.")


def _fmt(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.1f} ms"


if __name__ == "__main__":
    main()
