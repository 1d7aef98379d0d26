"""Expert layouts on 4 real gloo ranks: measured step time against the `cpu-local` prediction (issue 10).

For one tiny random Mixtral (below) on meshes 1x1x4 and 2x2x1 (`--meshes` to choose), at a decode-sized
token count (8×1) and a prefill-sized one (8×64), forward with use_cache=False:

  * experts=sliced, experts=parallel, experts=a2a (all-to-all dispatch: only members that split the batch
    qualify), experts=replicated (every rank holds and runs all experts: the
    baseline), each with the rest of the layout (member, attention) left to the planner; and the
    planner's free choice (no forced layouts; `plan.main.experts` says which it took)
  * per layout: predicted `plan.totals.latency` and the experts rows' share of it (compute split into
    FLOPs and per-call overhead, memory, communication), the measured step (emitted per rank, the
    slowest rank per run, median over runs), rank 0's logits against the unsharded model (atol 1e-4),
    parameter bytes each rank holds (its program's state_dict), collective bytes per step as executed;
    and, to tell which term of the experts rows is off, the wall time spent inside the experts ops
    (`shardwise::moe_ffn` with its routing, or the `experts_ffn` an all-to-all dispatch runs between its
    all-to-alls; slowest rank) next to their predicted max(FLOPs + calls, memory), and the
    real routing of the step (rows per expert, the busiest expert group) next to the uniform-routing
    estimate the cost model charges
  * the predicted against the measured order of the expert layouts (Spearman's rho, and simply
    "same order"), and the free choice's regret: measured(chosen) / best measured

    python -m shardwise.benchmarks.bench_experts                     # ~ a few minutes on 2 cores
    python -m shardwise.benchmarks.bench_experts --runs 5 --meshes 1x1x4     # quicker

The model: Mixtral(vocab 1024, E = 256, F = 1024, 2 layers, 8 heads / 4 KV heads, 8 experts, top-2),
13.5 M parameters, 50 MB of them (94%) in the experts, float32. Why this size: the experts dominate both
the bytes and the FLOPs (a token runs 2 of 8 experts of 3·E·F = 0.8 M weights each, against 0.2 M of
attention), so the expert layout is what the prefill measurement sees: the prefill step (512 tokens,
1024 routed rows) is compute-bound on one thread (~0.11 s unsharded), with 4× the expert FLOPs and bytes
replicated than split; the decode step (8 tokens, 16 routed rows over 8 experts) is a few small matmul
calls per expert and a read of the expert weights, where the per-call and per-collective costs decide:
the two regimes where expert-sliced (every chip runs every expert on F/4) and expert-parallel (each chip
runs its 2 experts whole on its busiest share of the rows) are priced differently. 8 experts split over
4 ranks (and over 2·2), so experts=parallel is defined on both meshes; F = 1024 splits 4 ways. Steps stay
far under a second even with 4 ranks time-sharing 2 cores.

The parent makes sure a `cpu-local` profile exists (bench_layouts' `ensure_profile`: calibrating one if
not), launches 4 workers with torchrun on 127.0.0.1 (OMP_NUM_THREADS=1), and formats the JSON rank 0
writes. The timing, checking and byte-counting machinery is bench_layouts'.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

from shardwise.benchmarks.bench_layouts import (
    average_ranks,
    check,
    ensure_profile,
    fmt_bytes,
    launch,
    parse_tokens,
    spearman,
    start_rank,
    timed_runs,
)

NPROC = 4
MESHES = "1x1x4,2x2x1"
MODES = ("sliced", "parallel", "a2a", "replicated")
CONFIG = {"vocab_size": 1024, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 2,
          "num_attention_heads": 8, "num_key_value_heads": 4, "num_local_experts": 8, "num_experts_per_tok": 2,
          "max_position_embeddings": 512}
KWARGS = {"use_cache": False}


# ------------------------------------------------------------------------------------ worker
def build_model():
    """The same random weights on every rank (seeded)."""
    import transformers

    cfg = transformers.AutoConfig.for_model("mixtral", **CONFIG)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def logits(out):
    return out.logits if hasattr(out, "logits") else out


def reference(model, ids) -> tuple[torch.Tensor, list[list[int]]]:
    """The unsharded model's logits, and the rows its routers send to each expert (per block): the real
    routing, against which the cost model's uniform-routing assumption can be read."""
    counts, hooks = [], []
    for name, mod in model.named_modules():
        if name.endswith("mlp.gate"):  # MixtralTopKRouter: (logits, scores, indices [T, k])
            hooks.append(mod.register_forward_hook(
                lambda m, a, out: counts.append(torch.bincount(out[2].flatten(), minlength=m.num_experts).tolist())))
    try:
        out = logits(model(ids, **KWARGS))
    finally:
        for h in hooks:
            h.remove()
    return out, counts


