"""Planning time: the whole `inspect` of palm-540b and llama2-70b, each phase, capture included and excluded.

The planner captures one block of the model (a prototype) and costs every candidate layout on every
mesh of the chip count on it; the full 118-layer graph is never captured to plan. Printed per model
and phase: the prototype capture, the search, the record, and for comparison what a plain torch.export
of the full model takes on the meta device and what our passes take on that full graph (as emit needs).

Then the whole `shardwise inspect palm-540b --chips 64 --phase decode ...` command, one process per run
(python, importing torch, planning, printing): once with an empty prototype cache (the prototype captured
with torch.export, which imports torch._dynamo) and then with the prototype read from the cache
(planning/prototype_cache.py), median of 5 runs (--reps, if more). Figures only: nothing here asserts a time.

    python -m shardwise.benchmarks.bench_planner            # ~1 min
    python -m shardwise.benchmarks.bench_planner --quick    # skip the full captures
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

from shardwise.ir.hardware import get_hardware
from shardwise.models import build_model
from shardwise.models.steps import Step, phase_inputs
from shardwise.passes.capture import capture
from shardwise.planning import prototype_cache
from shardwise.planning.program import capture_program, prepare
from shardwise.planning.question import Question
from shardwise.planning.record import record
from shardwise.planning.search import choose, meshes_for
from shardwise.strategies.cost import Precision

CASES = [("palm-540b", 64, 118), ("llama2-70b", 64, 80)]
PHASES = {"prefill": dict(batch=1, seq=2048, context=2048), "decode": dict(batch=64, seq=1, context=2048)}


def timed(fn, *a, **k):
    t0 = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t0


def plan_once(name: str, chips: int, phase: str):
    """The stages of `shardwise.plan(name, chips=..., phase=...)`, timed one by one."""
    kw = PHASES[phase]
    t = {}
    (model, t["build"]) = timed(build_model, name, layers=1)
    step = Step(model, last_only=True)
    args = phase_inputs(model, phase, batch=kw["batch"], seq=kw["seq"], context=kw["context"])
    proto, t["capture one block"] = timed(capture_program, step, args, {})
    try:  # what a later plan of the same preset and shapes does instead (planning/prototype_cache.py)
        data = prototype_cache.dump(proto)
        _, t["(or: from the cache)"] = timed(prototype_cache.load, data)
    except prototype_cache.NotCacheable:  # a Hugging Face step's cache position is a symbol: not stored
        t["(or: from the cache)"] = float("nan")
    q = Question(meshes=meshes_for(chips), hw=get_hardware("tpu-v4"), precision=Precision(), phase=phase, model=name)
    n_blocks = {c[0]: c[2] for c in CASES}[name]
    (choice, results), t["search meshes × layouts"] = timed(choose, proto, q, n_blocks)
    _, t["record"] = timed(record, proto, choice, results, q, n_blocks)
    return t, choice


def full_capture_and_passes(name: str, phase: str):
    """A plain torch.export of the full model on meta, then our passes on that full graph."""
    kw = PHASES[phase]
    model = build_model(name)
    step = Step(model, last_only=True)
    args = phase_inputs(model, phase, batch=kw["batch"], seq=kw["seq"], context=kw["context"])
    gc.collect()
    gm, cap = timed(capture, step, args, {})
    from shardwise.ir.mesh import Mesh
    from shardwise.ir.meta import LAYERS
    from shardwise.planning.apply import apply, choices_for
    from shardwise.planning.candidate import Candidate
    from shardwise.strategies.family import NAMED

    def passes():
        g = prepare(gm)
        mesh = Mesh.parse("4x4x4")
        chosen = [Candidate(NAMED["ws2d"], "batch" if phase == "decode" else "heads", mesh)]
        apply(g, mesh, choices_for(g.meta[LAYERS], chosen, {}), insert=True)
        return g

    g, ours = timed(passes)
    return cap, ours, len(gm.graph.nodes)


COMMAND = ["inspect", "palm-540b", "--chips", "64", "--phase", "decode", "--batch", "64", "--seq", "1",
           "--context", "2048", "--weights", "int8"]


def whole_command(reps: int) -> None:
    """Wall seconds of the `shardwise inspect` command in fresh processes: the first with an empty prototype
    cache, then `reps` more reading it (a directory of this run: the user's cache is left alone)."""
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-planner-") as cache:
        env = {**os.environ, "SHARDWISE_CACHE": cache}

        def once() -> float:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "shardwise.cli", *COMMAND], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            return time.perf_counter() - t0

        cold = once()
        warm = [once() for _ in range(reps)]
    print(f"shardwise {' '.join(COMMAND)}")
    print(f"    whole command, prototype captured (empty cache)   {cold:7.3f} s")
    print(f"    whole command, prototype from the cache           {statistics.median(warm):7.3f} s  "
          f"(median of {reps}: {', '.join(f'{w:.2f}' for w in warm)})")
    print()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="skip the full-model captures")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    print("planning time (medians of", a.reps, "runs; this machine is shared and noisy)\n")
    whole_command(max(a.reps, 5))
    for name, chips, _ in CASES:
        for phase in PHASES:
            runs = [plan_once(name, chips, phase) for _ in range(a.reps)]
            stages = {k: statistics.median(r[0][k] for r in runs) for k in runs[0][0]}
            total = sum(v for k, v in stages.items() if not k.startswith("("))
            excl = total - stages["capture one block"] - stages["build"]
            print(f"{name} {phase:7} on {chips} chips → {runs[0][1].first.name} on {runs[0][1].mesh}")
            for k, v in stages.items():
                print(f"    {k:<26} {v:7.3f} s")
            print(f"    {'total (capture included)':<26} {total:7.3f} s   capture excluded: {excl:.3f} s")
            if not a.quick:
                cap, ours, nodes = full_capture_and_passes(name, phase)
                print(f"    full model: torch.export {cap:.2f} s ({nodes:,} nodes); our passes on it {ours:.2f} s "
                      f"= {ours / cap:.2f} of the capture")
            print()


if __name__ == "__main__":
    main()
