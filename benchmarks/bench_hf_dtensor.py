"""An HF Llama on 4 real gloo ranks: shardwise's chosen plan side by side with DTensor tensor parallelism.

transformers' LlamaForCausalLM(E = 1024, F = 4096, 4 layers, 16 heads / 4 KV heads, vocab 8192), seeded
random weights, float32, eval, no_grad; 4 gloo ranks on 127.0.0.1, one thread each; token counts 8×1,
8×32 and 8×256 (batch × seq). For each token count:

  * shardwise: `shardwise.plan(model, (ids,), {}, chips=4, hardware="cpu-local")`, the planner's own
    choice of mesh and layouts, emitted per rank; its logits checked against the unsharded model on rank 0
  * DTensor: `parallelize_module` on a 1-D mesh of the 4 ranks, ColwiseParallel on q/k/v/gate/up and
    RowwiseParallel on o/down (embedding, norms and lm_head replicated); checked the same way
  * the same plan's programs multiplying with `aten.linear` (`plan.emit(rank, cpu_kernels=False)`: torch's
    GEMM, as DTensor's modules use) instead of oneDNN's linear (runtime/kernels.py): what the layouts alone
    give, beside what the program gives
  * optionally (`--alt`), forced shardwise layouts (`ffn=ws1d,attention=heads`, ...), checked the same way
  * all of them timed interleaved, run by run (the order rotating), after warm-ups: a run is the
    slowest rank's time (bench_layouts.timed_pair), the table shows the median run and the ratio
    shardwise / DTensor, against the acceptance target (≤ 0.8× at every token count)
  * `--profile`: one profiled step of each side at the largest token count on every rank; rank 0's self
    CPU time split into matmuls, attention, collectives (issue + wait), copies and the rest

    python -m shardwise.benchmarks.bench_hf_dtensor                       # ~ 4 minutes on 2 cores
    python -m shardwise.benchmarks.bench_hf_dtensor --tokens 8x1,8x32 --runs 5
    python -m shardwise.benchmarks.bench_hf_dtensor --alt "ffn=ws1d,attention=heads;head=E" --profile --json r.json

It exits 1 when the chosen plan misses the target at some token count (or an output is wrong).
Profiled times are wall-clock per op on one rank: with 4 ranks on 2 cores they include time the rank was
descheduled, and a collective's wait includes the other ranks' lateness; compare sides, not absolutes.

F is 4096 (4·E), not Llama's usual ~8/3·E: the same F as bench_layouts' RefDecoder, so the two benchmarks'
figures compare, and the feed-forward dominates the step as it does in published Llamas.

Tolerance: the logits are compared with bench_layouts' check (atol = rtol = 1e-4). Both sides compute in
float32 and differ from the unsharded model only in summation order (row-parallel partial sums added by
an all-reduce, blocked matmuls of other widths): errors of a few float32 ulps of values of order 1, about
1e-6, which the table reports as max |diff|; 1e-4 is two orders above that and far below any real
sharding error (a missing or doubled partial sum moves logits by their own size, ~1e-1).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from .bench_layouts import (
    CollectiveCounter,
    check,
    ensure_profile,
    fmt_bytes,
    launch,
    parse_tokens,
    start_rank,
    timed_pair,
)

NPROC = 4
LLAMA = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 4, "num_attention_heads": 16,
         "num_key_value_heads": 4, "vocab_size": 8192}
TOKENS = "8x1,8x32,8x256"
TARGET = 0.8  # the acceptance item: shardwise's chosen plan ≤ 0.8× DTensor's step time
DTENSOR = "dtensor"
CHOSEN = "shardwise"
ATEN = "shardwise, aten kernels"  # the chosen plan multiplying with torch's GEMM: what the layouts alone give
# ops by the kind of work they do, for --profile (profiler event names, self CPU time)
KINDS = (
    ("collective", ("c10d", "gloo", "wait_tensor", "all_reduce", "all_gather", "reduce_scatter", "all_to_all",
                    "broadcast")),
    ("attention", ("scaled_dot_product", "flash_attention", "softmax")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "mkldnn::_linear_pointwise")),
    ("copy", ("aten::copy_", "aten::contiguous", "aten::clone", "aten::cat", "aten::_to_copy", "aten::index",
              "aten::embedding", "aten::empty_like", "aten::movedim", "aten::stack")),
)


# ------------------------------------------------------------------------------------ worker
def build_model():
    import transformers

    cfg = transformers.LlamaConfig(**LLAMA, use_cache=False, attn_implementation="sdpa", bos_token_id=0,
                                   eos_token_id=0, pad_token_id=None)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(torch.float32).eval()


def logits(out) -> torch.Tensor:
    """The logits of an HF output (a CausalLMOutputWithPast, or the tuple/dict a rank program returns)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    return out["logits"] if isinstance(out, dict) else out[0]