def expert_parts(plan, hw) -> dict:
    """The experts rows of a plan, summed over blocks: seconds by term (compute split into FLOPs and calls)."""
    rows = [l for l in plan.layers if l.kind == "experts"]
    out = {k: sum(l.cost.get(k, 0.0) * l.count for l in rows) for k in ("time", "compute", "memory", "comm", "flops",
                                                                          "weight_bytes", "comm_bytes")}
    out["flops_s"] = out["flops"] / (hw.peak_flops * hw.flops_efficiency)
    out["calls_s"] = max(out["compute"] - out["flops_s"], 0.0)
    out["count"] = sum(l.count for l in rows)
    out["choice"] = sorted({l.choice for l in rows})
    out["notes"] = sorted({n for l in rows for n in l.notes if "busiest chip" in n or "replicated" in n})
    return out


def held_bytes(program) -> tuple[int, int]:
    """(all, expert weights) bytes of the rank program's state_dict."""
    sd = program.program.state_dict()
    every = sum(t.numel() * t.element_size() for t in sd.values())
    experts = sum(t.numel() * t.element_size() for k, t in sd.items() if "experts" in k)
    return every, experts


class ExpertsTimer(torch.utils._python_dispatch.TorchDispatchMode):
    """Wall seconds spent inside the experts ops (`shardwise::moe_ffn`, or `experts_ffn` where an all-to-all
    dispatch calls it; their inner ops run with this mode off, so they are not slowed by it)."""

    def __init__(self):
        super().__init__()
        self.seconds = 0.0
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "experts_ffn" not in str(func) and "moe_ffn" not in str(func):
            return func(*args, **(kwargs or {}))
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def experts_runs(fn, runs: int) -> tuple[list[float], int]:
    """Per run, the slowest rank's seconds inside the experts ops of one step; and the ops per step."""
    import torch.distributed as dist

    out, calls = [], 0
    for _ in range(runs):
        timer = ExpertsTimer()
        dist.barrier()
        with timer:
            fn()
        dt = torch.tensor([timer.seconds], dtype=torch.float64)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        out.append(float(dt))
        calls = timer.calls
    return out, calls


