"""Foundation benchmarks: what the compiler pass costs, what sharding saves, what the emitted code runs at.

Three figures, each measured side by side in one run (medians and ratios: the machine is shared and noisy):

  1. capture vs our passes   palm-540b (118 layers, meta device, batch 512, seq 2048) on mesh 4x4x4:
                             torch.export capture vs each pass after it (canonicalize, find_layers,
                             assign_layouts, propagate, insert_collectives, summarize), per stage.
  2. parameter bytes         llama-tiny on mesh 1x1x4: each rank's emitted state vs the whole model,
                             and which weights stay replicated.
  3. step time on 1 chip     llama-tiny and ref-tiny on mesh 1: the emitted rank-0 program vs the
                             original model, interleaved, under torch.no_grad() and one thread.

Run:
    python -m shardwise.benchmarks.bench_foundation                # all three figures
    python -m shardwise.benchmarks.bench_foundation --skip-palm    # figures 2 and 3 only (seconds)
    python -m shardwise.benchmarks.bench_foundation --reps 3       # 3 fresh captures of palm-540b
"""

from __future__ import annotations

import argparse
import gc
import re
import statistics
import time
from collections import defaultdict
from typing import Callable

import torch
import torch.nn as nn

import shardwise
from shardwise.drivers.verify import max_abs_diff
from shardwise.ir.meta import LAYERS, PLAN
from shardwise.passes.assign_layouts import assign_layouts
from shardwise.passes.canonicalize import canonicalize
from shardwise.passes.capture import capture
from shardwise.passes.find_layers import find_layers
from shardwise.passes.insert_collectives import insert_collectives, plan_conversions
from shardwise.passes.pipeline import Pass, run_pipeline
from shardwise.passes.propagate import propagate
from shardwise.passes.storage import replicated_weights
from shardwise.passes.summarize import summarize
from shardwise.planning.program import Program
from shardwise.runtime.simulate import sim_group_name
from shardwise.strategies.request import parse_layouts


# ------------------------------------------------------------------------------------ helpers
def heading(title: str) -> None:
    print(f"\n{'=' * 100}\n{title}\n{'=' * 100}")