def parallelize_dtensor(model):
    """The standard Megatron recipe with DTensor: q/k/v/gate/up column-split, o/down row-split over 4 ranks.

    transformers 5's LlamaAttention views q/k/v as (..., -1, head_dim) and reshapes the attention output
    to (..., -1), so the local tensors carry the local heads (4 of 16, 1 of 4 KV heads: the GQA ratio is
    unchanged) with no change to the module's head counts."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = init_device_mesh("cpu", (NPROC,))
    plan = {}
    for i in range(len(model.model.layers)):
        for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[f"model.layers.{i}.{p}"] = ColwiseParallel()
        for p in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"model.layers.{i}.{p}"] = RowwiseParallel()
    return parallelize_module(model, tp, plan)


def held_bytes(tensors) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in tensors)


def profile_step(fn) -> dict:
    """One step of `fn` under torch.profiler: self CPU seconds per kind of op, the top ops, the wall time."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    dist.barrier()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    kinds: dict[str, float] = {k: 0.0 for k, _ in KINDS}
    kinds["other ops"] = 0.0
    top = []
    for e in prof.key_averages():
        s = e.self_cpu_time_total / 1e6
        kind = next((k for k, keys in KINDS if any(key in e.key for key in keys)), "other ops")
        kinds[kind] += s
        top.append((s, e.key, e.count, kind))
    in_ops = sum(kinds.values())
    kinds["outside ops (wall − Σ self, ≥ 0)"] = max(wall - in_ops, 0.0)
    top.sort(reverse=True)
    return {"wall_s": wall, "kinds_s": kinds, "in_ops_s": in_ops,
            "top": [{"op": k, "self_s": s, "calls": c, "kind": kind} for s, k, c, kind in top[:15]]}


def shardwise_side(model, ids, rank: int, layouts, want, log, *, cpu_kernels: bool = True) -> dict:
    """Plan (the planner's choice, or forced `layouts`), emit this rank's program, check it, count its bytes.
    `cpu_kernels=False`: the program multiplies with `aten.linear` (torch's GEMM, as DTensor's modules do)
    instead of runtime/kernels.py's oneDNN linear."""
    import shardwise
    from shardwise.errors import LayoutError, PlanError
    from shardwise.runtime.simulate import Trace, run_recorded

    t0 = time.perf_counter()
    try:
        plan = shardwise.plan(model, (ids,), {}, chips=NPROC, hardware="cpu-local", layouts=layouts)
    except (LayoutError, PlanError) as e:
        return {"layouts": layouts, "skipped": str(e).splitlines()[0]}
    planned = time.perf_counter() - t0
    with torch.no_grad():
        program = plan.emit(rank, cpu_kernels=cpu_kernels)
        ok, msg = check(rank, logits(program(ids)), want)
        trace = Trace()
        run_recorded(program.program, plan.program.flat_inputs((ids,), {}), trace)
    mixed = [n for layer in plan.layers if layer.kind == "note" for n in layer.notes]
    row = {"layouts": layouts, "chosen": plan.chosen, "mesh": str(plan.mesh), "member": plan.main.member,
           "attention": plan.main.attention, "predicted_s": plan.totals.latency, "plan_s": planned,
           "correct": ok, "check": msg, "bytes": sum(e.bytes for e in trace.collectives),
           "collectives": len(trace.collectives), "held_bytes": held_bytes(program.state_dict().values()),
           "notes": mixed, "layers": {y.name: y.choice for y in plan.layers if y.kind != "note"},
           "explain": plan.explain if layouts is None else None}
    kernel = "" if cpu_kernels else ", aten kernels"
    log(f"  shardwise {layouts or 'chosen'}{kernel}: {plan.chosen} on mesh {plan.mesh}, predicted "
        f"{plan.totals.latency * 1e3:.2f} ms, {'correct, ' + msg if ok else 'WRONG (' + msg + ')'}")

    def step():
        with torch.no_grad():
            program(ids)

    return {"row": row, "fn": step}


