"""Coverage: every causal-LM architecture of the installed transformers, built tiny and sharded for real.

    python -m shardwise.experiments.coverage                        # every architecture: the table, the counts
    python -m shardwise.experiments.coverage llama falcon gpt2       # some of them
    python -m shardwise.experiments.coverage --readme README.md      # also rewrite the README's table

Each architecture of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` is built with random weights from its own
default configuration shrunk by `models.presets.tiny_hf_config` (2 layers, E 64, 4 query heads and 2 KV
heads where the family groups them, F 256, vocabulary 256). On simulated ranks, for each mesh of
`MESHES` and each request of `LAYOUTS` (the layout chosen by cost, and 2D weight-stationary forced):

  numbers   the prefill logits of the sharded program equal the unsharded model's (float32, atol 1e-5:
            sharding only reorders sums over ≤ 4 ranks, a few ulps; a wrong shard is off by ≥ 1e-2)
  tokens    8 greedy tokens from sharded prefill + decode (KV cache split between steps) equal the
            unsharded greedy loop's, which itself must equal the model's own forward without a cache
  sharded   every rank holds at most 1/n of the weight bytes plus the pieces the plan names as replicated
            (`plan.memory.replicated`), and those pieces are under `MAX_REPLICATED` of the model's bytes

The verdict per architecture (`Status`): fully sharded and correct; experts replicated (a mixture of
experts whose experts run unsplit, as find_layers reports); refused with shardwise's reason (not a
decoder-only attention transformer, ...); wrong numbers or tokens; crashed (any other exception); or
not built (the tiny configuration could not be made: a limit of the generic shrinking, not of shardwise).
Each model is captured once per call shape (prefill logits, prefill step, decode step) and every plan
starts from a copy of that capture (`reused_captures`), so an architecture costs a few seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum

import torch

from .. import api
from ..drivers.generate import reference_generate
from ..errors import ShardwiseError
from ..ir.meta import LAYERS
from ..models.presets import build_hf, vocab_size
from ..models.steps import Step
from ..passes.graph_utils import copy_program
from ..passes.storage import weights
from ..planning import planner
from ..runtime.simulate import sim_group_name

MESHES = ("1x1x4", "2x2x1")
LAYOUTS = (None, "ffn=ws2d")  # chosen by cost; 2D weight-stationary forced
ATOL = 1e-5
TOKENS = 8
BATCH, SEQ = 2, 8
MAX_REPLICATED = 0.10  # of the model's weight bytes, in pieces not split over every rank
TIMEOUT_S = 300


class Status(str, Enum):
    SHARDED = "fully sharded and correct"
    EXPERTS = "experts replicated"
    REFUSED = "refused"
    WRONG = "wrong"
    CRASH = "crash"
    NOT_BUILT = "not built"


@dataclass
class Result:
    arch: str
    status: Status
    detail: str = ""  # the refusal, the error, what differs; for a pass: the layouts chosen
    seconds: float = 0.0
    replicated: float | None = None  # the largest fraction of weight bytes not split n ways, over the cases
    model: str = ""  # the class built
    flops: float | None = None  # the smallest fraction of matmul FLOPs each chip computes only part of


@dataclass
class Case:
    """One mesh × layout request of one architecture."""

    mesh: str
    layouts: str | None
    chosen: str = ""
    max_abs_diff: float = 0.0
    tokens_equal: bool = True
    held_ok: bool = True
    held: str = ""
    replicated: float = 0.0
    flops: float = 1.0
    experts: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.mesh} {self.layouts or 'by cost'}"


# ------------------------------------------------------------------------------------ one architecture
def check(arch: str, *, meshes=MESHES, layouts=LAYOUTS, tokens: int = TOKENS, timeout_s: int = TIMEOUT_S) -> Result:
    """Build `arch` tiny and run every mesh × layout case; the verdict and how long it took."""
    start = time.perf_counter()
    try:
        model = build_hf(arch)
        _runs_by_itself(model)
    except Exception as e:  # noqa: BLE001 — the generic shrinking failed for this family: not shardwise's verdict
        return Result(arch, Status.NOT_BUILT, _one_line(e), time.perf_counter() - start)
    result = Result(arch, Status.SHARDED, model=type(model).__name__)
    try:
        with reused_captures(), _deadline(timeout_s):
            result = _verdict(result, model, meshes, layouts, tokens)
    except ShardwiseError as e:
        result.status, result.detail = Status.REFUSED, _one_line(e, name=False)
    except Exception as e:  # noqa: BLE001 — anything else shardwise raised is a crash, recorded as one
        result.status, result.detail = Status.CRASH, _one_line(e, where=True)
    finally:
        # the model, its captures and programs sit in reference cycles (modules, graphs, fake tensors), and
        # the planner's search freezes the heap while it runs, so they reach the oldest generation: without a
        # full collection here, gemma4's 6 GB were still held while the next architecture built its own
        del model
        gc.collect()
    result.seconds = time.perf_counter() - start
    return result


def _verdict(result: Result, model, meshes, layouts, tokens: int) -> Result:
    vocab = vocab_size(model)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    # the model as called first (captured once, reused by the cases): what it computes decides a refusal
    api.plan(model, (ids,), {"use_cache": False}, mesh=meshes[0], layouts=layouts[-1])
    want_tokens = reference_generate(model, ids, tokens)
    own = _greedy_without_cache(model, ids, tokens)
    if not torch.equal(want_tokens, own):
        result.status = Status.WRONG
        result.detail = "the unsharded step (models/steps.Step, KV cache as inputs) disagrees with the model's own forward"
        return result
    cases = [_case(model, ids, want_tokens, mesh, request, tokens) for mesh in meshes for request in layouts]
    result.replicated = max(c.replicated for c in cases)
    result.flops = min(c.flops for c in cases)
    wrong = [c for c in cases if c.max_abs_diff > ATOL or not c.tokens_equal]
    if wrong:
        c = wrong[0]
        result.status = Status.WRONG
        result.detail = (f"{c.name}: max |sharded − unsharded| = {c.max_abs_diff:.2e}, "
                         f"tokens {'equal' if c.tokens_equal else 'differ'}")
        return result
    over = [c for c in cases if not c.held_ok or c.replicated >= MAX_REPLICATED]
    experts = sorted({e for c in cases for e in c.experts})
    if over and experts:
        result.status = Status.EXPERTS
        result.detail = f"experts run replicated: {', '.join(experts[:2])}{' …' if len(experts) > 2 else ''}"
    elif over:
        c = over[0]
        result.status = Status.WRONG
        result.detail = f"{c.name}: not sharded: {c.held or f'{c.replicated:.0%} of the weights replicated'}"
    else:
        result.detail = ", ".join(dict.fromkeys(c.chosen for c in cases))
    return result


def _case(model, ids: torch.Tensor, want_tokens: torch.Tensor, mesh: str, request: str | None, tokens: int) -> Case:
    case = Case(mesh, request)
    kwargs = {"use_cache": False}
    plan = api.plan(model, (ids,), kwargs, mesh=mesh, layouts=request)
    case.chosen = plan.chosen
    case.flops = plan.sharding.flops_fraction
    ranks = [plan.program.emit(rank, group_name=sim_group_name) for rank in range(plan.mesh.size)]
    with torch.no_grad():  # the programs whose holdings are checked below are the ones that ran
        got = plan.program.simulate((ids,), kwargs, programs=[r.program for r in ranks]).logits
        want = model(ids, **kwargs).logits
    case.max_abs_diff = (got - want).abs().max().item()
    gm = plan.program.gm
    case.experts = list(getattr(gm.meta[LAYERS], "experts", []))
    stored = weights(gm, plan.mesh)
    total = sum(s.numel * s.itemsize for s in stored)
    case.replicated = sum(s.numel * s.itemsize for s in stored if s.factor > 1) / total
    bound = plan.memory.weights_total / plan.mesh.size + sum(r.extra_bytes for r in plan.memory.replicated)
    for rank, program in enumerate(ranks):
        held = sum(t.numel() * t.element_size() for t in program.state_dict().values())
        if held > bound * (1 + 1e-9):
            case.held_ok, case.held = False, f"rank {rank} holds {held} bytes, more than 1/n + replicated = {bound:.0f}"
            break
    got_tokens = api.generate(model, ids, tokens, mesh=mesh, layouts=request, simulate=True)
    case.tokens_equal = torch.equal(got_tokens, want_tokens)
    return case


def _runs_by_itself(model) -> None:
    """The tiny model runs its own forward on token ids (else the shrunk configuration is not a model at
    all, and nothing shardwise says about it would mean much)."""
    ids = torch.zeros(1, 3, dtype=torch.long)
    with torch.no_grad():
        model(ids, use_cache=False)


def _greedy_without_cache(model, ids: torch.Tensor, tokens: int) -> torch.Tensor:
    """Greedy tokens recomputing the whole sequence every step: the model's own numbers, no cache at all."""
    with torch.no_grad():
        for _ in range(tokens):
            logits = model(ids, use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


# ------------------------------------------------------------------------------------ plumbing
@contextlib.contextmanager
def reused_captures() -> Iterator[None]:
    """Within the block, the planner captures each (module, call shape) once and plans a copy of it
    (`copy_program`: the same graph a fresh capture gives, annotated independently)."""
    original = planner.capture_program
    cache: dict = {}

    def capture_program(module, args, kwargs):
        leaves, spec = torch.utils._pytree.tree_flatten((tuple(args), dict(kwargs or {})))
        call = tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else repr(x) for x in leaves)
        key = (_identity(module), str(spec), call)
        if key not in cache:
            cache[key] = (module, original(module, args, kwargs))  # the module kept alive: its id stays unique
        return copy_program(cache[key][1])

    planner.capture_program = capture_program
    try:
        yield
    finally:
        planner.capture_program = original


