"""The `shardwise` command line: inspect, verify, demo.

    shardwise inspect palm-540b --chips 64 --phase decode --batch 64 --seq 2048 --weights int8 --explain
    shardwise inspect palm-540b --mesh 4x4x4 --batch 512 --seq 2048
    shardwise inspect llama-tiny --mesh 2x2x1 --layouts ffn=ws2d,attn=batch --graph
    shardwise verify llama-tiny --mesh 1x1x4 [--nproc 4]
    shardwise inspect path/to/checkpoint --mesh 1x1x4          (a save_pretrained directory: every command)
    shardwise verify path/to/checkpoint --mesh 1x1x4 [--nproc 4]
    shardwise generate path/to/checkpoint --mesh 1x1x4 [--nproc 4] --prompt "text" (or --ids 1,2,3)
    shardwise calibrate
    shardwise demo
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from contextlib import contextmanager
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
    p.add_argument("model", help="a preset (" + ", ".join(_preset_names()) + ") or a Hugging Face checkpoint "
                                 "directory (config.json and model.safetensors, as save_pretrained writes)")
    if chips:
        where = p.add_mutually_exclusive_group(required=True)
        where.add_argument("--mesh", help="logical mesh XxYxZ, e.g. 1x1x4 or 4x4x4")
        where.add_argument("--chips", type=_whole, help="a chip count: every mesh X·Y·Z = N is searched")
    else:
        p.add_argument("--mesh", required=True, help="logical mesh XxYxZ, e.g. 1x1x4 or 4x4x4")
    p.add_argument("--layouts", default=None, help="force layouts per layer kind, e.g. ffn=ws2d,attn=batch")
    p.add_argument("--batch", type=_whole, default=8)
    p.add_argument("--seq", type=_whole, default=16)


def _ids(text: str) -> list[int]:
    """Token ids: whole numbers ≥ 0 separated by commas."""
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected token ids separated by commas, e.g. 1,2,3") from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected at least one token id, each ≥ 0")
    return ids


def _preset_names() -> list[str]:
    from .models.presets import PRESETS

    return list(PRESETS)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["inspect"]:  # from the start: building the parser imports torch (the presets' names)
        with _collector_paused():
            return _main(argv)
    return _main(argv)


def _main(argv: list[str]) -> int:
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
    p.add_argument("models", nargs="+", help="presets or checkpoint directories, e.g. palm-8b palm-540b")
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
    p.add_argument("--atol", type=_amount, default=None,
                   help="bound on |sharded − unsharded| (default 1e-5; a bf16/fp16 checkpoint: 8 ulps of the logits)")
    p.add_argument("--phase", choices=("prefill", "decode"), default="prefill",
                   help="prefill: compare logits; decode: compare --tokens greedy tokens")
    p.add_argument("--tokens", type=_whole, default=16, help="tokens to generate for --phase decode")
    p.add_argument("--bytes", action="store_true", help="compare executed collective bytes with the plan, per layer")
    p.add_argument("--collective-matmul", action="store_true",
                   help="run the looped collective matmul: rings of partial matmuls (prefill)")
    p.add_argument("--timeout", type=_amount, default=None, metavar="SECONDS",
                   help="with --nproc: how long a rank may wait for the others, or stay stopped (default 300)")
    p.add_argument("--trace", metavar="DIR", help="with --nproc: each rank's profiled step, merged with the plan's "
                                                 "predicted timeline into DIR/merged.trace.json (Perfetto)")
    p.add_argument("--hardware", default="tpu-v4", help="the profile the predicted timeline uses (cpu-local: "
                                                        "this machine, after `shardwise calibrate`)")

    p = sub.add_parser("generate", help="greedy generation with sharded prefill and decode (simulated or real ranks)")
    _common(p)
    p.add_argument("--tokens", type=_whole, default=16)
    p.add_argument("--prefill-layouts", default=None)
    p.add_argument("--decode-layouts", default=None)
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="the prompt as text (a checkpoint with a tokenizer); the output is decoded")
    prompt.add_argument("--ids", type=_ids, help="the prompt as token ids, e.g. 1,2,3 (default: --batch × --seq "
                                                 "random ids)")
    p.add_argument("--nproc", type=_whole, default=None, help="run on N real gloo ranks (worker processes on "
                                                              "loopback; a checkpoint directory's ranks read its files)")
    p.add_argument("--timeout", type=_amount, default=None, metavar="SECONDS",
                   help="with --nproc: how long a rank may wait for the others, or stay stopped (default 300)")
    p.add_argument("--check", action="store_true", help="a checkpoint: also load it whole and compare the tokens "
                                                        "with the unsharded model's (presets always are)")

    p = sub.add_parser("demo", help="plan llama-tiny for 4 ranks, run it on 4 real ranks, check the numbers")
    p.add_argument("--timeout", type=_amount, default=None, metavar="SECONDS",
                   help="how long a rank may wait for the others, or stay stopped (default 300)")

    p = sub.add_parser("calibrate", help="measure this machine and save the cpu-local hardware profile")
    p.add_argument("--ranks", type=_whole, default=4, help="gloo ranks for the collective measurements")
    p.add_argument("--quick", action="store_true",
                   help="each measurement repeated a few times only: a rough profile in a fraction of the time")

    args = parser.parse_args(argv)
    try:
        commands = {"inspect": _inspect, "verify": _verify, "demo": _demo, "calibrate": _calibrate,
                    "generate": _generate, "sweep": _sweep}
        return commands[args.command](args)
    except ShardwiseError as e:
        print(f"shardwise: error: {e}", file=sys.stderr)
        return 2


@contextmanager
def _collector_paused():
    """The cyclic garbage collector off while a plan is made: importing torch (and torch._dynamo, which
    torch.export imports), capturing and searching allocate millions of objects and free almost none,
    and the collector's walks over them were a sixth of `shardwise inspect`'s wall time (`main` pauses it
    before the parser is built, which imports torch: that import alone took about 0.2 s less without
    it). Cycles made meanwhile are collected after (or never: the `shardwise` command ends with `entry`'s
    freeze)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _inspect(a) -> int:
    with _collector_paused():
        return _inspect_paused(a)