def dtensor_side(dt_model, ids, rank: int, want, log) -> dict:
    with torch.no_grad():
        ok, msg = check(rank, logits(dt_model(ids)), want)
        counter = CollectiveCounter()
        with counter:
            dt_model(ids)
    row = {"correct": ok, "check": msg, "bytes": sum(b for _, b in counter.ops), "collectives": len(counter.ops),
           "kinds": sorted({k for k, _ in counter.ops}), "other_ops": sorted(set(counter.other)),
           "held_bytes": held_bytes(dt_model.state_dict().values())}
    log(f"  DTensor TP: {'correct, ' + msg if ok else 'WRONG (' + msg + ')'}, {row['collectives']} collectives")

    def step():
        with torch.no_grad():
            dt_model(ids)

    return {"row": row, "fn": step}


def interleaved(sides: dict[str, dict], runs: int, warmup: int) -> None:
    """Time every correct side run by run in turn (bench_layouts.timed_pair): load that drifts during the
    benchmark falls on every side alike. Adds `times` and `measured_s` to each row."""
    live = [s for s in sides.values() if s["row"]["correct"]]
    for s, times in zip(live, timed_pair([s["fn"] for s in live], runs, warmup)):
        s["row"]["times"] = times
        s["row"]["measured_s"] = statistics.median(times)


def worker(args) -> None:
    import torch.distributed as dist

    from shardwise.strategies.request import parse_layouts

    rank, log = start_rank()

    model = build_model()
    dt_model = build_model()
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), dt_model.state_dict().values()))
    dt_model = parallelize_dtensor(dt_model)
    gc.collect()
    alts = [a for a in args.alt.split(";") if a.strip()] if args.alt else []
    for a in alts:
        parse_layouts(a)  # refuse a malformed request before anything is timed
    result = {"config": LLAMA, "nproc": dist.get_world_size(), "backend": dist.get_backend(), "runs": args.runs,
              "warmup": args.warmup, "threads": torch.get_num_threads(), "dtensor_same_weights": same,
              "target": TARGET, "cases": []}
    counts = [parse_tokens(t) for t in args.tokens.split(",")]
    t_start = time.perf_counter()
    for i, (b, seq) in enumerate(counts):
        ids = torch.randint(0, LLAMA["vocab_size"], (b, seq), generator=torch.Generator().manual_seed(1000 + i))
        log(f"batch {b} × seq {seq} = {b * seq} tokens")
        with torch.no_grad():
            want = logits(model(ids)) if rank == 0 else None
        sides = {CHOSEN: shardwise_side(model, ids, rank, None, want, log),
                 ATEN: shardwise_side(model, ids, rank, None, want, log, cpu_kernels=False),
                 DTENSOR: dtensor_side(dt_model, ids, rank, want, log)}
        skipped = []
        for a in alts:
            side = shardwise_side(model, ids, rank, a, want, log)
            if "skipped" in side:
                skipped.append(side)
            else:
                sides[a] = side
        interleaved(sides, args.runs, args.warmup)
        case = {"tokens": [b, seq], "rows": {name: s["row"] for name, s in sides.items()}, "skipped": skipped}
        for name, s in sides.items():
            if s["row"].get("measured_s") is not None:
                log(f"  {name:<34} {s['row']['measured_s'] * 1e3:10.2f} ms")
        if args.profile and i == len(counts) - 1:
            log("  profiling one step of each side")
            case["profile"] = {name: profile_step(s["fn"]) for name, s in sides.items() if s["row"]["correct"]}
        result["cases"].append(case)
        del sides, want
        gc.collect()
    result["seconds"] = time.perf_counter() - t_start
    if rank == 0:
        Path(args.out).write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------ parent