def _identity(module) -> tuple:
    """What a capture of `module` depends on: the module, or for a generation step (a new `Step` wraps the
    model on every generate call) the model it wraps and how it returns logits."""
    if isinstance(module, Step):
        return type(module), id(module.model), module.last_only
    return (id(module),)


@contextlib.contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    """A TimeoutError if the block runs longer than `seconds` (main thread, POSIX)."""
    def expire(signum, frame):
        raise TimeoutError(f"took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _one_line(e: BaseException, *, name: bool = True, where: bool = False) -> str:
    text = " ".join(str(e).split())
    text = f"{type(e).__name__}: {text}" if name else text
    if where:
        frames = [f for f in traceback.extract_tb(e.__traceback__)]
        ours = [f for f in frames if "/shardwise/" in f.filename or "/main/" in f.filename] or frames
        if ours:
            f = ours[-1]
            text += f" (at {f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno})"
    return text


# ------------------------------------------------------------------------------------ the sweep
def architectures() -> list[str]:
    """Every architecture of the installed transformers' causal-LM auto mapping."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def sweep(archs: list[str] | None = None, *, progress=None, jobs: int = 1, **kw) -> list[Result]:
    """`check` every architecture (all of `architectures()` by default); with `jobs` > 1 in that many worker
    processes (one thread each), results in the order of `archs`."""
    return map_archs(check, archs, jobs=jobs, progress=progress, kw=kw,
                     died=lambda arch, why: Result(arch, Status.CRASH, why))


def map_archs(fn, archs: list[str] | None, *, jobs: int, progress, kw: dict, died) -> list:
    """`fn(arch, **kw)` for every architecture (all of `architectures()` by default), in `jobs` spawned worker
    processes when > 1 (one thread each); a worker that dies (a segfault, out of memory) gives
    `died(arch, why)`. Results in the order of `archs`; `progress` sees each as it comes."""
    _quiet()
    archs = list(archs or architectures())
    if jobs <= 1:
        results = []
        for arch in archs:
            results.append(fn(arch, **kw))
            if progress is not None:
                progress(results[-1])
        return results
    import concurrent.futures as cf
    import functools
    import multiprocessing

    done: dict = {}
    with cf.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init) as pool:
        futures = {pool.submit(functools.partial(fn, **kw), arch): arch for arch in archs}
        for f in cf.as_completed(futures):
            arch = futures[f]
            try:
                done[arch] = f.result()
            except Exception as e:  # noqa: BLE001 — the worker process itself died (a segfault, out of memory)
                done[arch] = died(arch, f"the checking process died: {_one_line(e)}")
            if progress is not None:
                progress(done[arch])
    return [done[a] for a in archs]


def _worker_init() -> None:
    torch.set_num_threads(1)
    _quiet()


def counts(results: list[Result]) -> dict[Status, int]:
    return {s: sum(r.status == s for r in results) for s in Status}


def table(results: list[Result]) -> str:
    """The plain-text table: one row per architecture, then the counts."""
    width = max([len(r.arch) for r in results] + [12])
    lines = [f"{'architecture':{width}}  {'status':26} {'time':>6} {'repl.':>6} {'flops':>6}  detail"]
    for r in results:
        lines.append(_row(r, width))
    lines.append("")
    lines.append(summary(results))
    return "\n".join(lines)


def _row(r: Result, width: int = 28) -> str:
    repl = "" if r.replicated is None else f"{r.replicated:.1%}"
    flops = "" if r.flops is None else f"{r.flops:.1%}"
    return f"{r.arch:{width}}  {r.status.value:26} {r.seconds:5.1f}s {repl:>6} {flops:>6}  {_short(r.detail)}"


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def summary(results: list[Result]) -> str:
    c = counts(results)
    dense = c[Status.SHARDED] + sum(1 for r in results if r.status in (Status.WRONG, Status.CRASH))
    share = f" ({c[Status.SHARDED] / dense:.0%} of the {dense} not refused, not MoE)" if dense else ""
    slow = sorted(results, key=lambda r: -r.seconds)[:5]
    return (f"{len(results)} architectures: " + ", ".join(f"{n} {s.value}" for s, n in c.items()) + share +
            f"; {sum(r.seconds for r in results):.0f} s in all; slowest: " +
            ", ".join(f"{r.arch} {r.seconds:.0f} s" for r in slow))


def markdown(results: list[Result]) -> str:
    """The README table: counts, then one row per architecture."""
    c = counts(results)
    lines = [f"Coverage of the installed transformers' causal-LM architectures ({len(results)}), tiny random "
             f"models on simulated ranks (meshes {', '.join(MESHES)}; layouts by cost and ffn=ws2d): "
             + ", ".join(f"**{n}** {s.value}" for s, n in c.items()) + ".", "",
             "| architecture | status | weights replicated | matmul FLOPs sharded | detail |", "|---|---|---|---|---|"]
    for r in results:
        repl = "" if r.replicated is None else f"{r.replicated:.1%}"
        flops = "" if r.flops is None else f"{r.flops:.1%}"
        detail = _short(r.detail).replace("|", "\\|")
        lines.append(f"| `{r.arch}` | {r.status.value} | {repl} | {flops} | {detail} |")
    return "\n".join(lines) + "\n"


README_START = "<!-- coverage: written by python -m shardwise.experiments.coverage --readme README.md -->"
README_END = "<!-- coverage: end -->"


def write_readme(results: list[Result], path: str) -> None:
    """Put the markdown table between the coverage markers of the README at `path` (replacing what was there)."""
    with open(path) as f:
        text = f.read()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{path} has no coverage markers: put {README_START!r} and {README_END!r} where the table goes")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    with open(path, "w") as f:
        f.write(head + README_START + "\n\n" + markdown(results) + "\n" + README_END + tail)


def recorded(path: str) -> dict[str, Status]:
    """The status of each architecture as the table between the README's coverage markers records it."""
    with open(path) as f:
        text = f.read()
    if README_START not in text:
        return {}
    section = text.split(README_START, 1)[1].split(README_END, 1)[0]
    by_value = {s.value: s for s in Status}
    out = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.split(" | ")]
        if len(cells) >= 2 and cells[0].startswith("| `") and cells[1] in by_value:
            out[cells[0].strip("| `")] = by_value[cells[1]]
    return out


def _quiet() -> None:
    """Tiny random models make transformers warn about every shortcut: keep the table readable."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("torch").setLevel(logging.CRITICAL)  # export's dumps of graphs it could not trace
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("archs", nargs="*", help="architectures to check (default: every causal-LM architecture)")
    ap.add_argument("--markdown", help="also write the table as markdown to this file")
    ap.add_argument("--readme", help="also rewrite the coverage table between the markers of this README")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (one core each)")
    ap.add_argument("--timeout", type=int, default=TIMEOUT_S, help="seconds per architecture")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    archs = args.archs or architectures()
    width = max(len(a) for a in archs)
    print(f"{'architecture':{width}}  {'status':26} {'time':>6} {'repl.':>6} {'flops':>6}  detail", flush=True)
    results = sweep(archs, progress=lambda r: print(_row(r, width), flush=True), jobs=args.jobs,
                    timeout_s=args.timeout)
    print()
    print(summary(results))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(results))
    if args.readme:
        write_readme(results, args.readme)
    return 0 if all(r.status not in (Status.WRONG, Status.CRASH) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