def _inspect_paused(a) -> int:
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
    _print_assumes(a.model)
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
    _print_assumes(a.model)
    print("KV cache between the phases:")
    print("\n".join("  " + s.line() for s in pair.bridge) or "  nothing moves (same layout, or a local slice)")
    print(*pair.notes, f"planned in {time.perf_counter() - t0:.2f} s", sep="\n")
    _write_views(a, pair)
    return 0


def _print_assumes(model: str) -> None:
    """What planning a preset from one block assumes of it, where its blocks differ (models/presets.py)."""
    from .models.presets import PRESETS

    preset = PRESETS.get(model)
    if preset is not None and preset.assumes:
        print(f"note: preset {model}: {preset.assumes}")


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
                        phase=a.phase, tokens=a.tokens, bytes=a.bytes, timeout=a.timeout, trace_dir=a.trace,
                        collective_matmul=a.collective_matmul)
    print(report)
    if a.trace:
        _merge_measured(a)
    return 0 if report.ok else 1


def _print_read(read: list[int], total: int, *, simulated: bool = False, both: bool = False) -> None:
    """Bytes each rank read from the checkpoint, beside the checkpoint's size (`both`: a generation, whose
    prefill and decode programs each read their shards: each slice counted once)."""
    if simulated:  # one source shared by every simulated rank and both phases' programs
        print(f"  checkpoint bytes read by all simulated ranks (prefill and decode programs, each slice counted "
              f"once): {read[0]:,} of {total:,} B in the checkpoint")
        return
    what = " (prefill and decode programs, each slice counted once)" if both else ""
    print(f"  checkpoint bytes read per rank{what}, of {total:,} B in the checkpoint:")
    for r, b in enumerate(read):
        print(f"    rank {r}: {b:>12,} B  ({b / max(1, total):.3f} of the checkpoint)")


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
    from .models.checkpoint import Checkpoint, is_checkpoint

    if is_checkpoint(a.model):
        return _generate_checkpoint(a, Checkpoint.open(a.model))
    if a.prompt is not None:
        raise ShardwiseError(f"--prompt needs a tokenizer, and preset {a.model} has none: give token ids with --ids "
                             f"1,2,3 (or none, for random ones)")
    model = build_model(a.model)
    if a.ids is not None:
        ids = _checked_ids(a.ids, model, a.model)
    else:
        (ids,), _ = example_inputs(model, a.batch, a.seq)
    if a.nproc is not None:
        tokens = _generate_real(a, a.model, ids, state=_whole_state(model)).output
    else:
        gen = generate(model, ids, a.tokens, mesh=a.mesh, layouts=a.layouts, prefill_layouts=a.prefill_layouts,
                       decode_layouts=a.decode_layouts, simulate=True, details=True)
        tokens = gen.tokens
        print(f"prefill: {gen.prefill.chosen} ({gen.prefill.family})")
        print(f"decode:  {gen.decode.chosen} ({gen.decode.family})")
        if gen.bridge:
            print("KV cache redistributed between the phases:")
            for c in gen.bridge:
                print("  " + c.line())
        else:
            print("KV cache: the same layout in both phases (nothing to move between them)")
    same = torch.equal(tokens, reference_generate(model, ids, a.tokens))
    for b in range(min(2, ids.shape[0])):
        print(f"sequence {b}: {tokens[b, ids.shape[1]:].tolist()}")
    print(f"greedy tokens {'identical to' if same else 'DIFFER from'} the unsharded model's")
    return 0 if same else 1