def timed(fn: Callable, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{n:,.0f} B"
        n /= 1024
    raise AssertionError


# ------------------------------------------------------------------------------------ figure 1
def staged_passes(gm, mesh: shardwise.Mesh, request: dict[str, str], model: str) -> tuple[dict[str, float], object]:
    """api.prepare, then the passes of a plan with the requested layouts, one stage at a time (each
    through run_pipeline, so with its lint); the cost-driven search is timed by bench_planner.py."""
    from shardwise.planning.apply import choices_for
    from shardwise.planning.candidate import Candidate
    from shardwise.strategies.family import parse_ffn

    t: dict[str, float] = {}
    gm, t["canonicalize"] = timed(run_pipeline, gm, [Pass(canonicalize)])
    gm, t["find_layers"] = timed(run_pipeline, gm, [Pass(find_layers)])
    chosen = Candidate(parse_ffn(request.get("ffn", "ws1d")), request.get("attention", "heads"), mesh)
    forced = {k: v for k, v in request.items() if k in ("embedding", "head")}
    choices = choices_for(gm.meta[LAYERS], [chosen], forced)
    gm, t["assign_layouts"] = timed(run_pipeline, gm, [Pass(assign_layouts, mesh, choices)])
    gm, t["propagate"] = timed(run_pipeline, gm, [Pass(propagate, mesh)])
    conversions, t["plan_conversions"] = timed(plan_conversions, gm, mesh)
    gm, t["insert_collectives"] = timed(run_pipeline, gm, [Pass(insert_collectives, mesh)])

    def finish():
        run_pipeline(gm, [Pass(summarize, mesh, conversions, model=model, hardware="tpu-v4", phase="prefill")])
        plan = gm.meta[PLAN]
        plan.memory.replicated = replicated_weights(gm, mesh)
        plan.program = Program(gm, mesh)
        return plan

    plan, t["summarize"] = timed(finish)
    return t, plan


def figure_capture_vs_passes(reps: int, model_name: str = "palm-540b", batch: int = 512, seq: int = 2048,
                             mesh_text: str = "4x4x4") -> None:
    heading(f"1. capture vs our passes: {model_name} (meta), batch {batch}, seq {seq}, mesh {mesh_text}, "
            f"default layouts, {reps} rep(s)")
    mesh = shardwise.Mesh.parse(mesh_text)
    request = parse_layouts("ffn=ws1d,attn=heads")
    model, build_s = timed(shardwise.models.build_model, model_name)
    args, kwargs = shardwise.models.example_inputs(model, batch, seq)
    print(f"model built on meta in {build_s:.2f} s (not counted); every rep captures afresh (passes mutate the "
          f"graph); gc.collect() before capture and before the passes, the collector stays on while timing")

    capture_s: list[float] = []
    stages: dict[str, list[float]] = defaultdict(list)
    nodes_captured = nodes_final = 0
    for _ in range(reps):
        gc.collect()  # drop the last rep's graphs first: a big live heap slows the collector inside the passes
        gm, s = timed(capture, model, args, kwargs)
        capture_s.append(s)
        nodes_captured = len(gm.graph.nodes)
        gc.collect()
        t, plan = staged_passes(gm, mesh, request, model_name)
        nodes_final = len(plan.program.gm.graph.nodes)
        for k, v in t.items():
            stages[k].append(v)
        stages["total passes"].append(sum(t.values()))
        del gm, plan

    cap = median(capture_s)

    def spread(xs: list[float]) -> str:
        return f"{min(xs):8.3f} {max(xs):8.3f}" if len(xs) > 1 else f"{'-':>8} {'-':>8}"

    print(f"\n{'stage':<22}{'median s':>10} {'min':>8} {'max':>8} {'÷ capture':>10}")
    print(f"{'capture (torch.export)':<22}{cap:>10.3f} {spread(capture_s)} {1.0:>10.3f}")
    print("-" * 62)
    for k, v in stages.items():
        if k == "total passes":
            print("-" * 62)
        print(f"{k:<22}{median(v):>10.3f} {spread(v)} {median(v) / cap:>10.3f}")
    passes = median(stages["total passes"])
    print(f"\ncaptured graph: {nodes_captured:,} nodes; after our passes: {nodes_final:,} nodes")
    print(f"ratio passes / capture = {passes:.3f} s / {cap:.3f} s = {passes / cap:.2f}")
    slowest = max((k for k in stages if k != "total passes"), key=lambda k: median(stages[k]))
    print(f"slowest pass: {slowest} ({median(stages[slowest]):.3f} s, "
          f"{median(stages[slowest]) / passes:.0%} of our passes)")


# ------------------------------------------------------------------------------------ figure 2
def state_bytes(module: nn.Module, *, dedupe: bool = False) -> int:
    tensors = list(module.state_dict().values())
    if dedupe:  # tied weights: one tensor under two names
        tensors = list({t.data_ptr(): t for t in tensors}.values())
    return sum(t.numel() * t.element_size() for t in tensors)


def group_key(state_key: str) -> str:
    """'model.layers.1.input_layernorm.weight' → 'model.layers.*.input_layernorm.weight'."""
    return re.sub(r"\.\d+\.", ".*.", state_key)


def unlisted_state(plan, model: nn.Module) -> dict[str, int]:
    """Captured state the model's state_dict does not list (bytes of the full tensor)."""
    sig, state = plan.program.sig, plan.program.state
    listed = set(model.state_dict())
    return {k: t.numel() * t.element_size() for k, t in state.items()
            if k in sig.params.values() and k not in listed and k not in sig.derived}


def figure_param_bytes(model_name: str = "llama-tiny", mesh_text: str = "1x1x4") -> None:
    heading(f"2. parameter bytes per rank vs total: {model_name}, mesh {mesh_text}, ffn=ws1d, attention by heads")
    model = shardwise.models.build_model(model_name)
    args, kwargs = shardwise.models.example_inputs(model, 8, 16)
    plan = shardwise.plan(model, args, kwargs, mesh=mesh_text, layouts="ffn=ws1d,attn=heads")
    n = plan.mesh.size
    per_rank = [state_bytes(plan.program.emit(r, group_name=sim_group_name)) for r in range(n)]
    total = state_bytes(model, dedupe=True)

    print(f"model total (state_dict, tied tensors once): {total:>10,} B  ({fmt_bytes(total)})")
    print(f"ideal 1/{n} share:                            {total / n:>10,.0f} B  (ratio {1 / n:.3f})")
    for r, b in enumerate(per_rank):
        print(f"rank {r}:                                      {b:>10,} B  (ratio {b / total:.3f}, "
              f"{b / (total / n):.2f}× the ideal share)")
    extra = per_rank[0] - total / n
    print(f"above the ideal share per rank: {extra:,.0f} B ({extra / per_rank[0]:.1%} of what a rank holds)")

    replicated = plan.memory.replicated
    groups: dict[tuple[str, int], list[float]] = defaultdict(list)
    for key, extra_b, factor in replicated:
        groups[(group_key(key), factor)].append(extra_b)
    print(f"\nreplicated weights ({len(replicated)} tensors; 'extra' = bytes per rank beyond the 1/n share):")
    print(f"  {'weights':<48}{'count':>6}{'× factor':>10}{'extra B / rank':>16}")
    for (name, factor), extras in sorted(groups.items(), key=lambda kv: -sum(kv[1])):
        print(f"  {name:<48}{len(extras):>6}{factor:>10}{sum(extras):>16,.0f}")
    rep_total = sum(e for _, e, _ in replicated)
    print(f"  {'all replicated weights':<48}{len(replicated):>6}{'':>10}{rep_total:>16,.0f}")
    unlisted = unlisted_state(plan, model)
    if unlisted:
        names = ", ".join(f"{k} ({fmt_bytes(b)})" for k, b in unlisted.items())
        print(f"\nemitted but not in the model's state_dict (non-persistent buffers lifted by capture): {names};")
        share = sum(unlisted.values()) / n
        print(f"  the model total leaves them out, so a rank's excess over the ideal share = replicated extra "
              f"{rep_total:,.0f} B + their 1/{n} share {share:,.0f} B = {rep_total + share:,.0f} B")


# ------------------------------------------------------------------------------------ figure 3
def interleaved_medians(a: Callable, b: Callable, iters: int, warmup: int) -> tuple[float, float]:
    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for _ in range(iters):
        ta.append(timed(a)[1])
        tb.append(timed(b)[1])
    return median(ta), median(tb)


def figure_step_time(configs: list[tuple[int, int]], iters: int, warmup: int,
                     models: tuple[str, ...] = ("llama-tiny", "ref-tiny")) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    heading("3. step time on 1 chip: emitted rank-0 program vs the original model (mesh 1, torch.no_grad(), "
            "torch.set_num_threads(1))")
    print(f"interleaved A (emitted), B (original), A, B, ...: {warmup} warm-up pairs, {iters} timed pairs; medians")
    print(f"\n{'model':<12}{'batch':>6}{'seq':>6}{'emitted ms':>12}{'original ms':>13}{'emitted/orig':>14}"
          f"{'max|diff|':>12}")
    try:
        for name in models:
            model = shardwise.models.build_model(name)
            for batch, seq in configs:
                args, kwargs = shardwise.models.example_inputs(model, batch, seq)
                plan = shardwise.plan(model, args, kwargs, mesh=shardwise.Mesh.parse("1"))
                program = plan.program.emit(0, group_name=sim_group_name)
                with torch.no_grad():
                    diff = max_abs_diff(program(*args, **kwargs), model(*args, **kwargs))
                    ta, tb = interleaved_medians(lambda: program(*args, **kwargs), lambda: model(*args, **kwargs),
                                                 iters, warmup)
                flag = "" if ta / tb <= 1.10 else "  > 1.10"
                print(f"{name:<12}{batch:>6}{seq:>6}{ta * 1e3:>12.3f}{tb * 1e3:>13.3f}{ta / tb:>14.3f}"
                      f"{diff:>12.1e}{flag}")
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=1, help="fresh captures of palm-540b for figure 1 (default 1)")
    ap.add_argument("--skip-palm", action="store_true", help="skip figure 1 (palm-540b capture takes seconds)")
    ap.add_argument("--iters", type=int, default=30, help="timed pairs per configuration in figure 3 (default 30)")
    ap.add_argument("--warmup", type=int, default=5, help="warm-up pairs per configuration in figure 3 (default 5)")
    opts = ap.parse_args(argv)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads by default; "
          f"timings are medians of wall-clock (time.perf_counter)")
    if not opts.skip_palm:
        figure_capture_vs_passes(max(1, opts.reps))
    figure_param_bytes()
    figure_step_time([(8, 16), (8, 128)], opts.iters, opts.warmup)


if __name__ == "__main__":
    main()
