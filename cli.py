"""The `shardwise` command line: inspect, verify, demo.

    shardwise inspect palm-540b --chips 64 --phase decode --batch 64 --seq 2048 --weights int8 --explain
    shardwise inspect palm-540b --mesh 4x4x4 --batch 512 --seq 2048
    shardwise inspect llama-tiny --mesh 2x2x1 --layouts ffn=ws2d,attn=batch --graph
    shardwise verify llama-tiny --mesh 1x1x4 [--nproc 4]
    shardwise calibrate
    shardwise demo
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from .errors import ShardwiseError


def _whole(text: str) -> int:
    """A whole number ≥ 1 (batch, seq, tokens, chips, ranks)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be at least 1")
    return v


def _amount(text: str) -> float:
    """A finite number ≥ 0 (a tolerance, seconds)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number ≥ 0")
    return v


def _common(p: argparse.ArgumentParser, *, chips: bool = False) -> None:
    p.add_argument("model", help="a preset: " + ", ".join(_preset_names()))
    if chips:
        where = p.add_mutually_exclusive_group(required=True)
        where.add_argument("--mesh", help="logical mesh XxYxZ, e.g. 1x1x4 or 4x4x4")
        where.add_argument("--chips", type=_whole, help="a chip count: every mesh X·Y·Z = N is searched")
    else:
        p.add_argument("--mesh", required=True, help="logical mesh XxYxZ, e.g. 1x1x4 or 4x4x4")
    p.add_argument("--layouts", default=None, help="force layouts per layer kind, e.g. ffn=ws2d,attn=batch")
    p.add_argument("--batch", type=_whole, default=8)
    p.add_argument("--seq", type=_whole, default=16)


def _preset_names() -> list[str]:
    from .models.presets import PRESETS

    return list(PRESETS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardwise", description="Sharding-aware compiler pass for PyTorch inference.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="plan a model and print the per-layer layouts, costs and collectives")
    _common(p, chips=True)
    p.add_argument("--phase", choices=("prefill", "decode", "both"), default="prefill",
                   help="prefill: --seq prompt tokens; decode: one token after --context (default --seq) tokens; "
                        "both: the two on one mesh and the KV cache moved between them")
    p.add_argument("--context", type=_whole, default=None, help="KV-cache length (default: --seq)")
    p.add_argument("--hardware", default="tpu-v4", help="tpu-v4, a100-80g, h100, h200 or cpu-local (calibrated)")
    p.add_argument("--weights", choices=("bf16", "int8", "fp32"), default=None,
                   help="weight precision (default: as the model is built; PaLM/Llama-2 presets are bf16)")
    p.add_argument("--objective", choices=("latency", "cost"), default="latency")
    p.add_argument("--overlap", action="store_true", help="let all communication overlap compute")
    p.add_argument("--explain", action="store_true", help="list every candidate, its cost and why it lost")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--graph", action="store_true", help="also print the annotated global-view graph")
    p.add_argument("--html", metavar="PATH", help="write the plan as one self-contained HTML page")
    p.add_argument("--trace", metavar="PATH",
                   help="write the predicted timeline (Chrome trace JSON: open it in ui.perfetto.dev)")
    p.add_argument("--trace-ranks", type=_whole, default=None, metavar="N", help="lanes for ranks 0..N-1 only")
    p.add_argument("--explorer", metavar="DIR", help="write Model Explorer graphs and overlays into DIR "
                                                    "(pip install 'shardwise[explorer]')")

    p = sub.add_parser("sweep", help="plan models × chips × batches × phases × weights × objectives: a table, "
                                     "a figure")
    p.add_argument("models", nargs="+", help="presets, e.g. palm-8b palm-540b")
    p.add_argument("--chips", type=_whole, nargs="+", required=True)
    p.add_argument("--batches", type=_whole, nargs="+", required=True)
    p.add_argument("--phases", nargs="+", choices=("prefill", "decode"), default=["prefill", "decode"])
    p.add_argument("--weights", nargs="+", choices=("bf16", "int8", "fp32"), default=["bf16"])
    p.add_argument("--objectives", nargs="+", choices=("latency", "cost"), default=["latency"])
    p.add_argument("--seq", type=_whole, default=2048, help="prefill tokens per sequence")
    p.add_argument("--context", type=_whole, default=2048, help="KV-cache length")
    p.add_argument("--hardware", default="tpu-v4")
    p.add_argument("--search", action="store_true", help="every mesh and layout (default: the paper's meshes and "
                                                         "layouts)")
    p.add_argument("--workers", type=_whole, default=1, help="processes to plan in")
    p.add_argument("--csv", metavar="PATH")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--figure", metavar="PATH", help="cost vs latency with each model's frontier (PATH.png, PATH.svg)")

    p = sub.add_parser("verify", help="check a plan's numbers against the unsharded model")
    _common(p)
    p.add_argument("--nproc", type=_whole, default=None, help="run on N real gloo ranks (worker processes on loopback)")
    p.add_argument("--atol", type=_amount, default=1e-5)
    p.add_argument("--phase", choices=("prefill", "decode"), default="prefill",
                   help="prefill: compare logits; decode: compare --tokens greedy tokens")
    p.add_argument("--tokens", type=_whole, default=16, help="tokens to generate for --phase decode")
    p.add_argument("--bytes", action="store_true", help="compare executed collective bytes with the plan, per layer")
    p.add_argument("--timeout", type=_amount, default=None, metavar="SECONDS",
                   help="with --nproc: how long a rank may wait for the others, or stay stopped (default 300)")
    p.add_argument("--trace", metavar="DIR", help="with --nproc: each rank's profiled step, merged with the plan's "
                                                 "predicted timeline into DIR/merged.trace.json (Perfetto)")
    p.add_argument("--hardware", default="tpu-v4", help="the profile the predicted timeline uses (cpu-local: "
                                                        "this machine, after `shardwise calibrate`)")

    p = sub.add_parser("generate", help="greedy generation with sharded prefill and decode (simulated ranks)")
    _common(p)
    p.add_argument("--tokens", type=_whole, default=16)
    p.add_argument("--prefill-layouts", default=None)
    p.add_argument("--decode-layouts", default=None)

    p = sub.add_parser("demo", help="plan llama-tiny for 4 ranks, run it on 4 real ranks, check the numbers")
    p.add_argument("--timeout", type=_amount, default=None, metavar="SECONDS",
                   help="how long a rank may wait for the others, or stay stopped (default 300)")

    p = sub.add_parser("calibrate", help="measure this machine and save the cpu-local hardware profile")
    p.add_argument("--ranks", type=_whole, default=4, help="gloo ranks for the collective measurements")

    args = parser.parse_args(argv)
    try:
        commands = {"inspect": _inspect, "verify": _verify, "demo": _demo, "calibrate": _calibrate,
                    "generate": _generate, "sweep": _sweep}
        return commands[args.command](args)
    except ShardwiseError as e:
        print(f"shardwise: error: {e}", file=sys.stderr)
        return 2


def _inspect(a) -> int:
    from . import api

    t0 = time.perf_counter()
    if a.phase == "both":
        return _inspect_both(a, t0)
    plan = api.plan(a.model, mesh=a.mesh, chips=a.chips, layouts=a.layouts, batch=a.batch,
                    seq=a.seq if a.phase == "prefill" else 1, context=a.context or (None if a.phase == "prefill" else a.seq),
                    hardware=a.hardware, phase=a.phase, weight_dtype=a.weights, objective=a.objective,
                    overlap=a.overlap)
    took = time.perf_counter() - t0
    if a.format == "json":
        print(plan.to_json())
        return 0
    print(plan.summary())
    if a.explain:
        print("\n" + "\n".join(plan.explain))
    print(f"\nplanned in {took:.2f} s")
    if a.graph:
        from .passes.report import format_graph

        print("\n" + format_graph(plan.program.gm, plan.mesh))
    _write_views(a, plan)
    return 0


def _inspect_both(a, t0: float) -> int:
    from .report.phases import plan_pair

    pair = plan_pair(a.model, mesh=a.mesh, chips=a.chips, batch=a.batch, prompt=a.seq, context=a.context,
                     hardware=a.hardware, weight_dtype=a.weights, objective=a.objective, overlap=a.overlap,
                     layouts=a.layouts)
    if a.format == "json":
        print(json.dumps({"prefill": pair.prefill.to_dict(), "decode": pair.decode.to_dict(),
                          "bridge": [{"first": s.first, "last": s.last, "line": s.record.line(), "bytes": s.bytes}
                                     for s in pair.bridge]}, indent=2))
        return 0
    for p in pair.plans:
        print(p.summary() + "\n")
    print("KV cache between the phases:")
    print("\n".join("  " + s.line() for s in pair.bridge) or "  nothing moves (same layout, or a local slice)")
    print(*pair.notes, f"planned in {time.perf_counter() - t0:.2f} s", sep="\n")
    _write_views(a, pair)
    return 0


def _write_views(a, plan_or_pair) -> None:
    """--html, --trace, --explorer: the plan (or both phases) as a page, a timeline, graph overlays."""
    plans = getattr(plan_or_pair, "plans", [plan_or_pair])
    if a.html:
        from .report.html import write_html

        print(f"report written to {write_html(plan_or_pair, a.html)}")
    if a.trace:
        from .report.trace import predicted_trace, write_trace

        for p in plans:
            path = Path(a.trace) if len(plans) == 1 else Path(a.trace).with_name(f"{p.phase}-{Path(a.trace).name}")
            ranks = None if a.trace_ranks is None else range(min(a.trace_ranks, p.mesh.size))
            print(f"predicted timeline written to {write_trace(predicted_trace(p, ranks=ranks), path)} "
                  f"(open it in ui.perfetto.dev)")
    if a.explorer:
        from .report.explorer import write_explorer

        for p in plans:
            files = write_explorer(p, Path(a.explorer) / str(p.phase) if len(plans) > 1 else a.explorer)
            print(f"Model Explorer: {files.command()}")


def _sweep(a) -> int:
    from .report.figures import cost_vs_latency
    from .report.sweep import run_sweep

    sweep = run_sweep(a.models, chips=a.chips, batches=a.batches, phases=a.phases, weights=a.weights,
                      objectives=a.objectives, seq=a.seq, context=a.context, hardware=a.hardware,
                      meshes="search" if a.search else "paper", members="all" if a.search else "paper",
                      workers=a.workers)
    for path, write in ((a.csv, sweep.to_csv), (a.json, sweep.to_json)):
        if path:
            print(f"wrote {write(path)}")
    if a.figure:
        print("wrote " + ", ".join(str(p) for p in cost_vs_latency(sweep, a.figure)))
    print(f"{len(sweep.rows)} points, {sum(r.ok for r in sweep.rows)} planned, in {sweep.seconds:.1f} s")
    for model in dict.fromkeys(r.model for r in sweep.rows):
        for phase in a.phases:
            front = sweep.frontier(model, phase)
            if front:
                print(f"{model} {phase} frontier: " + "; ".join(
                    f"{r.label} {r.latency_ms:.3g} ms {r.cost_chip_ms_per_token:.3g} chip-ms/token" for r in front))
    return 0


def _verify(a) -> int:
    from . import api

    if a.trace and not a.nproc:
        raise ShardwiseError("--trace DIR records each real rank's step: give --nproc N too")
    if a.trace:
        Path(a.trace).mkdir(parents=True, exist_ok=True)
    report = api.verify(a.model, mesh=a.mesh, layouts=a.layouts, batch=a.batch, seq=a.seq, nproc=a.nproc, atol=a.atol,
                        phase=a.phase, tokens=a.tokens, bytes=a.bytes, timeout=a.timeout, trace_dir=a.trace)
    print(report)
    if a.trace:
        _merge_measured(a)
    return 0 if report.ok else 1


def _merge_measured(a) -> None:
    """The ranks' profiled steps beside the plan's predicted lanes, in one Perfetto trace."""
    from . import api
    from .models import build_model, example_inputs
    from .report.measure import merge_traces, step_times
    from .report.trace import predicted_trace, write_trace

    model = build_model(a.model)
    args, kwargs = example_inputs(model, a.batch, a.seq)
    plan = api.plan(model, args, kwargs, mesh=a.mesh, layouts=a.layouts, hardware=a.hardware)  # the workers' call
    merged = merge_traces({r: Path(a.trace) / f"rank{r}.json" for r in range(a.nproc)}, predicted_trace(plan))
    path = write_trace(merged, Path(a.trace) / "merged.trace.json")
    print(f"measured and predicted timelines written to {path} (open it in ui.perfetto.dev)")
    for rank, t in step_times(merged).items():
        print(f"  rank {rank}: " + ", ".join(f"{k.removesuffix('_ms')} {v:.2f} ms" for k, v in t.items()))


def _generate(a) -> int:
    import torch

    from .drivers.generate import generate, reference_generate
    from .models import build_model, example_inputs

    model = build_model(a.model)
    (ids,), _ = example_inputs(model, a.batch, a.seq)
    gen = generate(model, ids, a.tokens, mesh=a.mesh, layouts=a.layouts, prefill_layouts=a.prefill_layouts,
                   decode_layouts=a.decode_layouts, simulate=True, details=True)
    same = torch.equal(gen.tokens, reference_generate(model, ids, a.tokens))
    print(f"prefill: {gen.prefill.chosen} ({gen.prefill.family})")
    print(f"decode:  {gen.decode.chosen} ({gen.decode.family})")
    if gen.bridge:
        print("KV cache redistributed between the phases:")
        for c in gen.bridge:
            print("  " + c.line())
    else:
        print("KV cache: the same layout in both phases (nothing to move between them)")
    for b in range(min(2, ids.shape[0])):
        print(f"sequence {b}: {gen.tokens[b, a.seq:].tolist()}")
    print(f"greedy tokens {'identical to' if same else 'DIFFER from'} the unsharded model's")
    return 0 if same else 1


def _demo(a) -> int:
    import torch

    from . import api
    from .drivers.launch import run_real
    from .drivers.verify import max_abs_diff, model_bytes
    from .models import build_model, example_inputs

    t0 = time.perf_counter()
    model_name, mesh, nproc = "llama-tiny", "1x1x4", 4
    model = build_model(model_name)
    args, kwargs = example_inputs(model, 8, 16)
    print(f"== 1. plan {model_name} (8 heads, 2 KV heads) for {nproc} ranks, mesh {mesh}\n")
    plan = api.plan(model, args, kwargs, mesh=mesh)
    print(plan.summary())
    print(f"\n== 2. run {nproc} real ranks (worker processes, gloo on 127.0.0.1): each captures the model on the meta "
          f"device,\n      emits its program and reads only its shards from a safetensors file")
    run = run_real(model=model_name, mesh=mesh, layouts=None, args=args, kwargs=kwargs,
                   state=plan.program.state, nproc=nproc, timeout=a.timeout)
    with torch.no_grad():
        want = model(*args, **kwargs)
    diff = max_abs_diff(run.output, want)
    total = model_bytes(model)
    print(f"\n== 3. numerics: max |sharded − unsharded| = {diff:.3e} over the logits "
          f"({'OK' if diff <= 1e-5 else 'FAILED'}, bound 1e-5 in float32)")
    print("== 4. parameter bytes each rank holds:")
    for r, b in enumerate(run.param_bytes):
        print(f"      rank {r}: {b:>9,} B  ({b / total:.3f} of the model's {total:,} B)")
    rep = plan.memory.replicated
    if rep:
        extra = sum(r[1] for r in rep)
        kinds = sorted({f"{'.'.join(key.split('.')[-2:])} ×{factor}" for key, _, factor in rep})
        print(f"      beyond 1/{nproc}: {extra:,.0f} B per rank replicated: {', '.join(kinds)}")
    print(f"\ndone in {time.perf_counter() - t0:.1f} s")
    return 0 if diff <= 1e-5 else 1


def _calibrate(a) -> int:
    from .runtime.calibrate import calibrate

    hw, path = calibrate(ranks=a.ranks)
    print(hw.to_json())
    print(f"saved to {path}; use it with --hardware cpu-local")
    return 0


if __name__ == "__main__":
    sys.exit(main())
