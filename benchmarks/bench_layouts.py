"""Every layout on 4 real gloo ranks: measured step time against the `cpu-local` prediction, and DTensor TP.

For RefDecoder(E = 1024, F = 4096, 4 layers, 16 heads, SwiGLU, RMSNorm) on mesh 2x2x1, at a small and a
large token count:

  * every distinct member of the layout family on the mesh × attention in (heads, batch): planned with
    forced layouts on `cpu-local`, emitted per rank, checked against the unsharded model on rank 0, its
    collective bytes per chip counted, and timed (a step is the slowest rank's time; median over runs)
  * each layout with and without the overlap schedule (passes/schedule.py): the scheduled and the
    unscheduled rank programs (same ops, same bytes, only their order differs; `--no-unscheduled`: only
    the scheduled one)
  * with `--looped`, each layout also as the paper's looped collective matmul (plan(..., collective_matmul=True),
    passes/collective_matmul.py): checked, bytes counted, timed, with its prediction
  * every program of every layout, and DTensor's step, timed together in rounds: each once per round, the
    order rotating from round to round, so a burst of load from the machine's other jobs falls on all of
    them alike instead of on whichever layout was being timed then (the variants of one layout share their
    weight tensors, so all stay resident)
  * the ranking the measurements give next to the one `plan.totals.latency` predicts (Spearman's rho)
  * the planner's own choice (no forced layouts) and its regret: measured(chosen) / best measured
  * the same model under DTensor tensor parallelism (parallelize_module, Colwise q/k/v/gate/up,
    Rowwise o/down on a 1-D mesh of the 4 ranks): checked, timed in the same rounds, bytes counted from
    the `_c10d_functional` collectives it runs

    python -m shardwise.benchmarks.bench_layouts                 # ~ 20 minutes on 2 cores
    python -m shardwise.benchmarks.bench_layouts --runs 3 --large 4x64    # quicker

Rounds: 15 by default (7 before). The 20 layouts at 1024 tokens lie within a few percent of each other, so the
measured ranking is itself noisy: against one profile's predictions, 15 saved runs of 5 or 7 rounds ranked at
ρ as low as 0.80 and 0.89 on medians of 3 and 5 of their rounds drawn at random, 0.90 on all of them, and
0.93 on any two runs' rounds pooled (README, `bench_layouts`).

The parent makes sure a `cpu-local` profile exists (calibrating one if not), launches 4 workers with
torchrun on 127.0.0.1 (OMP_NUM_THREADS=1), and formats the JSON rank 0 writes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

NPROC = 4
MESH = "2x2x1"
CONFIG = dict(vocab=1024, d_model=1024, d_ff=4096, n_layers=4, n_heads=16, n_kv_heads=16, activation="swiglu",
              norm="rmsnorm", max_seq=512)
ATOL = RTOL = 1e-4


# ------------------------------------------------------------------------------------ helpers
def parse_tokens(text: str) -> tuple[int, int]:
    b, _, l = text.lower().partition("x")
    return int(b), int(l)


def average_ranks(values: list[float]) -> list[float]:
    """Rank 1 = smallest; tied values share the average of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho: Pearson's correlation of the average ranks (correct with ties)."""
    ra, rb = average_ranks(a), average_ranks(b)
    n = len(ra)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    return cov / (va * vb) ** 0.5 if va and vb else float("nan")


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    raise AssertionError


