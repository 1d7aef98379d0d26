"""Every expert layout × mesh on every mixture-of-experts architecture of the installed transformers (issue 10).

    python -m shardwise.experiments.moe_matrix                              # every MoE architecture found
    python -m shardwise.experiments.moe_matrix --archs mixtral,olmoe        # some of them
    python -m shardwise.experiments.moe_matrix --jobs 2 --markdown docs/moe_matrix.md

The architectures are found, not listed: each of `coverage.architectures()` is built tiny with random
weights (`models.presets.build_hf`, as the coverage sweep builds it) and planned once (prefill, mesh
1x1x4, layouts by cost); those whose plan has at least one layer of kind "experts" are the mixtures of
experts. One that cannot be built, or that shardwise refuses whole, is not a candidate (as in the coverage
table, where its reason is recorded); the summary names the ones of those that look like mixtures.

Each MoE architecture then runs every expert layout of `LAYOUTS` (`experts=sliced`: each expert's F split
over every chip; `experts=parallel`: the experts split over the longest prefix of the chips that divides
them, F over the rest; `experts=a2a`: the tokens split over the batch chips of a weight-gathered member
(`A2A_MEMBER`), the experts over the same chips, routed rows moved by all-to-all) on every mesh of
`MESHES`, all ranks simulated in this process. A case is ok when:

  layout    every experts layer of the plan runs the layout asked for (its choice ends in ":parallel"
            or ":a2a" exactly when that was asked)
  numbers   the prefill logits of the sharded program equal the unsharded model's within atol 1e-5 in
            float32. The router runs replicated on its input gathered whole, so every rank picks the
            unsharded model's experts bit for bit; what differs is only the order of the float sums over F,
            over the experts and over the heads (partial sums added by the reductions of ≤ 8 ranks): a few
            ulps of logits of size ~1. A wrong shard, a bias added twice or a flipped routing is off by
            far more than 1e-5
  tokens    8 greedy tokens from sharded prefill + decode (the KV cache kept sharded between steps) equal
            the unsharded greedy loop's (`reference_generate`)
  bytes     the collective bytes every layer executed equal the plan's prediction exactly
            (`drivers.accounting.compare`): the prefill of the logits call, the generation's prefill step
            and each of its decode steps on its own (the runner's trace is cut per step)
  held      every rank program holds exactly 1/n of the stacked expert weights' bytes (the 3-D [X, ., .]
            weights of the experts layers; the router, the biases and a shared expert are not counted)

A case refused by shardwise (a ShardwiseError, LayoutError included) is recorded as "refused" with its
reason (of a refusal listing one reason per candidate layout, those naming the layout asked for first).
A model whose prefill plans with experts but whose generation shardwise refuses (a cache holding recurrent,
linear-attention or indexed state, which it does not split; the coverage table refuses those whole) is in
the matrix: its cases run the prefill checks (numbers, prefill bytes, held) and are "refused" with the
generation's reason when those pass; a failed check as "WRONG" with what differs; any other exception (or a case over the time limit)
as "CRASH" with where it was raised. Each model is captured once per call shape and every plan starts
from a copy (`coverage.reused_captures`).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum

import torch

from .. import api
from ..drivers import generate as generate_driver
from ..drivers.accounting import compare
from ..drivers.generate import generate, reference_generate
from ..errors import ShardwiseError
from ..models.presets import build_hf, vocab_size
from ..runtime.simulate import Trace, sim_group_name
from .coverage import _deadline, _one_line, _runs_by_itself, _short, architectures, map_archs, reused_captures

MESHES = ("1x1x4", "2x2x1", "2x2x2")
LAYOUTS = ("experts=sliced", "experts=parallel", "experts=a2a")
A2A_MEMBER = {"1x1x4": "wg_xyz", "2x2x1": "wg_x", "2x2x2": "wg_x"}  # a2a needs a member splitting the tokens
ATOL = 1e-5
TOKENS = 8
BATCH, SEQ = 4, 8  # 4 sequences: the batch splits over the 4 chips of 1x1x4 (all-to-all dispatch)
TIMEOUT_S = 300  # per case, and for finding whether an architecture is a mixture of experts


class Status(str, Enum):
    OK = "ok"
    REFUSED = "refused"
    WRONG = "WRONG"
    CRASH = "CRASH"


class Found(str, Enum):
    MOE = "mixture of experts"
    DENSE = "no experts layer"
    REFUSED = "refused"
    CRASH = "crash"
    NOT_BUILT = "not built"


@dataclass
class Case:
    """One layout × mesh of one architecture."""

    arch: str
    layouts: str
    mesh: str
    status: Status = Status.OK
    detail: str = ""  # the refusal, the error, what differs; for a pass: the layers' choices
    max_abs_diff: float | None = None  # prefill logits, sharded − unsharded
    held: float | None = None  # the largest share of the stacked expert weight bytes one rank holds
    ranks: int = 0
    seconds: float = 0.0


@dataclass
class ArchResult:
    arch: str
    found: Found
    detail: str = ""
    model: str = ""
    moe_like: bool = False  # a module or weight named like experts (for the architectures not planned)
    experts: list[str] = field(default_factory=list)  # the experts layers of the plan
    cases: list[Case] = field(default_factory=list)
    seconds: float = 0.0


# ------------------------------------------------------------------------------------ one architecture
def check(arch: str, *, meshes=MESHES, layouts=LAYOUTS, tokens: int = TOKENS, timeout_s: int = TIMEOUT_S) -> ArchResult:
    """Build `arch` tiny, find whether it is a mixture of experts, and if so run every layout × mesh case."""
    start = time.perf_counter()
    try:
        model = build_hf(arch)
        _runs_by_itself(model)
    except Exception as e:  # noqa: BLE001 — the generic shrinking failed for this family: not shardwise's verdict
        return ArchResult(arch, Found.NOT_BUILT, _one_line(e), seconds=time.perf_counter() - start)
    result = ArchResult(arch, Found.MOE, model=type(model).__name__, moe_like=_moe_like(model))
    ids = torch.randint(0, vocab_size(model), (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    with reused_captures():
        try:
            with _deadline(timeout_s):
                plan = api.plan(model, (ids,), {"use_cache": False}, mesh=meshes[0])
                result.experts = [layer.name for layer in plan.layers if layer.kind == "experts"]
                want_tokens: torch.Tensor | ShardwiseError | None = None
                if result.experts:
                    try:
                        want_tokens = reference_generate(model, ids, tokens)
                    except ShardwiseError as e:  # no generation (a cache shardwise does not split): prefill only
                        want_tokens = e
        except ShardwiseError as e:
            result.found, result.detail = Found.REFUSED, _one_line(e, name=False)
        except Exception as e:  # noqa: BLE001 — recorded, as coverage records it
            result.found, result.detail = Found.CRASH, _one_line(e, where=True)
        else:
            if not result.experts:
                result.found = Found.DENSE
            else:
                result.cases = [_timed_case(model, ids, want_tokens, arch, request, mesh, tokens, timeout_s)
                                for request in layouts for mesh in meshes]
    result.seconds = time.perf_counter() - start
    return result


def _timed_case(model, ids, want_tokens, arch: str, request: str, mesh: str, tokens: int, timeout_s: int) -> Case:
    case = Case(arch, request, mesh)
    start = time.perf_counter()
    try:
        with _deadline(timeout_s):
            _case(case, model, ids, want_tokens, tokens)
    except ShardwiseError as e:
        case.status, case.detail = Status.REFUSED, _one_line(_asked_first(e, request))
    except Exception as e:  # noqa: BLE001 — anything else raised is a crash, recorded with where it was raised
        case.status, case.detail = Status.CRASH, _one_line(e, where=True)
    case.seconds = time.perf_counter() - start
    return case


def _case(case: Case, model, ids: torch.Tensor, want_tokens: torch.Tensor | ShardwiseError, tokens: int) -> None:
    """Fill `case` in: every check of the module docstring (those of generation unless `want_tokens` is the
    refusal of the unsharded generation); any failed one makes it WRONG."""
    kwargs = {"use_cache": False}
    wrong: list[str] = []
    mode = case.layouts.partition("=")[2]
    plan = api.plan(model, (ids,), kwargs, mesh=case.mesh, layouts=_request(case))
    case.ranks = plan.mesh.size
    layers = [layer for layer in plan.layers if layer.kind == "experts"]
    if not layers:
        wrong.append("no experts layer in the plan")
    want = "" if mode == "sliced" else mode
    off = [f"{layer.name} runs {layer.choice}" for layer in layers if layer.choice.partition(":")[2] != want]
    if off:
        wrong.append(f"layout not applied: {off[0]}")

    ranks = [plan.program.emit(r, group_name=sim_group_name) for r in range(plan.mesh.size)]
    trace = Trace()
    with torch.no_grad():
        got = plan.program.simulate((ids,), kwargs, trace=trace, programs=[r.program for r in ranks]).logits
        want = model(ids, **kwargs).logits
    case.max_abs_diff = (got - want).abs().max().item()
    if not case.max_abs_diff <= ATOL:
        wrong.append(f"prefill logits off by {case.max_abs_diff:.2e}")
    wrong += _bytes_differ("prefill", compare(plan, trace.collectives, plan.program.gm))

    whole = _stacked(model.state_dict(), layers)
    held = [_stacked(r.state_dict(), layers) for r in ranks]
    if whole:
        case.held = max(held) / whole
        if any(h * len(ranks) != whole for h in held):
            wrong.append(f"ranks hold {min(held)}..{max(held)} of {whole} stacked expert bytes, not 1/{len(ranks)}")
    else:
        wrong.append("no stacked [X, ., .] expert weights found in the model")

    refused = want_tokens if isinstance(want_tokens, ShardwiseError) else None
    if refused is None:
        try:
            wrong += _generation(case, model, ids, want_tokens, tokens)
        except ShardwiseError as e:
            refused = e
    if wrong:
        case.status, case.detail = Status.WRONG, "; ".join(dict.fromkeys(wrong))
    elif refused is not None:
        case.status = Status.REFUSED
        case.detail = f"prefill ok (logits, bytes, held); generation refused: {_one_line(refused)}"
    else:
        case.detail = ", ".join(dict.fromkeys(layer.choice for layer in layers))


def _request(case: Case) -> str:
    """The layouts a case plans with: all-to-all dispatch with its member (one that splits the tokens)."""
    if case.layouts.endswith("=a2a"):
        return f"ffn={A2A_MEMBER[case.mesh]},{case.layouts}"
    return case.layouts


def _generation(case: Case, model, ids: torch.Tensor, want_tokens: torch.Tensor, tokens: int) -> list[str]:
    """Sharded greedy generation: its tokens, and the bytes of its prefill step and of each decode step."""
    wrong = []
    with _each_run() as runs:
        gen = generate(model, ids, tokens, mesh=case.mesh, layouts=_request(case), simulate=True, details=True)
    if not torch.equal(gen.tokens, want_tokens):
        differ = (gen.tokens != want_tokens).any(0).nonzero()
        wrong.append(f"greedy tokens differ from position {differ[0].item() - ids.shape[1]} on")
    decode_steps = 0
    for phase, executed in runs:
        if phase == "prefill":
            wrong += _bytes_differ("generate prefill", compare(gen.prefill, executed, gen.prefill.program.gm))
        elif phase == "decode":
            decode_steps += 1
            wrong += _bytes_differ(f"decode step {decode_steps}", compare(gen.decode, executed, gen.decode.program.gm),
                                   empty_ok=True)
    if decode_steps != tokens - 1:
        wrong.append(f"{decode_steps} decode steps ran, not {tokens - 1}")
    return wrong


def _asked_first(e: ShardwiseError, request: str) -> ShardwiseError:
    """A refusal listing several reasons (one per candidate layout) with those naming the layout asked for
    first, so the one line the table shows says why that layout was refused."""
    lines = str(e).splitlines()
    if len(lines) < 3:
        return e
    named = [line for line in lines[1:] if request in line]
    return type(e)("\n".join([lines[0], *named, *(line for line in lines[1:] if line not in named)]))


def _bytes_differ(phase: str, rows: list[tuple[str, str, int, int]], *, empty_ok: bool = False) -> list[str]:
    """What differs between the predicted and the executed bytes of one run (nothing when they agree)."""
    if not rows:
        return [] if empty_ok else [f"{phase}: no collectives predicted or executed"]
    return [f"{phase}: {layer} {kind} predicted {p} B, executed {m} B" for layer, kind, p, m in rows if p != m][:1]


def _stacked(state: dict, layers) -> int:
    """Bytes of the stacked expert weights in `state` (a model's or a rank program's state dict): the 3-D
    tensors under an experts layer (a rank program names its weights by the flattened module path)."""
    prefixes = [layer.name.replace(".", "_") + "_" for layer in layers]
    return sum(t.numel() * t.element_size() for k, t in state.items()
               if t.ndim == 3 and any(p in k.replace(".", "_") for p in prefixes))


@contextlib.contextmanager
def _each_run() -> Iterator[list[tuple[str, list]]]:
    """Within the block, every simulated generation records each run of a phase (prefill, each decode step,
    the cache bridge) with the collectives that run executed, in order: (phase, executed)."""
    runs: list[tuple[str, list]] = []
    original = generate_driver.SimulatedRanks

    class EachRun(original):
        def run(self, phase, program, inputs, layouts):
            before = len(self.traces.get(phase, Trace()).collectives)
            out = super().run(phase, program, inputs, layouts)
            runs.append((phase, self.traces[phase].collectives[before:]))
            return out

    generate_driver.SimulatedRanks = EachRun
    try:
        yield runs
    finally:
        generate_driver.SimulatedRanks = original


def _moe_like(model) -> bool:
    """Named like a mixture of experts: a weight or a module class that says experts or MoE."""
    names = [k.lower() for k, _ in model.named_parameters()] + [type(m).__name__.lower() for m in model.modules()]
    return any("expert" in n or "moe" in n for n in names)


# ------------------------------------------------------------------------------------ the sweep
def sweep(archs: list[str] | None = None, *, progress=None, jobs: int = 1, **kw) -> list[ArchResult]:
    """`check` every architecture (all of `architectures()` by default), in `jobs` worker processes when > 1;
    results in the order of `archs`."""
    return map_archs(check, archs, jobs=jobs, progress=progress, kw=kw,
                     died=lambda arch, why: ArchResult(arch, Found.CRASH, why))


# ------------------------------------------------------------------------------------ the table
HEADER = ("architecture", "layout", "mesh", "status", "max |Δlogits|", "expert bytes/rank", "time", "detail")


def _cells(c: Case) -> tuple[str, ...]:
    diff = "" if c.max_abs_diff is None else f"{c.max_abs_diff:.1e}"
    return (c.arch, c.layouts, c.mesh, c.status.value, diff, _share(c), f"{c.seconds:.1f}s", c.detail)


def _share(c: Case) -> str:
    """The largest share of the stacked expert weights one rank holds: 1/n when exact."""
    if c.held is None:
        return ""
    if c.ranks and abs(c.held * c.ranks - 1) < 1e-12:
        return f"1/{c.ranks}"
    return f"{c.held:.3f}"


def rows(results: list[ArchResult]) -> list[Case]:
    return [c for r in results for c in r.cases]


def table(results: list[ArchResult]) -> str:
    """The plain-text table: one row per case, then the summary."""
    cases = rows(results)
    lines = [_line(HEADER, _widths(cases))] + [_line(_cells(c), _widths(cases)) for c in cases]
    return "\n".join(lines + ["", summary(results)])


def _widths(cases: list[Case]) -> list[int]:
    cells = [HEADER] + [_cells(c) for c in cases]
    return [max(len(row[i]) for row in cells) for i in range(len(HEADER) - 1)]


def _line(cells: tuple[str, ...], widths: list[int]) -> str:
    return "  ".join(f"{c:{w}}" for c, w in zip(cells, widths)) + "  " + _short(cells[-1])


def counts(results: list[ArchResult]) -> dict[Status, int]:
    cases = rows(results)
    return {s: sum(c.status == s for c in cases) for s in Status}


def summary(results: list[ArchResult]) -> str:
    moe = [r for r in results if r.found == Found.MOE]
    c = counts(results)
    clean = sum(all(case.status == Status.OK for case in r.cases) for r in moe)
    found = {f: sum(r.found == f for r in results) for f in Found}
    unplanned = [r.arch for r in results if r.found in (Found.REFUSED, Found.CRASH) and r.moe_like]
    diffs = [case.max_abs_diff for case in rows(results) if case.max_abs_diff is not None]
    text = (f"{len(moe)} MoE architectures of {len(results)} checked, {sum(c.values())} cases: "
            + ", ".join(f"{n} {s.value}" for s, n in c.items())
            + f"; {clean} architectures ok in every case"
            + (f"; max |Δlogits| {max(diffs):.1e}" if diffs else "")
            + f"; {sum(r.seconds for r in results):.0f} s in all. Not candidates: "
            + ", ".join(f"{found[f]} {f.value}" for f in Found if f != Found.MOE))
    prefill_only = [r.arch for r in moe if any("generation refused" in c.detail for c in r.cases)]
    if prefill_only:
        text += f". Generation refused, prefill checked only: {', '.join(prefill_only)}"
    if unplanned:
        text += f". Named like experts but refused or crashed whole: {', '.join(unplanned)}"
    return text


def markdown(results: list[ArchResult]) -> str:
    """The table as markdown: the summary, one row per case, then the architectures not planned."""
    lines = [(f"Every expert layout ({', '.join(LAYOUTS)}) × mesh ({', '.join(MESHES)}) on the mixture-of-experts "
              "architectures of the installed transformers, tiny random models on simulated ranks "
              "(`python -m shardwise.experiments.moe_matrix`; the checks: its docstring)."), "",
             summary(results) + ".", "",
             "| " + " | ".join(h.replace("|", "\\|") for h in HEADER) + " |", "|" + "---|" * len(HEADER)]
    for c in rows(results):
        cells = list(_cells(c))
        cells[0] = f"`{cells[0]}`"
        cells[-1] = _short(cells[-1], 300)
        lines.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
    skipped = [r for r in results if r.found in (Found.REFUSED, Found.CRASH) and r.moe_like]
    if skipped:
        lines += ["", "Named like mixtures of experts but not planned whole (so not in the matrix):", "",
                  "| architecture | verdict | detail |", "|---|---|---|"]
        for r in skipped:
            lines.append(f"| `{r.arch}` | {r.found.value} | {_short(r.detail, 300).replace('|', chr(92) + '|')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", help="comma-separated architectures (default: every causal-LM architecture)")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (one core each)")
    ap.add_argument("--markdown", help="also write the table as markdown to this file")
    ap.add_argument("--timeout", type=int, default=TIMEOUT_S, help="seconds per case")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    archs = [a for a in args.archs.split(",") if a] if args.archs else architectures()
    start = time.perf_counter()

    def progress(r: ArchResult) -> None:
        if r.found == Found.MOE:
            for c in r.cases:
                print(_line(_cells(c), [24, 16, 5, 7, 8, 6, 6]), flush=True)
        elif args.archs:
            print(f"{r.arch}: {r.found.value} {_short(r.detail)}", flush=True)

    results = sweep(archs, progress=progress, jobs=args.jobs, timeout_s=args.timeout)
    print()
    print(table(results))
    print(f"wall time {time.perf_counter() - start:.0f} s")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(results))
    return 0 if all(c.status in (Status.OK, Status.REFUSED) for c in rows(results)) else 1


if __name__ == "__main__":
    sys.exit(main())
