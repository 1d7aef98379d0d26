"""int8 weights on 4 real gloo ranks: a decode step's time, the weight bytes each rank holds, the logits' error.

transformers' LlamaForCausalLM (bench_hf_dtensor's: E = 1024, F = 4096, 4 layers, 16 heads / 4 KV heads,
vocab 8192), seeded random weights, eval; 4 gloo ranks on 127.0.0.1, one thread each; mesh 1x1x4, each
phase's layouts chosen by the planner on cpu-local. A side is one `shardwise.generate` call on the real
ranks: a prefill of batch × prompt tokens, then STEPS decode steps of one token per sequence. Four sides:

  * float32: the model as it is, and the same with `weight_dtype="int8"` (the rank programs hold the
    projections' weights as int8 with per-output-row scales; float32 activations multiply the shard
    converted to float32, runtime/quantize.py)
  * bfloat16: the model cast to bfloat16, and the same with int8 weights (bfloat16 activations of fewer than
    16 rows multiply with torch's int8-weight kernel, `_weight_int8pack_mm`: a decode step's 8 rows do)

Per side: the decode step's time (`Generation.step_s`, each step the slowest rank's; the median over
rounds × steps), the bytes each rank's decode program holds (all of its state; and its projection weights,
which int8 holds as int8 + one float scale per output row), and the logits' largest error. The sides run
round by round, the order rotating, so the machine's other load falls on all of them alike.

Checked, on rank 0: every new token's logits against the unsharded model those numbers must equal, run on
the whole generated sequence at once (teacher-forced, so a bfloat16 argmax that flips cannot hide an error):
a float side against the model itself, an int8 side against the dequantized model (`dequantized_model`:
each weight the programs hold as int8 replaced by q · s), |got − want| ≤ atol + rtol · |want| everywhere.
float32: atol = rtol = 1e-4 (bench_layouts' check: the sharded and unsharded runs differ only in summation
order, ~1e-6 on logits of order 1). bfloat16: rtol 1.6e-2 (torch's own for bfloat16: two roundings of its
8 significant bits) and atol 0.1, both runs computing in bfloat16 and rounding at different places (the
partial sums of a split contraction, added by a collective) through 4 layers: measured up to 4e-2 and
5.5e-2 on these logits of order 1-10. A missing or doubled partial sum moves logits by their own size. Against
the float model, int8 moves the logits by what quantization does, reported beside.

    python -m shardwise.benchmarks.bench_int8                    # ~ 4 minutes on 2 cores
    python -m shardwise.benchmarks.bench_int8 --rounds 3 --json r.json

It exits 1 when a side's logits are wrong.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from .bench_hf_dtensor import LLAMA, NPROC, build_model
from .bench_layouts import agreed, ensure_profile, fmt_bytes, launch, start_rank

MESH = "1x1x4"
BATCH, PROMPT, STEPS = 8, 32, 8
SIDES = (("float32", None), ("float32", "int8"), ("bfloat16", None), ("bfloat16", "int8"))
TOLERANCE = {"float32": (1e-4, 1e-4), "bfloat16": (0.1, 1.6e-2)}  # (atol, rtol), the docstring says why


def side_name(dtype: str, weights: str | None) -> str:
    return f"{dtype}, {'int8' if weights else dtype} weights"


# ------------------------------------------------------------------------------------ worker
def held(program) -> tuple[dict[str, int], list[str]]:
    """(bytes of each tensor of a rank program's state, the names of those it holds as int8: each with its
    scales under name + "_scale")."""
    state = program.state_dict()
    return {k: t.nbytes for k, t in state.items()}, sorted(k for k, t in state.items() if t.dtype == torch.int8)


def checked_side(model, ids, rank: int, dtype: str, weights: str | None, log) -> dict:
    """Generate once on the real ranks; rank 0 checks every new token's logits; every rank's program bytes."""
    import torch.distributed as dist

    import shardwise
    from shardwise.passes.emit import dequantized_model
    from shardwise.runtime.simulate import sim_group_name

    gen = shardwise.generate(model, ids, 1 + STEPS, mesh=MESH, hardware="cpu-local", weight_dtype=weights,
                             details=True)
    ok, msg, err, drift = True, "", None, None
    if rank == 0:
        ref = dequantized_model(model, gen.decode.program.gm)[0] if weights else model
        with torch.no_grad():
            want = ref(gen.tokens[:, :-1]).logits[:, PROMPT - 1:].float()
            floating = model(gen.tokens[:, :-1]).logits[:, PROMPT - 1:].float()
        got = torch.stack(gen.logits, 1).float()
        atol, rtol = TOLERANCE[dtype]
        err = float((got - want).abs().max())
        drift = float((got - floating).abs().max())
        ok = bool(((got - want).abs() <= atol + rtol * want.abs()).all()) and bool(torch.isfinite(got).all())
        msg = (f"max |diff| {err:.2e} (atol {atol:g}, rtol {rtol:g})" if ok
               else f"WRONG: max |diff| {err:.2e}, beyond atol {atol:g} + rtol {rtol:g} · |logit|")
    ok, msg = agreed(ok, msg)
    boxes = [None] * dist.get_world_size()
    dist.all_gather_object(boxes, held(gen.decode.program.emit(rank, group_name=sim_group_name).program))
    log(f"  {side_name(dtype, weights)}: decode {gen.decode.chosen} on {gen.decode.mesh}, {msg}")
    return {"side": side_name(dtype, weights), "dtype": dtype, "weights": weights or dtype, "correct": ok,
            "check": msg, "max_diff": err, "vs_float_model": drift, "decode_layout": gen.decode.chosen,
            "prefill_layout": gen.prefill.chosen, "sizes": [b[0] for b in boxes], "int8_names": [b[1] for b in boxes]}


def slowest(seconds: list[float]) -> list[float]:
    """Each step's time, the slowest rank's (a step ends when the last rank ends)."""
    import torch.distributed as dist

    t = torch.tensor(seconds, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def worker(args) -> None:
    import torch.distributed as dist

    import shardwise

    rank, log = start_rank()
    models = {"float32": build_model(), "bfloat16": build_model().to(torch.bfloat16)}
    ids = torch.randint(0, LLAMA["vocab_size"], (BATCH, PROMPT), generator=torch.Generator().manual_seed(7))
    log(f"batch {BATCH} × prompt {PROMPT}, then {STEPS} decode steps, mesh {MESH}")
    rows = [checked_side(models[d], ids, rank, d, w, log) for d, w in SIDES]
    live = [i for i, r in enumerate(rows) if r["correct"]]
    for r in rows:
        r["decode_s"], r["prefill_s"] = [], []
    t0 = time.perf_counter()
    for n in range(args.rounds):
        for i in [live[(n + k) % len(live)] for k in range(len(live))]:
            d, w = SIDES[i]
            dist.barrier()
            gen = shardwise.generate(models[d], ids, 1 + STEPS, mesh=MESH, hardware="cpu-local", weight_dtype=w,
                                     details=True)
            rows[i]["decode_s"] += slowest(gen.step_s["decode"])
            rows[i]["prefill_s"] += slowest(gen.step_s["prefill"])
        log(f"  round {n + 1} of {args.rounds} timed")
    if rank == 0:
        Path(args.out).write_text(json.dumps({"config": LLAMA, "mesh": MESH, "batch": BATCH, "prompt": PROMPT,
                                              "steps": STEPS, "rounds": args.rounds, "nproc": NPROC,
                                              "threads": torch.get_num_threads(), "backend": dist.get_backend(),
                                              "seconds": time.perf_counter() - t0, "rows": rows}, indent=1))
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------ parent
def projection_bytes(row: dict, twin: dict, rank: int) -> int:
    """Bytes of the projection weights `twin` (the int8 side of the same dtype) holds as int8, as `row` holds
    them: int8 + scales, or the float tensors of the same names."""
    sizes, names = row["sizes"][rank], twin["int8_names"][rank]
    return sum(sizes[k] + sizes.get(k + "_scale", 0) for k in names)


def report(res: dict) -> bool:
    """Print the table; True when every side's logits were right."""
    rows = res["rows"]
    print(f"\nmodel: transformers LlamaForCausalLM({', '.join(f'{k}={v}' for k, v in res['config'].items())}), "
          f"seeded random weights, eval")
    print(f"{res['nproc']} real {res['backend']} ranks (127.0.0.1), {res['threads']} thread each, mesh {res['mesh']}; "
          f"batch {res['batch']} × prompt {res['prompt']}, then {res['steps']} decode steps; {res['rounds']} rounds, "
          f"the sides' order rotating; a step is the slowest rank's, the table shows the median step. A shared "
          f"2-core machine: compare ratios.")
    print("bytes: what each rank's decode program holds (min–max over ranks): all of its state, and its "
          "projection weights (int8: + one scale per output row)\n")
    head = (f"{'side':<30} {'decode ms':>10} {'/ float':>8} {'prefill ms':>11} {'held / rank':>19} "
            f"{'projections / rank':>21} {'/ float':>8}  logits")
    print(head)
    print("-" * len(head))
    ok = True
    for i, r in enumerate(rows):
        base, twin = rows[i - i % 2], rows[i - i % 2 + 1]
        ok &= r["correct"]
        if not r["decode_s"]:
            print(f"{r['side']:<30} not timed: {r['check']}")
            continue
        dec, pre = statistics.median(r["decode_s"]), statistics.median(r["prefill_s"])
        rel = dec / statistics.median(base["decode_s"]) if base["decode_s"] else float("nan")
        every = [sum(s.values()) for s in r["sizes"]]
        proj = [projection_bytes(r, twin, k) for k in range(len(r["sizes"]))]
        proj_base = [projection_bytes(base, twin, k) for k in range(len(r["sizes"]))]
        shrink = max(p / b for p, b in zip(proj, proj_base))
        span = (lambda v: f"{fmt_bytes(min(v))}–{fmt_bytes(max(v))}" if min(v) != max(v) else fmt_bytes(v[0]))
        drift = f"; vs the float model {r['vs_float_model']:.2e}" if r["weights"] == "int8" else ""
        print(f"{r['side']:<30} {dec * 1e3:10.2f} {rel:8.2f} {pre * 1e3:11.2f} {span(every):>19} {span(proj):>21} "
              f"{shrink:8.3f}  {r['check']}{drift}")
    print("\nlayouts (planner's choice on cpu-local): " + "; ".join(
        f"{r['side']}: prefill {r['prefill_layout']}, decode {r['decode_layout']}" for r in rows))
    print(f"\nlogits: {'all checked' if ok else 'SOME WRONG'}; worker time {res['seconds']:.0f} s (timing)")
    return ok


def main() -> None:
    from shardwise.cli import _whole  # a whole number ≥ 1, refused by argparse otherwise

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help="(internal) run as one torchrun rank")
    ap.add_argument("--out", help="(worker) where rank 0 writes its JSON")
    ap.add_argument("--json", help="also keep rank 0's JSON here")
    ap.add_argument("--rounds", type=_whole, default=5, help="timed rounds, each side once a round (default 5)")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    ensure_profile()
    res, t0 = launch("bench_int8", ["--rounds", str(args.rounds)], args.json, NPROC)
    ok = report(res)
    print(f"total wall time {time.perf_counter() - t0:.0f} s (launch included)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