# ------------------------------------------------------------------------------------ worker
def start_rank():
    """A torchrun worker's start: the process group joined (shardwise.init), one thread, and a log
    function that prints from rank 0 only, timestamped. (rank, log)."""
    import shardwise

    rank = shardwise.init()
    torch.set_num_threads(1)

    def log(msg: str) -> None:
        if rank == 0:
            print(f"[rank 0 {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    return rank, log


def build_model():
    from shardwise.models.reference import RefConfig, RefDecoder

    torch.manual_seed(0)
    return RefDecoder(RefConfig(**CONFIG)).eval()


def layouts_on(mesh):
    """Distinct (member, attention) pairs on `mesh`: members with the same atoms in the same roles once."""
    from shardwise.strategies.family import ATTENTION_MODES, all_members

    members, seen = [], set()
    for m in all_members():
        if m.key(mesh) not in seen:
            seen.add(m.key(mesh))
            members.append(m)
    return [(m, a) for m in members for a in ATTENTION_MODES]


def timed_runs(fn, runs: int, warmup: int) -> list[float]:
    """Per run, the slowest rank's seconds (every rank gets the list; rank 0 reports it)."""
    import torch.distributed as dist

    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        out.append(float(dt))
    return out


def timed_pair(fns, runs: int, warmup: int) -> list[list[float]]:
    """`timed_runs` for several programs, interleaved run by run (the order rotating), so a burst of load
    from the machine's other jobs falls on all of them alike."""
    import torch.distributed as dist

    for _ in range(warmup):
        for fn in fns:
            fn()
    out = [[] for _ in fns]
    for i in range(runs):
        for j in [(i + k) % len(fns) for k in range(len(fns))]:
            dist.barrier()
            t0 = time.perf_counter()
            fns[j]()
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            out[j].append(float(dt))
    return out


def agreed(ok: bool, message: str) -> tuple[bool, str]:
    """Rank 0's verdict on every rank (only rank 0 compares with the unsharded model)."""
    import torch.distributed as dist

    box = [(ok, message)]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check(rank: int, got, want) -> tuple[bool, str]:
    if rank != 0:
        return agreed(True, "")
    try:
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
        ok, msg = True, f"max |diff| {float((got - want).abs().max()):.2e}"
    except AssertionError as e:
        ok, msg = False, str(e).splitlines()[0] + " " + " ".join(str(e).splitlines()[1:3])
    return agreed(ok, msg)


class CollectiveCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Every `_c10d_functional` collective op dispatched while active, charged like shardwise's trace."""

    NOT_COLLECTIVES = ("wait_tensor", "_wrap_tensor_autograd")  # waits and DTensor's autograd wrapper

    def __init__(self):
        super().__init__()
        from shardwise.runtime.lower import COLLECTIVE_OPS

        self.kinds = COLLECTIVE_OPS
        self.ops: list[tuple[str, int]] = []  # (kind, bytes per chip)
        self.other: list[str] = []  # other _c10d_functional ops, neither waits nor wrappers (should be none)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from shardwise.runtime.simulate import charged_bytes

        kwargs = kwargs or {}
        if func in self.kinds:
            kind = self.kinds[func]
            group = args[1] if kind == "all_gather" else 1
            self.ops.append((kind, charged_bytes(kind, args[0], group)))
        elif "_c10d_functional" in str(func) and not any(w in str(func) for w in self.NOT_COLLECTIVES):
            self.other.append(str(func))
        return func(*args, **kwargs)


def share_weights(dst, src) -> int:
    """`dst`'s weights that are bitwise `src`'s (same name, shape, dtype, values) become `src`'s tensors:
    the variants of one layout (scheduled, unscheduled, looped: the same shards) hold one copy, so every
    layout's programs can stay resident for the interleaved timing. Bytes no longer held twice."""
    mine = {**dict(src.named_parameters()), **dict(src.named_buffers())}
    saved = 0
    for name, t in [*dst.named_parameters(), *dst.named_buffers()]:
        s = mine.get(name)
        if s is None or s is t or s.shape != t.shape or s.dtype != t.dtype or not torch.equal(s, t):
            continue
        holder, _, attr = name.rpartition(".")
        setattr(dst.get_submodule(holder) if holder else dst, attr, s)
        saved += t.numel() * t.element_size()
    return saved


def build_layout(model, ids, want, rank: int, member, attn, unscheduled: bool, looped: bool) -> tuple[dict, list]:
    """One layout planned, emitted, checked and its bytes counted: its row and the programs to time
    (scheduled first, then unscheduled and looped where asked; none when its output is wrong)."""
    import shardwise
    from shardwise.drivers.accounting import predicted
    from shardwise.ir.mesh import Mesh
    from shardwise.ir.meta import LOOP
    from shardwise.runtime.simulate import Trace, run_recorded

    mesh = Mesh.parse(MESH)
    plan = shardwise.plan(model, (ids,), {}, mesh=MESH, layouts={"ffn": member.name, "attention": attn},
                          hardware="cpu-local")
    row = {"layout": f"{member.on(mesh)}+{attn}", "member": member.name, "key": repr(member.key(mesh)),
           "attention": attn, "predicted_s": plan.totals.latency,
           "predicted_parts": {k: sum(l.cost.get(k, 0.0) * l.count for l in plan.layers)
                               for k in ("compute", "memory", "comm")},
           "predicted_bytes": sum(predicted(plan).values())}
    with torch.no_grad():
        program = plan.emit(rank)
        out = program(ids)
        row["correct"], row["check"] = check(rank, out, want)
        trace = Trace()
        run_recorded(program.program, plan.program.flat_inputs((ids,), {}), trace)
        row["bytes"] = sum(e.bytes for e in trace.collectives)
        row["collectives"] = len(trace.collectives)
        programs = [program]
        if unscheduled:
            plain = plan.emit(rank, schedule=False)
            share_weights(plain.program, program.program)
            out2 = plain(ids)
            same, _ = agreed(bool(torch.equal(out2, out)), "")  # bitwise: only the order changed
            row["unscheduled_equal"] = same
            trace2 = Trace()
            run_recorded(plain.program, plan.program.flat_inputs((ids,), {}), trace2)
            row["unscheduled_bytes"] = sum(e.bytes for e in trace2.collectives)
            programs.append(plain)
        if looped:  # the same layout with collective_matmul: its own prediction, numbers, bytes and time
            lplan = shardwise.plan(model, (ids,), {}, mesh=MESH, hardware="cpu-local", collective_matmul=True,
                                   layouts={"ffn": member.name, "attention": attn})
            lprog = lplan.emit(rank)
            share_weights(lprog.program, program.program)
            row["looped_predicted_s"] = lplan.totals.latency
            row["looped_correct"], row["looped_check"] = check(rank, lprog(ids), want)
            trace3 = Trace()
            run_recorded(lprog.program, lplan.program.flat_inputs((ids,), {}), trace3)
            row["looped_bytes"] = sum(e.bytes for e in trace3.collectives)
            row["looped_steps"] = sum(1 for n in lprog.program.graph.nodes if LOOP in n.meta)  # ring steps
            programs.append(lprog)
    return row, programs if row["correct"] else []


def bench_shardwise(model, ids, rank: int, runs: int, warmup: int, log, unscheduled: bool = True,
                    looped: bool = False, others: dict | None = None) -> dict:
    """Every layout built and checked first, all its programs kept; then all of them (and `others`: name →
    step function, e.g. DTensor's) timed together in rounds, each program once per round, the order
    rotating (`timed_pair`). A program measured in a block of its own would carry whatever load the
    machine's other jobs put on that block; in rounds a slow minute falls on every layout alike, so the
    ranking the measurements give is the layouts', not the minutes'."""
    import shardwise
    from shardwise.errors import LayoutError, PlanError
    from shardwise.ir.mesh import Mesh
    from shardwise.strategies.family import parse_ffn

    mesh = Mesh.parse(MESH)
    with torch.no_grad():
        want = model(ids) if rank == 0 else None
    rows, skipped, timed = [], [], []  # timed: (row, its programs)
    for member, attn in layouts_on(mesh):
        try:
            row, programs = build_layout(model, ids, want, rank, member, attn, unscheduled, looped)
        except (LayoutError, PlanError) as e:
            skipped.append({"layout": f"{member.on(mesh)}+{attn}", "reason": str(e).splitlines()[0]})
            continue
        log(f"  {row['layout']:<18} predicted {row['predicted_s'] * 1e3:9.2f} ms   "
            + ("checked" if row["correct"] else "WRONG (" + row["check"] + ")"))
        rows.append(row)
        if programs:
            timed.append((row, programs))
    others = others or {}
    fns = [lambda f=f: f(ids) for _, programs in timed for f in programs] + list(others.values())
    log(f"  timing {len(fns)} programs in {runs} rounds (after {warmup} warm-up rounds)")
    with torch.no_grad():
        times = iter(timed_pair(fns, runs, warmup))
    for row, programs in timed:
        variants = [("times", "measured_s")] + [("unscheduled_times", "unscheduled_s")] * unscheduled \
            + [("looped_times", "looped_s")] * looped  # in the order build_layout returned the programs
        for runs_key, median_key in variants:
            row[runs_key] = next(times)
            row[median_key] = statistics.median(row[runs_key])
        log(f"  {row['layout']:<18} predicted {row['predicted_s'] * 1e3:9.2f} ms   measured "
            f"{row['measured_s'] * 1e3:9.2f} ms"
            + (f"   unscheduled {row['unscheduled_s'] * 1e3:9.2f} ms" if row.get("unscheduled_s") else "")
            + (f"   looped {row['looped_s'] * 1e3:9.2f} ms (predicted {row['looped_predicted_s'] * 1e3:.2f})"
               if row.get("looped_s") else ""))
    other_times = {name: next(times) for name in others}
    del timed, fns
    gc.collect()
    free = shardwise.plan(model, (ids,), {}, mesh=MESH, hardware="cpu-local")
    member_name, attn = free.main.member, free.main.attention
    key = repr(parse_ffn(member_name).key(mesh))
    match = [r for r in rows if r["key"] == key and r["attention"] == attn]
    mixed = [n for l in free.layers if l.kind == "note" for n in l.notes]
    return {"rows": rows, "skipped": skipped, "chosen": free.chosen,
            "chosen_row": match[0]["layout"] if match else None, "chosen_predicted_s": free.totals.latency,
            "chosen_notes": mixed, "explain": free.explain, "other_times": other_times}


def dtensor_model(rank: int, reference):
    """The model under DTensor tensor parallelism (Colwise q/k/v/gate/up, Rowwise o/down on a 1-D mesh of
    the ranks; embedding, norms and head replicated), whether its weights are the reference's, and the
    bytes a rank holds."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = build_model()
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    tp = init_device_mesh("cpu", (NPROC,))
    plan = {}
    for i in range(len(model.blocks)):
        for p in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[f"blocks.{i}.{p}"] = ColwiseParallel()
        for p in ("attn.o_proj", "mlp.down_proj"):
            plan[f"blocks.{i}.{p}"] = RowwiseParallel()
    model = parallelize_module(model, tp, plan)
    held = sum(t.to_local().numel() * t.element_size() if hasattr(t, "to_local") else t.numel() * t.element_size()
               for t in model.state_dict().values())
    return model, same, held


def dtensor_row(model, ids, rank: int, reference, same: bool, held: int, log) -> dict:
    """DTensor's step checked against the reference and its collectives counted (timed with the layouts)."""
    from torch.distributed.tensor.debug import CommDebugMode

    with torch.no_grad():
        want = reference(ids) if rank == 0 else None
        ok, msg = check(rank, model(ids), want)
        counter = CollectiveCounter()
        with counter:
            model(ids)
        debug = CommDebugMode()
        with debug:
            model(ids)
    row = {"tokens": list(ids.shape), "correct": ok, "check": msg, "same_weights": same, "held_bytes": held,
           "bytes": sum(b for _, b in counter.ops), "collectives": len(counter.ops),
           "kinds": sorted({k for k, _ in counter.ops}), "other_ops": sorted(set(counter.other)),
           "commdebug_count": debug.get_total_counts()}
    log(f"  DTensor TP {tuple(ids.shape)}: " + (f"checked, {row['collectives']} collectives "
        f"({row['commdebug_count']} by CommDebugMode)" if ok else "WRONG (" + msg + ")"))
    return row


def worker(args) -> None:
    import torch.distributed as dist

    rank, log = start_rank()

    model = build_model()
    counts = [parse_tokens(args.small), parse_tokens(args.large)]
    ids_list = [torch.randint(0, CONFIG["vocab"], (b, l), generator=torch.Generator().manual_seed(1000 + i))
                for i, (b, l) in enumerate(counts)]
    result = {"config": CONFIG, "mesh": MESH, "nproc": dist.get_world_size(), "backend": dist.get_backend(),
              "runs": args.runs, "warmup": args.warmup, "threads": torch.get_num_threads(), "cases": []}
    t_start = time.perf_counter()
    dt_model, same, held = dtensor_model(rank, model)
    for (b, l), ids in zip(counts, ids_list):
        log(f"shardwise layouts and DTensor TP at batch {b} × seq {l} = {b * l} tokens")
        dt = dtensor_row(dt_model, ids, rank, model, same, held, log)
        others = {"dtensor": lambda ids=ids: dt_model(ids)} if dt["correct"] else {}
        case = bench_shardwise(model, ids, rank, args.runs, args.warmup, log, not args.no_unscheduled, args.looped,
                               others)
        if dt["correct"]:
            dt["times"] = case["other_times"]["dtensor"]
            dt["measured_s"] = statistics.median(dt["times"])
            log(f"  DTensor TP {tuple(ids.shape)}: {dt['measured_s'] * 1e3:.2f} ms")
        case["dtensor"] = dt
        case["tokens"] = [b, l]
        result["cases"].append(case)
    result["seconds"] = time.perf_counter() - t_start
    if rank == 0:
        Path(args.out).write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def ensure_profile():
    import shardwise
    from shardwise.errors import ShardwiseError
    from shardwise.ir.hardware import cpu_local_path

    try:
        hw = shardwise.get_hardware("cpu-local")
        print(f"cpu-local profile: read from {cpu_local_path()} ({hw.source})")
    except ShardwiseError:
        from shardwise.runtime.calibrate import calibrate

        print(f"cpu-local profile: none at {cpu_local_path()}; calibrating on {NPROC} ranks ...", flush=True)
        hw, path = calibrate(ranks=NPROC)
        print(f"cpu-local profile: measured now, saved to {path} ({hw.source})")
    print(f"  peak {hw.peak_flops / 1e9:.1f} GFLOP/s, memory {hw.hbm_bandwidth / 1e9:.1f} GB/s, link "
          f"{hw.link_bandwidth / 1e6:.0f} MB/s, collective latency {hw.collective_latency * 1e6:.0f} µs"
          + (f", elementwise {hw.elementwise_bandwidth / 1e9:.1f} GB/s" if hw.elementwise_bandwidth else "")
          + (f", matmuls by shape {min(f for *_, f in hw.matmul_shapes) / 1e9:.1f}–"
             f"{max(f for *_, f in hw.matmul_shapes) / 1e9:.1f} GFLOP/s" if hw.matmul_shapes else ""))
    return hw


def table(case: dict) -> list[str]:
    rows = case["rows"]
    timed = [r for r in rows if r.get("measured_s") is not None]
    pr = dict(zip((r["layout"] for r in timed), average_ranks([r["predicted_s"] for r in timed])))
    mr = dict(zip((r["layout"] for r in timed), average_ranks([r["measured_s"] for r in timed])))
    head = (f"{'layout':<18} {'predicted ms':>13} {'measured ms':>12} {'unsched ms':>11} {'sched/un':>9} "
            f"{'bytes/chip':>13} {'pred rank':>10} {'meas rank':>10} {'meas/pred':>10}")
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: r.get("measured_s", float("inf"))):
        if r.get("measured_s") is None:
            lines.append(f"{r['layout']:<18} {r['predicted_s'] * 1e3:13.2f} {'WRONG':>12} {'':>11} {'':>9} "
                         f"{fmt_bytes(r['bytes']):>13}   not timed: {r['check']}")
            continue
        un = r.get("unscheduled_s")
        lines.append(f"{r['layout']:<18} {r['predicted_s'] * 1e3:13.2f} {r['measured_s'] * 1e3:12.2f} "
                     + (f"{un * 1e3:11.2f} {r['measured_s'] / un:9.3f} " if un else f"{'-':>11} {'-':>9} ")
                     + f"{fmt_bytes(r['bytes']):>13} {pr[r['layout']]:10.1f} {mr[r['layout']]:10.1f} "
                     f"{r['measured_s'] / r['predicted_s']:10.2f}")
    for s in case["skipped"]:
        lines.append(f"{s['layout']:<18} skipped: {s['reason']}")
    return lines