def _whole_state(model) -> dict:
    """Every tensor a worker may read by its state key: parameters under every name (tied ones too) and
    buffers, persistent or not (a preset built on the meta device has none of their values)."""
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}


def _checked_ids(ids: list[int], model, name: str):
    """The prompt's ids as a [1, P] tensor, refused when an id is outside the model's vocabulary."""
    import torch

    from .models.presets import vocab_size

    vocab = vocab_size(model)
    if max(ids) >= vocab:
        raise ShardwiseError(f"token id {max(ids)} is outside the vocabulary of {name} (ids 0..{vocab - 1}): give "
                             f"ids below {vocab}, or a prompt its tokenizer encodes within the model's vocabulary")
    return torch.tensor([ids])


def _generate_real(a, name: str, ids, *, state=None, checkpoint=None):
    """Greedy generation on --nproc real ranks (the launcher's decode job: prefill, then decode steps)."""
    from .drivers.launch import run_real
    from .errors import MeshError
    from .ir.mesh import Mesh

    mesh = Mesh.parse(a.mesh)
    if a.nproc != mesh.size:
        raise MeshError(f"mesh {mesh} has {mesh.size} chips but --nproc is {a.nproc}: they must be equal")
    run = run_real(model=name, state=state, checkpoint=checkpoint, mesh=str(mesh), layouts=a.layouts, args=(ids,),
                   kwargs={}, nproc=a.nproc, phase="decode", timeout=a.timeout,
                   extra={"tokens": a.tokens, "prefill_layouts": a.prefill_layouts,
                          "decode_layouts": a.decode_layouts})
    print(f"{name} on mesh {mesh}: {a.nproc} real {run.backend} ranks, prefill and decode sharded")
    return run