def report(res: dict) -> bool:
    """Print the tables; True when the chosen plan meets the target at every token count (and all checked)."""
    cfg = res["config"]
    print("\nmodel: transformers LlamaForCausalLM(" + ", ".join(f"{k}={v}" for k, v in cfg.items())
          + "), float32, eval, no_grad, seeded random weights")
    print(f"{res['nproc']} real {res['backend']} ranks (torchrun, 127.0.0.1), {res['threads']} thread per rank; "
          f"DTensor model has the same weights: {res['dtensor_same_weights']}")
    print(f"timing: interleaved; {res['warmup']} warm-ups per side, then {res['runs']} runs each; a run is the max "
          f"over ranks, the table shows the median run. A shared 2-core machine: {res['nproc']} ranks time-share "
          f"2 cores, so compare ratios, not absolute numbers.")
    print("bytes/chip: collective bytes one rank moves per step (all-gather: output, reduce-scatter / all-to-all: "
          "input, all-reduce: 2× input), as executed.\n")
    print("ratio: median(shardwise) / median(DTensor), the acceptance figure; paired: the median over runs of "
          "each run's shardwise / DTensor (the two timed back to back: steadier under a drifting load).\n")
    print("aten: the same plan's programs multiplying with aten.linear (torch's GEMM, DTensor's) instead of "
          "oneDNN (runtime/kernels.py): the ratio the layouts alone give.\n")
    head = (f"{'tokens':>8} {'shardwise ms':>13} {'DTensor ms':>11} {'ratio':>6} {'paired':>7} {'≤' + str(TARGET):>5}  "
            f"{'aten':>5}  {'sw bytes/chip':>14} {'DT bytes/chip':>14}  chosen (mesh)")
    print(head)
    print("-" * len(head))
    met = True
    for case in res["cases"]:
        b, seq = case["tokens"]
        sw, dt = case["rows"][CHOSEN], case["rows"][DTENSOR]
        if sw.get("measured_s") is None or dt.get("measured_s") is None:
            met = False
            print(f"{b}x{seq:<6} not timed: shardwise {sw['check']}; DTensor {dt['check']}")
            continue
        ratio = sw["measured_s"] / dt["measured_s"]
        met &= ratio <= TARGET
        paired = statistics.median([a / d for a, d in zip(sw["times"], dt["times"])])
        at = case["rows"].get(ATEN, {}).get("measured_s")
        at = f"{at / dt['measured_s']:5.2f}" if at else f"{'–':>5}"
        print(f"{f'{b}x{seq}':>8} {sw['measured_s'] * 1e3:13.2f} {dt['measured_s'] * 1e3:11.2f} {ratio:6.2f} "
              f"{paired:7.2f} {'yes' if ratio <= TARGET else 'NO':>5}  {at}  {fmt_bytes(sw['bytes']):>14} "
              f"{fmt_bytes(dt['bytes']):>14}  {sw['chosen']} ({sw['mesh']})")
    for case in res["cases"]:
        b, seq = case["tokens"]
        print(f"\n{'=' * 100}\nbatch {b} × seq {seq} = {b * seq} tokens per step\n{'=' * 100}")
        dt = case["rows"][DTENSOR]
        print(f"{'side':<32} {'plan (mesh)':<24} {'predicted ms':>13} {'measured ms':>12} {'/DTensor':>9} "
              f"{'bytes/chip':>13} {'held/chip':>11}  check")
        for name, r in sorted(case["rows"].items(), key=lambda kv: kv[1].get("measured_s", float("inf"))):
            label = {CHOSEN: "shardwise, planner's choice", ATEN: "  the same, aten.linear",
                     DTENSOR: "DTensor TP"}.get(name, "forced " + name)
            how = f"{r['chosen']} ({r['mesh']})" if name != DTENSOR else "Colwise/Rowwise (4)"
            pred = f"{r['predicted_s'] * 1e3:13.2f}" if "predicted_s" in r else f"{'–':>13}"
            meas = f"{r['measured_s'] * 1e3:12.2f}" if r.get("measured_s") is not None else f"{'WRONG':>12}"
            rel = (f"{r['measured_s'] / dt['measured_s']:9.2f}" if r.get("measured_s") and dt.get("measured_s")
                   else f"{'–':>9}")
            print(f"{label:<32} {how:<24} {pred} {meas} {rel} {fmt_bytes(r['bytes']):>13} "
                  f"{fmt_bytes(r['held_bytes']):>11}  {r['check']}")
        for s in case["skipped"]:
            print(f"{'forced ' + s['layouts']:<32} skipped: {s['skipped']}")
        sw = case["rows"][CHOSEN]
        print(f"planner's choice: {sw['chosen']} on mesh {sw['mesh']} (planned in {sw['plan_s']:.1f} s)"
              + (f"; {'; '.join(sw['notes'])}" if sw["notes"] else ""))
        print("  layers: " + ", ".join(f"{k}={v}" for k, v in sw["layers"].items() if ".layers." not in k
                                       or ".layers.0." in k))
        print("  DTensor: " + ", ".join(dt["kinds"]) + f", {dt['collectives']} collectives"
              + (f"; other collective ops seen: {dt['other_ops']}" if dt["other_ops"] else ""))
        for name, p in case.get("profile", {}).items():
            print(f"\n  profile, {name} (rank 0, one step, wall {p['wall_s'] * 1e3:.1f} ms; self CPU time):")
            print("    " + "  ".join(f"{k} {v * 1e3:.1f} ms" for k, v in p["kinds_s"].items()))
            for t in p["top"][:8]:
                print(f"      {t['self_s'] * 1e3:9.1f} ms  {t['calls']:5d}×  {t['kind']:<10} {t['op']}")
    print(f"\nacceptance (chosen ≤ {TARGET}× DTensor at every token count, outputs checked): "
          f"{'MET' if met else 'NOT MET'}")
    print(f"worker time {res['seconds']:.0f} s")
    return met