def report(res: dict, small: str, large: str) -> None:
    cfg = res["config"]
    print("\nmodel: RefDecoder(" + ", ".join(f"{k}={v}" for k, v in cfg.items()) + "), float32, eval, no_grad")
    print(f"mesh {res['mesh']} on {res['nproc']} real {res['backend']} ranks (torchrun, 127.0.0.1), "
          f"{res['threads']} thread per rank")
    print(f"token counts: small {small} = batch × seq, large {large}")
    print(f"timing: {res['warmup']} warm-up rounds, then {res['runs']} rounds; a round runs every program once (all "
          f"layouts and their variants, and DTensor), the order rotating; each run is the max over ranks (a step "
          f"ends when the slowest rank ends), the table shows the median run. This is a shared 2-core machine: "
          f"{res['nproc']} ranks time-share 2 cores, so compare ratios, not absolute numbers.")
    print("bytes/chip: collective bytes one rank's step moves (all-gather: output, reduce-scatter / all-to-all: "
          "input, all-reduce: 2× input), as executed.")
    print("rank 1 = fastest; ties share the average rank.")
    for case in res["cases"]:
        b, l = case["tokens"]
        print(f"\n{'=' * 96}\nbatch {b} × seq {l} = {b * l} tokens per step\n{'=' * 96}")
        print("\n".join(table(case)))
        timed = [r for r in case["rows"] if r.get("measured_s") is not None]
        rho = spearman([r["predicted_s"] for r in timed], [r["measured_s"] for r in timed])
        print(f"\nSpearman's rho (predicted vs measured step time, {len(timed)} layouts): {rho:+.3f}")
        paired = [r for r in timed if r.get("unscheduled_s")]
        if paired:
            ratios = sorted(r["measured_s"] / r["unscheduled_s"] for r in paired)
            print(f"overlap schedule: scheduled / unscheduled step time over {len(paired)} layouts: median "
                  f"{statistics.median(ratios):.3f} (min {ratios[0]:.3f}, max {ratios[-1]:.3f}); "
                  + ("outputs bitwise equal" if all(r.get("unscheduled_equal") for r in paired) else
                     "outputs DIFFER for " + ", ".join(r["layout"] for r in paired if not r.get("unscheduled_equal")))
                  + "; " + ("bytes unchanged" if all(r["unscheduled_bytes"] == r["bytes"] for r in paired) else
                            "bytes CHANGED for " + ", ".join(r["layout"] for r in paired
                                                             if r["unscheduled_bytes"] != r["bytes"])))
        loops = [r for r in timed if r.get("looped_s")]
        if loops:
            meas = sorted(r["looped_s"] / r["measured_s"] for r in loops)
            pred = sorted(r["looped_predicted_s"] / r["predicted_s"] for r in loops)
            print(f"looped collective matmul (collective_matmul=True) / scheduled over {len(loops)} layouts "
                  f"({sum(1 for r in loops if r.get('looped_steps'))} with loops): measured median "
                  f"{statistics.median(meas):.3f} (min {meas[0]:.3f}, max {meas[-1]:.3f}), predicted median "
                  f"{statistics.median(pred):.3f} (min {pred[0]:.3f}, max {pred[-1]:.3f})")
            bad = [r["layout"] for r in loops if not r["looped_correct"] or r["looped_bytes"] != r["bytes"]]
            print("  looped outputs checked against the model and bytes equal to unlooped for every layout" if not bad
                  else f"  looped WRONG or bytes differ for: {', '.join(bad)}")
        best = min(timed, key=lambda r: r["measured_s"])
        mism = [r["layout"] for r in case["rows"] if r["predicted_bytes"] != r["bytes"]]
        print("bytes/chip as executed equal the plan's prediction for every layout" if not mism else
              f"bytes/chip as executed DIFFER from the plan's prediction for: {', '.join(mism)}")
        chosen = next((r for r in timed if r["layout"] == case["chosen_row"]), None)
        print(f"planner's choice (no forced layouts): {case['chosen']}  (predicted "
              f"{case['chosen_predicted_s'] * 1e3:.2f} ms)" + (f"; {'; '.join(case['chosen_notes'])}"
                                                                if case["chosen_notes"] else ""))
        if chosen is None:
            print("  its layout has no timed row: no regret")
        else:
            regret = chosen["measured_s"] / best["measured_s"]
            print(f"  measured {chosen['measured_s'] * 1e3:.2f} ms as {chosen['layout']}; best measured "
                  f"{best['layout']} {best['measured_s'] * 1e3:.2f} ms → regret {regret:.3f}")
        d = case["dtensor"]
        print("\nDTensor tensor parallelism (parallelize_module on a 1-D mesh of 4: Colwise q/k/v/gate/up, "
              "Rowwise o/down; embedding, norms, lm_head replicated)")
        if not d["correct"]:
            print(f"  WRONG output, not timed: {d['check']}")
            continue
        print(f"  measured {d['measured_s'] * 1e3:.2f} ms, {fmt_bytes(d['bytes'])}/chip in {d['collectives']} "
              f"collectives ({', '.join(d['kinds'])}; CommDebugMode counts {d['commdebug_count']})"
              + (f"; other collective ops seen: {d['other_ops']}" if d["other_ops"] else ""))
        for what, row in (("shardwise chosen", chosen), ("best shardwise", best)):
            if row is None:
                continue
            ratio = f" ({d['bytes'] / row['bytes']:.2f}×)" if row["bytes"] else ""
            print(f"  DTensor / {what} ({row['layout']}): time {d['measured_s'] / row['measured_s']:.2f}×, "
                  f"bytes/chip {fmt_bytes(d['bytes'])} vs {fmt_bytes(row['bytes'])}{ratio}")
    print(f"\nworker time {res['seconds']:.0f} s")