def measure(plan, model, ids, want, rank: int, runs: int, warmup: int) -> dict:
    """Emit rank `rank`'s program, check it on rank 0, count its collectives and bytes, time it."""
    import torch.distributed as dist

    from shardwise.drivers.accounting import predicted
    from shardwise.runtime.simulate import Trace, run_recorded

    row = {"predicted_bytes": sum(predicted(plan).values())}
    with torch.no_grad():
        program = plan.emit(rank)
        out = logits(program(ids, **KWARGS))
        row["correct"], row["check"] = check(rank, out, want)
        trace = Trace()
        run_recorded(program.program, plan.program.flat_inputs((ids,), KWARGS), trace)
        row["bytes"] = sum(e.bytes for e in trace.collectives)
        row["collectives"] = len(trace.collectives)
        held = [None] * dist.get_world_size()
        dist.all_gather_object(held, held_bytes(program))
        row["held"], row["held_experts"] = [h[0] for h in held], [h[1] for h in held]
        if row["correct"]:
            row["times"] = timed_runs(lambda: program(ids, **KWARGS), runs, warmup)
            row["measured_s"] = statistics.median(row["times"])
            times, row["experts_ops"] = experts_runs(lambda: program(ids, **KWARGS), max(3, runs // 3))
            row["experts_measured_s"] = statistics.median(times)
    return row


def bench_case(model, ids, mesh: str, rank: int, runs: int, warmup: int, hw, log) -> dict:
    import shardwise
    from shardwise.errors import LayoutError, PlanError
    from shardwise.ir.plan import NotShardedWarning

    with torch.no_grad():
        want, routing = reference(model, ids) if rank == 0 else (None, None)
    rows, skipped = [], []

    def planned(layouts):
        with warnings.catch_warnings():
            if layouts == "experts=replicated":  # replicated experts are the point of the baseline
                warnings.simplefilter("ignore", NotShardedWarning)
            return shardwise.plan(model, (ids,), KWARGS, mesh=mesh, layouts=layouts, hardware="cpu-local")

    for mode in MODES:
        name = f"experts={mode}"
        try:
            plan = planned(name)
        except (LayoutError, PlanError) as e:
            skipped.append({"layout": name, "reason": str(e).splitlines()[0]})
            log(f"  {name:<20} skipped: {skipped[-1]['reason']}")
            continue
        row = {"layout": name, "mode": mode, "chosen": plan.chosen, "experts": plan.main.experts,
               "predicted_s": plan.totals.latency,
               "predicted_parts": {k: sum(l.cost.get(k, 0.0) * l.count for l in plan.layers)
                                   for k in ("compute", "memory", "comm")},
               "experts_pred": expert_parts(plan, hw)}
        row.update(measure(plan, model, ids, want, rank, runs, warmup))
        log(f"  {name:<20} {plan.chosen:<36} predicted {row['predicted_s'] * 1e3:8.2f} ms   measured "
            + (f"{row['measured_s'] * 1e3:8.2f} ms" if row["correct"] else "WRONG (" + row["check"] + ")"))
        rows.append(row)
        del plan
        gc.collect()
    free = planned(None)
    chosen = {"chosen": free.chosen, "experts": free.main.experts, "predicted_s": free.totals.latency,
              "explain": [l for l in free.explain if l.strip().startswith(f"{free.main.member}+{free.main.attention}+")
                          or l.startswith("candidates")]}
    same = [r for r in rows if r["chosen"] == free.chosen]
    if same:  # the free choice is one of the forced rows' layouts: its measurement is that row's
        chosen["row"] = same[0]["layout"]
    else:  # another member or attention split than the forced rows got: measure it too
        row = {"layout": "free choice", "mode": free.main.experts, "chosen": free.chosen,
               "experts": free.main.experts, "predicted_s": free.totals.latency,
               "predicted_parts": {k: sum(l.cost.get(k, 0.0) * l.count for l in free.layers)
                                   for k in ("compute", "memory", "comm")},
               "experts_pred": expert_parts(free, hw)}
        row.update(measure(free, model, ids, want, rank, runs, warmup))
        rows.append(row)
        chosen["row"] = row["layout"]
    log(f"  free choice: {free.chosen} (as {chosen['row']})")
    return {"mesh": mesh, "rows": rows, "skipped": skipped, "free": chosen, "routing": routing}


def worker(args) -> None:
    import torch.distributed as dist

    import shardwise

    rank, log = start_rank()

    model = build_model()
    sums = [None] * dist.get_world_size()
    dist.all_gather_object(sums, float(sum(p.double().sum() for p in model.state_dict().values())))
    if len(set(sums)) != 1:
        raise SystemExit(f"ranks built different weights: checksums {sums}")
    hw = shardwise.get_hardware("cpu-local")
    counts = [parse_tokens(args.small), parse_tokens(args.large)]
    ids_list = [torch.randint(0, CONFIG["vocab_size"], (b, l), generator=torch.Generator().manual_seed(1000 + i))
                for i, (b, l) in enumerate(counts)]
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    experts = sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if "experts" in k)
    result = {"config": CONFIG, "nproc": dist.get_world_size(), "backend": dist.get_backend(), "runs": args.runs,
              "warmup": args.warmup, "threads": torch.get_num_threads(), "model_bytes": total, "expert_bytes": experts,
              "params": sum(p.numel() for p in model.parameters()), "hardware": hw.source,
              "hw": {"peak_flops": hw.peak_flops, "hbm_bandwidth": hw.hbm_bandwidth, "link_bandwidth":
                     hw.link_bandwidth, "collective_latency": hw.collective_latency,
                     "call_overhead": hw.call_overhead}, "cases": []}
    t_start = time.perf_counter()
    for mesh in args.meshes.split(","):
        for (b, l), ids in zip(counts, ids_list):
            log(f"mesh {mesh}, batch {b} × seq {l} = {b * l} tokens")
            case = bench_case(model, ids, mesh, rank, args.runs, args.warmup, hw, log)
            case["tokens"] = [b, l]
            result["cases"].append(case)
    result["seconds"] = time.perf_counter() - t_start
    if rank == 0:
        Path(args.out).write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------ parent
def table(case: dict) -> list[str]:
    rows = case["rows"]
    head = (f"{'layout':<20} {'planned as':<34} {'pred ms':>8} {'meas ms':>8} {'q1–q3 ms':>13} {'meas/pred':>9} "
            f"{'held/rank':>10} "
            f"{'experts/rank':>12} {'coll bytes':>11} {'#coll':>5}  correct")
    lines = [head, "-" * len(head)]
    for r in rows:
        meas = f"{r['measured_s'] * 1e3:8.2f}" if r.get("measured_s") is not None else f"{'—':>8}"
        ratio = f"{r['measured_s'] / r['predicted_s']:9.2f}" if r.get("measured_s") is not None else f"{'—':>9}"
        spread = f"{'—':>13}"
        if r.get("times"):
            q = statistics.quantiles(r["times"], n=4) if len(r["times"]) > 1 else r["times"] * 3
            spread = f"{q[0] * 1e3:6.1f}–{q[2] * 1e3:<6.1f}"
        held = fmt_bytes(max(r["held"])) + ("" if len(set(r["held"])) == 1 else "*")
        lines.append(f"{r['layout']:<20} {r['chosen']:<34} {r['predicted_s'] * 1e3:8.2f} {meas} {spread:>13} {ratio} "
                     f"{held:>10} "
                     f"{fmt_bytes(max(r['held_experts'])):>12} {fmt_bytes(r['bytes']):>11} {r['collectives']:5d}  "
                     + ("yes" if r["correct"] else "NO: ") + ("" if r["correct"] else r["check"])
                     + ("" if r["bytes"] == r["predicted_bytes"] else
                        f"  (collective bytes predicted {fmt_bytes(r['predicted_bytes'])})"))
    for s in case["skipped"]:
        lines.append(f"{s['layout']:<20} skipped: {s['reason']}")
    return lines


def parts_table(case: dict) -> list[str]:
    """The experts rows' predicted times by term next to the measured time inside the experts ops, and each
    step's difference from replicated, predicted vs measured."""
    rows = [r for r in case["rows"] if r["layout"].startswith("experts=")]
    base = next((r for r in rows if r["mode"] == "replicated"), None)
    head = (f"{'layout':<20} {'FLOPs':>7} {'calls':>7} {'memory':>7} {'op pred':>8} {'op meas':>8} {'meas/pred':>9} "
            f"{'comm':>7} {'experts':>8} {'Δpred':>8} {'Δmeas':>8}")
    lines = [("experts rows, ms per step (all blocks): predicted op = max(FLOPs + calls, memory), measured op = "
              "wall time inside the experts_ffn ops"),
             ("(slowest rank, median of runs); experts = op pred + comm (the rows' predicted time); Δ: step time "
              "minus experts=replicated's"), head, "-" * len(head)]
    for r in rows:
        e = r["experts_pred"]
        op = max(e["flops_s"] + e["calls_s"], e["memory"])
        meas = r.get("experts_measured_s")
        dp = dm = ""
        if base is not None:
            dp = f"{(r['predicted_s'] - base['predicted_s']) * 1e3:+8.2f}"
            if r.get("measured_s") is not None and base.get("measured_s") is not None:
                dm = f"{(r['measured_s'] - base['measured_s']) * 1e3:+8.2f}"
        lines.append(f"{r['layout']:<20} {e['flops_s'] * 1e3:7.3f} {e['calls_s'] * 1e3:7.3f} {e['memory'] * 1e3:7.3f} "
                     f"{op * 1e3:8.3f} " + (f"{meas * 1e3:8.3f} {meas / op:9.2f} " if meas is not None else
                                             f"{'—':>8} {'—':>9} ")
                     + f"{e['comm'] * 1e3:7.3f} {e['time'] * 1e3:8.3f} {dp:>8} {dm:>8}")
    for r in rows:
        for n in r["experts_pred"]["notes"]:
            lines.append(f"  {r['mode']}: {n}")
    return lines


def routing_lines(case: dict, groups: int = NPROC) -> list[str]:
    """The real routing of the step: rows per expert, and the busiest of `groups` contiguous expert groups
    (experts=parallel's split) against the uniform-routing estimate the cost model uses."""
    from shardwise.planning.costing import expert_load

    lines = []
    for i, counts in enumerate(case.get("routing") or []):
        X, rows = len(counts), sum(counts)
        per = X // groups
        busiest = max(sum(counts[g * per:(g + 1) * per]) for g in range(groups))
        est = expert_load({"X": X}, rows, groups).rows
        lines.append(f"  routing, block {i}: rows per expert {counts}; of {groups} groups of {per} experts the busiest "
                     f"gets {busiest} of {rows} (×{busiest / (rows / groups):.2f} the mean; the cost model assumes "
                     f"{est:.1f}, ×{est / (rows / groups):.2f}); experts touched {sum(c > 0 for c in counts)} of {X}")
    return lines


def ranking(case: dict) -> list[str]:
    rows = [r for r in case["rows"] if r["layout"].startswith("experts=") and r.get("measured_s") is not None]
    lines = []
    if len(rows) < 2:
        return ["fewer than 2 expert layouts timed: no ranking"]
    pred, meas = [r["predicted_s"] for r in rows], [r["measured_s"] for r in rows]
    pr, mr = average_ranks(pred), average_ranks(meas)

    def by(vals: list[float]) -> str:
        return " < ".join(r["mode"] for _, r in sorted(zip(vals, rows), key=lambda t: t[0]))

    ties = len(set(pred)) < len(pred)
    lines.append(f"predicted order (fastest first): {by(pred)}" + ("  (predicted tie: "
                 + ", ".join(f"{r['mode']} {p:.0f}" for r, p in zip(rows, pr)) + ")" if ties else ""))
    lines.append(f"measured order  (fastest first): {by(meas)}")
    rho = spearman(pred, meas)
    lines.append(f"Spearman's rho over {len(rows)} expert layouts: {rho:+.3f}; same order: "
                 + ("yes" if pr == mr else "no" + (" (the prediction ties)" if ties else "")))
    return lines


def choice_lines(case: dict) -> list[str]:
    free = case["free"]
    timed = [r for r in case["rows"] if r.get("measured_s") is not None]
    lines = [(f"planner's free choice: {free['chosen']} (experts {free['experts']}, predicted "
              f"{free['predicted_s'] * 1e3:.2f} ms) = row {free['row']}")]
    lines += ["  " + l.strip() for l in free["explain"]]
    row = next((r for r in timed if r["layout"] == free["row"]), None)
    if row is None or not timed:
        return lines + ["  its row was not timed: no regret"]
    best = min(timed, key=lambda r: r["measured_s"])
    lines.append(f"  measured {row['measured_s'] * 1e3:.2f} ms; best measured {best['layout']} "
                 f"{best['measured_s'] * 1e3:.2f} ms → regret {row['measured_s'] / best['measured_s']:.3f}; "
                 f"the free choice is the measured fastest: {'yes' if row is best else 'no'}")
    return lines


def report(res: dict, small: str, large: str, load: str) -> None:
    cfg = res["config"]
    print("\nmodel: HF Mixtral from config (" + ", ".join(f"{k}={v}" for k, v in cfg.items()) + "), random "
          f"weights (seed 0), float32, eval, no_grad, use_cache=False; {res['params'] / 1e6:.1f} M parameters, "
          f"{fmt_bytes(res['model_bytes'])} ({fmt_bytes(res['expert_bytes'])} experts)")
    print(f"{res['nproc']} real {res['backend']} ranks (torchrun, 127.0.0.1), {res['threads']} thread per rank; "
          f"load before the run: {load}")
    h = res["hw"]
    print(f"cost model: cpu-local ({res['hardware']}): {h['peak_flops'] / 1e9:.1f} GFLOP/s, {h['hbm_bandwidth'] / 1e9:.1f}"
          f" GB/s, link {h['link_bandwidth'] / 1e6:.0f} MB/s, collective {h['collective_latency'] * 1e6:.0f} µs, "
          f"matmul call {h['call_overhead'] * 1e6:.1f} µs")
    print(f"token counts: small {small} = batch × seq, large {large}")
    print(f"timing: {res['warmup']} warm-ups, then {res['runs']} runs; each run is the max over ranks, the table "
          f"shows the median run (q1–q3: its quartiles). Shared 2-core machine: {res['nproc']} ranks time-share 2 cores.")
    print("held/rank: bytes of the rank program's state_dict (max over ranks; * = ranks differ); experts/rank: "
          "its expert weights. coll bytes: collective bytes one rank's step moves, as executed (bench_layouts' "
          "accounting).")
    for case in res["cases"]:
        b, l = case["tokens"]
        print(f"\n{'=' * 110}\nmesh {case['mesh']}, batch {b} × seq {l} = {b * l} tokens per step\n{'=' * 110}")
        print("\n".join(table(case)))
        print()
        print("\n".join(parts_table(case)))
        print("\n".join(routing_lines(case)))
        print()
        print("\n".join(ranking(case)))
        print("\n".join(choice_lines(case)))
    print(f"\nworker time {res['seconds']:.0f} s")


def main() -> None:
    from shardwise.cli import _whole  # a whole number ≥ 1, refused by argparse otherwise

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help="(internal) run as one torchrun rank")
    ap.add_argument("--out", help="(worker) where rank 0 writes its JSON")
    ap.add_argument("--json", help="also keep rank 0's JSON here")
    ap.add_argument("--small", default="8x1", help="decode-sized token count, BATCHxSEQ (default 8x1)")
    ap.add_argument("--large", default="8x64", help="prefill-sized token count, BATCHxSEQ (default 8x64)")
    ap.add_argument("--meshes", default=MESHES, help=f"comma-separated meshes of {NPROC} chips (default {MESHES})")
    ap.add_argument("--runs", type=_whole, default=15, help="timed runs (default 15)")
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    ensure_profile()
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) + " (1, 5, 15 min)"
    res, t0 = launch("bench_experts", ["--small", args.small, "--large", args.large, "--meshes", args.meshes,
                                       "--runs", str(args.runs), "--warmup", str(args.warmup)], args.json, NPROC)
    report(res, args.small, args.large, load)
    print(f"total wall time {time.perf_counter() - t0:.0f} s (launch included)")


if __name__ == "__main__":
    main()