def main() -> None:
    from shardwise.cli import _whole  # a whole number ≥ 1, refused by argparse otherwise

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help="(internal) run as one torchrun rank")
    ap.add_argument("--out", help="(worker) where rank 0 writes its JSON")
    ap.add_argument("--json", help="also keep rank 0's JSON here")
    ap.add_argument("--tokens", default=TOKENS, help=f"token counts, BATCHxSEQ,... (default {TOKENS})")
    ap.add_argument("--alt", default="", help="forced shardwise layouts to time too, ';'-separated requests "
                    "(e.g. 'ffn=ws1d,attention=heads;ffn=ws2d,attention=heads')")
    ap.add_argument("--profile", action="store_true", help="profile one step of each side at the last token count")
    ap.add_argument("--runs", type=_whole, default=7, help="timed runs (default 7)")
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    ensure_profile()
    flags = ["--tokens", args.tokens, "--alt", args.alt, "--runs", str(args.runs), "--warmup", str(args.warmup)]
    res, t0 = launch("bench_hf_dtensor", flags + ["--profile"] * args.profile, args.json, NPROC)
    met = report(res)
    print(f"total wall time {time.perf_counter() - t0:.0f} s (launch included)")
    sys.exit(0 if met else 1)


if __name__ == "__main__":
    main()