def launch(module: str, worker_args: list[str], json_path: str | None, nproc: int = NPROC) -> tuple[dict, float]:
    """Run benchmark `module`'s worker on `nproc` torchrun ranks on 127.0.0.1, one thread each: (rank 0's JSON
    result, the perf_counter when the launch began). Exits with a message when the ranks fail. `json_path`:
    keep the JSON there too."""
    from shardwise.runtime.distributed import free_port

    with tempfile.TemporaryDirectory(prefix="shardwise-bench-") as tmp:
        out = Path(json_path or Path(tmp) / "result.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "-m", f"shardwise.benchmarks.{module}", "--worker", "--out", str(out), *worker_args]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        print(f"launching {nproc} ranks: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, check=False)
        if proc.returncode != 0 or not out.exists():
            sys.exit(f"the {nproc} ranks failed (exit {proc.returncode}); see their output above")
        return json.loads(out.read_text()), t0


def main() -> None:
    from shardwise.cli import _whole  # a whole number ≥ 1, refused by argparse otherwise

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help="(internal) run as one torchrun rank")
    ap.add_argument("--out", help="(worker) where rank 0 writes its JSON")
    ap.add_argument("--json", help="also keep rank 0's JSON here")
    ap.add_argument("--small", default="4x8", help="small token count, BATCHxSEQ (default 4x8)")
    ap.add_argument("--large", default="8x128", help="large token count, BATCHxSEQ (default 8x128)")
    ap.add_argument("--runs", type=_whole, default=15, help="timed runs (default 15)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-unscheduled", action="store_true",
                    help="time only the scheduled programs (default: also each layout without the overlap schedule)")
    ap.add_argument("--looped", action="store_true",
                    help="also time each layout as looped collective matmuls (plan(..., collective_matmul=True))")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    ensure_profile()
    flags = ["--small", args.small, "--large", args.large, "--runs", str(args.runs), "--warmup", str(args.warmup)]
    flags += ["--no-unscheduled"] * args.no_unscheduled + ["--looped"] * args.looped
    res, t0 = launch("bench_layouts", flags, args.json)
    report(res, args.small, args.large)
    print(f"total wall time {time.perf_counter() - t0:.0f} s (launch included)")


if __name__ == "__main__":
    main()