def _generate_checkpoint(a, ckpt) -> int:
    """generate for a checkpoint directory: the prompt (text through its tokenizer, or ids), greedy tokens
    from sharded prefill and decode on simulated ranks or --nproc real ones, each reading its slices of
    the checkpoint's files; the decoded text when there is a tokenizer."""
    import torch

    from .drivers.generate import generate
    from .ir.mesh import Mesh
    from .models.presets import check_shape, vocab_size
    from .runtime.weights import CheckpointSource

    mesh = Mesh.parse(a.mesh)
    tok = ckpt.tokenizer()
    if a.prompt is not None:
        if tok is None:
            raise ShardwiseError(f"--prompt needs a tokenizer, and {ckpt.path} has none (no tokenizer.json, "
                                 f"tokenizer.model or tokenizer_config.json): give token ids with --ids 1,2,3, or "
                                 f"save the tokenizer into the directory (tokenizer.save_pretrained)")
        ids = tok(a.prompt, return_tensors="pt")["input_ids"]
        if ids.numel() == 0:
            raise ShardwiseError(f"--prompt {a.prompt!r} encodes to no tokens: give a longer prompt")
    source = CheckpointSource(ckpt)
    meta = source.model
    if a.prompt is None and a.ids is None:  # random ids, as for a preset
        check_shape(meta, batch=a.batch, seq=a.seq)
        ids = torch.randint(0, vocab_size(meta), (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
    else:
        ids = _checked_ids(a.ids or ids[0].tolist(), meta, ckpt.name)
    if a.nproc is not None:
        run = _generate_real(a, ckpt.name, ids, checkpoint=ckpt.path)
        tokens = run.output
    else:
        gen = generate(meta, ids, a.tokens, mesh=mesh, layouts=a.layouts, simulate=True, weights=source,
                       details=True, prefill_layouts=a.prefill_layouts, decode_layouts=a.decode_layouts)
        tokens = gen.tokens
        print(f"{ckpt.name} on mesh {mesh} (simulated ranks): prefill {gen.prefill.chosen}, decode {gen.decode.chosen}")
    P = ids.shape[1]
    for b in range(min(2, ids.shape[0])):
        print(f"sequence {b}: {tokens[b, P:].tolist()}")
        if tok is not None:
            print(f"text {b}: {tok.decode(tokens[b].tolist(), skip_special_tokens=True)}")
    if a.nproc is not None:
        print("checkpoint bytes read per rank (prefill and decode programs; each slice counted once), of "
              f"{ckpt.nbytes:,} B in the checkpoint:")
        for r, (b, once) in enumerate(zip(run.bytes_read, run.bytes_distinct)):
            print(f"  rank {r}: {once:>12,} B  ({once / max(1, ckpt.nbytes):.3f} of the checkpoint; {b:,} B read "
                  f"in all)")
    else:
        print(f"checkpoint bytes read by all {mesh.size} simulated ranks: {source.bytes_distinct:,} B (each slice "
              f"counted once) of {ckpt.nbytes:,} B in the checkpoint")
    if not a.check:
        return 0
    from .drivers.verify import greedy_agrees

    same, said = greedy_agrees(ckpt.load(), tokens, ids.shape[1])
    print(f"greedy tokens {said}")
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

    hw, path = calibrate(ranks=a.ranks, quick=a.quick)
    print(hw.to_json())
    print(f"saved to {path}; use it with --hardware cpu-local")
    return 0


def entry() -> int:
    """The `shardwise` console script: `main`, then an exit that leaves the interpreter's last garbage
    collection nothing to walk (everything torch allocated is frozen; the process ends, the OS frees it):
    about a second of every command's wall time on this machine.

    `inspect` ends without the interpreter's teardown at all (os._exit once its output is flushed):
    every file it writes is closed when written, it starts no process or thread, and tearing down the
    modules of torch and torch._dynamo one object at a time was a tenth of a second of its wall time."""
    import os

    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    if sys.argv[1:2] == ["inspect"]:  # the subcommand (argparse matches subcommand names exactly)
        os._exit(code)
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(entry())
