"""`verify`: plan, run every rank, and compare with the unsharded model (numbers, tokens, bytes)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from ..errors import MeshError, ShardwiseError
from ..ir.kinds import Phase
from ..ir.mesh import Mesh
from ..ir.plan import Plan, ReplicatedWeight, Sharding
from ..models import presets
from ..models.checkpoint import Checkpoint, is_checkpoint
from ..planning.planner import model_and_inputs, plan
from ..planning.sharding import check_sharded
from ..runtime.simulate import Trace, sim_group_name
from .accounting import compare, compare_generation, format_comparison
from .generate import generate, reference_generate
from .launch import run_real


@dataclass
class VerifyReport:
    model: str
    mesh: str
    layouts: dict[str, str]  # what was forced (the rest chosen by cost)
    max_abs_diff: float | None  # None where not measured (decode on real ranks: tokens are compared)
    atol: float
    ranks: str  # "simulated" or "gloo" / "nccl"
    param_bytes_per_rank: list[int] = field(default_factory=list)
    param_bytes_total: int = 0
    replicated: list[ReplicatedWeight] = field(default_factory=list)
    phase: Phase = Phase.PREFILL
    tokens_equal: bool | None = None  # decode: greedy tokens identical to the unsharded model's
    bytes_rows: list[tuple[str, str, int, int]] = field(default_factory=list)  # (layer, kind, predicted, measured)
    sharding: Sharding | None = None  # the plan's: fractions of parameter bytes and matmul FLOPs split
    bytes_read: list[int] = field(default_factory=list)  # checkpoints: per rank, weight bytes read from the files
    checkpoint_bytes: int = 0  # checkpoints: the size of the tensors in the checkpoint's files
    tokens_note: str = ""  # how the tokens compare, where not simply identical (bf16 ties)

    @property
    def ok(self) -> bool:
        return ((self.max_abs_diff is None or self.max_abs_diff <= self.atol) and self.tokens_equal is not False
                and all(p == m for _, _, p, m in self.bytes_rows))

    def __str__(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        lines = [f"{verdict}: {self.model} on mesh {self.mesh} ({self.ranks} ranks), {self.phase}, "
                 f"layouts {self.layouts or 'chosen by cost'}"]
        if self.tokens_equal is None:
            lines.append(f"  max |sharded − unsharded| = {self.max_abs_diff:.3e}  (bound {self.atol:.0e})")
        else:
            logits = "" if self.max_abs_diff is None else f" (prefill logits within {self.max_abs_diff:.3e})"
            said = self.tokens_note or ("identical to" if self.tokens_equal else "DIFFER from") + " the unsharded model's"
            lines.append(f"  greedy tokens {said}{logits}")
        if self.param_bytes_per_rank:
            per = self.param_bytes_per_rank
            lines.append(f"  parameter bytes per rank: {', '.join(f'{b:,}' for b in per)} of {self.param_bytes_total:,} "
                         f"total ({per[0] / max(1, self.param_bytes_total):.3f} of the model per rank)")
        for key, extra, factor in self.replicated[:6]:
            lines.append(f"    replicated ×{factor}: {key} (+{extra:,.0f} B per rank)")
        if self.sharding is not None:
            lines.append(f"  {self.sharding.line()}")
            if note := self.sharding.experts_note():
                lines.append(f"    {note}")
            if self.sharding.unsharded:
                lines.append("    matmuls of the blocks not sharded:")
                lines += [f"      {line}" for line in self.sharding.unsharded_lines()]
        if self.bytes_read:
            total = max(1, self.checkpoint_bytes)
            what = " (prefill and decode programs, each slice counted once)" if self.phase == Phase.DECODE else ""
            lines.append(f"  checkpoint bytes read per rank{what}, of {self.checkpoint_bytes:,} B in the checkpoint:")
            lines += [f"    rank {r}: {b:>12,} B  ({b / total:.3f} of the checkpoint)" for r, b in enumerate(self.bytes_read)]
        if self.bytes_rows:
            same = all(p == m for _, _, p, m in self.bytes_rows)
            lines.append(f"  collective bytes, predicted vs measured per layer: {'all equal' if same else 'DIFFERENT'}")
            lines += ["    " + l for l in format_comparison(self.bytes_rows).splitlines()]
        return "\n".join(lines)


def max_abs_diff(got: Any, want: Any) -> float:
    g, _ = tree_flatten(got)
    w, _ = tree_flatten(want)
    g = [t for t in g if isinstance(t, torch.Tensor)]
    w = [t for t in w if isinstance(t, torch.Tensor)]
    if len(g) != len(w):
        raise ShardwiseError(f"the sharded program returned {len(g)} tensors, the model {len(w)}")
    return max((float((a.float() - b.float()).abs().max()) for a, b in zip(g, w) if a.numel()), default=0.0)


def verify(
    model: nn.Module | str,
    args: tuple | None = None,
    kwargs: dict | None = None,
    *,
    mesh: Mesh | str,
    layouts: str | dict | None = None,
    atol: float | None = None,
    batch: int = 8,
    seq: int = 16,
    nproc: int | None = None,
    phase: str = "prefill",
    tokens: int = 16,
    bytes: bool = False,
    timeout: float | None = None,
    trace_dir: str | None = None,
    strict: bool = False,
    collective_matmul: bool = False,
) -> VerifyReport:
    """Plan, run every rank, and compare with the unsharded model.

    prefill: the outputs of `model(*args, **kwargs)` (max abs difference); decode: `tokens` greedy
    tokens generated with sharded prefill and decode steps (must be identical). `bytes=True` also
    compares the collective bytes each layer executed with the plan's prediction. Ranks are simulated
    in this process, or, with `nproc`, real torch.distributed worker processes on loopback
    (`model` must then be a preset name, so each worker can rebuild it on the meta device); `timeout`
    (seconds, drivers.launch.DEFAULT_TIMEOUT when None) bounds how long a real rank waits for the others;
    `trace_dir`: with `nproc`, each rank profiles one more prefill step into `trace_dir/rank{r}.json`.
    The report states how much of the parameters and matmul FLOPs the plan splits; a block's matmul left
    unsharded is a NotShardedWarning, or with `strict` a ShardwiseError (before anything runs).
    `collective_matmul`: plan and run the looped collective matmul (plan(..., collective_matmul=True));
    prefill of a preset only.

    `model` may be a Hugging Face checkpoint directory: the ranks (simulated, or `nproc` real ones) read
    their shards from its files and are compared with the model transformers loads whole; the report
    gives the bytes each rank read. `atol` by default: 1e-5 in float32, 8 units of rounding of the
    logits' magnitude in bf16/fp16 (`default_atol`).
    """
    mesh = Mesh.parse(mesh)
    phase = Phase.parse(phase, "phase")
    _check_request(model, atol=1e-5 if atol is None else atol, tokens=tokens, nproc=nproc)
    if collective_matmul and phase != Phase.PREFILL:
        raise ShardwiseError("verify(..., collective_matmul=True) checks a prefill step; decode steps are "
                             "generated with the plain collectives: use phase='prefill'")
    if is_checkpoint(model):
        return _verify_checkpoint(str(model), mesh=mesh, layouts=layouts, atol=atol, batch=batch, seq=seq,
                                  nproc=nproc, phase=phase, tokens=tokens, timeout=timeout, strict=strict,
                                  unsupported={"bytes": bytes, "trace_dir": trace_dir,
                                               "collective_matmul": collective_matmul})
    atol = 1e-5 if atol is None else atol
    if nproc is not None:
        return _verify_real(model, args, kwargs, mesh=mesh, layouts=layouts, atol=atol, batch=batch, seq=seq,
                            nproc=nproc, phase=phase, tokens=tokens, record=bytes, timeout=timeout,
                            trace_dir=trace_dir, strict=strict, collective_matmul=collective_matmul)
    model, args, kwargs, name = model_and_inputs(model, args, kwargs, batch, seq)
    p = check_sharded(plan(model, args, kwargs, mesh=mesh, layouts=layouts, collective_matmul=collective_matmul),
                      strict)
    trace = Trace()
    with torch.no_grad():
        want = model(*args, **kwargs)
        got = p.program.simulate(args, kwargs, trace=trace)
    report = VerifyReport(model=name, mesh=str(mesh), layouts=p.settings.requested,
                          max_abs_diff=max_abs_diff(got, want), atol=atol, ranks="simulated",
                          param_bytes_per_rank=[_held(p, r) for r in range(mesh.size)],
                          param_bytes_total=model_bytes(model), replicated=p.memory.replicated, phase=phase,
                          sharding=p.sharding)
    if phase == "prefill" and bytes:
        report.bytes_rows = compare(p, trace.collectives, p.program.gm)
    if phase == "decode":
        ids = args[0]
        gen = generate(model, ids, tokens, mesh=mesh, layouts=layouts, simulate=True, details=True)
        report.tokens_equal = torch.equal(gen.tokens, reference_generate(model, ids, tokens))
        if bytes:
            report.bytes_rows = compare_generation(gen, tokens)
    return report


def _held(p: Plan, rank: int) -> int:
    return sum(t.numel() * t.element_size() for t in p.program.emit(rank, group_name=sim_group_name).state_dict().values())


def _check_request(model, *, atol: float, tokens: int, nproc: int | None) -> None:
    """What verify can check: a model with weights, a finite tolerance, at least one token, ranks."""
    if isinstance(model, str) and not is_checkpoint(model) and presets.get(model).shape_only:
        raise ShardwiseError(f"{model} is a shapes-only preset (built on the meta device, no weights): there are "
                             f"no numbers to compare; plan it with `shardwise inspect {model} ...`, or verify a "
                             f"tiny preset ({', '.join(n for n, p in presets.PRESETS.items() if not p.shape_only)})")
    if not isinstance(atol, (int, float)) or isinstance(atol, bool) or not math.isfinite(atol) or atol < 0:
        raise ShardwiseError(f"atol={atol!r}: expected a finite tolerance ≥ 0 (e.g. 1e-5 for float32)")
    for name, v in (("tokens", tokens), ("nproc", nproc)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ShardwiseError(f"{name}={v!r}: expected a whole number ≥ 1")


def model_bytes(model: nn.Module) -> int:
    unique = {t.data_ptr(): t for t in model.state_dict().values()}
    return sum(t.numel() * t.element_size() for t in unique.values())


def _verify_real(model, args, kwargs, *, mesh: Mesh, layouts, atol, batch, seq, nproc, phase, tokens, trace_dir,
                 record, timeout, strict: bool = False, collective_matmul: bool = False) -> VerifyReport:
    if not isinstance(model, str):
        raise ShardwiseError("verify(..., nproc=N) launches fresh processes: pass a preset name as the model")
    if nproc != mesh.size:
        raise MeshError(f"mesh {mesh} has {mesh.size} chips but --nproc is {nproc}: they must be equal")
    name = model
    model, args, kwargs, _ = model_and_inputs(model, args, kwargs, batch, seq)
    p = check_sharded(plan(model, args, kwargs, mesh=mesh, layouts=layouts, collective_matmul=collective_matmul),
                      strict)
    state = p.program.state
    run = run_real(model=name, mesh=str(mesh), layouts=layouts, args=args, kwargs=kwargs, state=state, nproc=nproc,
                   phase=phase, timeout=timeout, extra={"tokens": tokens, "record": record,
                                                                   "trace_dir": trace_dir,
                                                                   "collective_matmul": collective_matmul})
    report = VerifyReport(model=name, mesh=str(mesh), layouts=p.settings.requested, max_abs_diff=None, atol=atol,
                          ranks=run.backend, param_bytes_per_rank=run.param_bytes, param_bytes_total=model_bytes(model),
                          replicated=p.memory.replicated, phase=phase, bytes_rows=run.bytes_rows,
                          sharding=p.sharding)
    with torch.no_grad():
        if phase == "prefill":
            report.max_abs_diff = max_abs_diff(run.output, model(*args, **kwargs))
        else:
            report.tokens_equal = torch.equal(run.output, reference_generate(model, args[0], tokens))
    return report


def _verify_checkpoint(path: str, *, mesh: Mesh, layouts, atol: float | None, batch: int, seq: int,
                       nproc: int | None, phase: Phase, tokens: int, timeout, strict: bool,
                       unsupported: dict[str, Any]) -> VerifyReport:
    """verify for a checkpoint directory: the sharded ranks (simulated, or `nproc` real ones), each reading
    its shards from the checkpoint's files, against the model loaded whole by transformers."""
    for name, given in unsupported.items():
        if given:
            raise ShardwiseError(f"verify(..., {name}=...) is not available for a checkpoint directory yet: "
                                 f"verify a preset with it")
    if nproc is not None and nproc != mesh.size:
        raise MeshError(f"mesh {mesh} has {mesh.size} chips but --nproc is {nproc}: they must be equal")
    ckpt = Checkpoint.open(path)
    ref = ckpt.load()  # the unsharded reference, as transformers loads it
    args, kwargs = presets.example_inputs(ref, batch, seq)
    ids = args[0]
    p = check_sharded(plan(path, args, kwargs, mesh=mesh, layouts=layouts), strict)
    report = VerifyReport(model=ckpt.name, mesh=str(mesh), layouts=p.settings.requested, max_abs_diff=None,
                          atol=0.0, ranks="simulated", param_bytes_total=model_bytes(ref), phase=phase,
                          replicated=p.memory.replicated, sharding=p.sharding, checkpoint_bytes=ckpt.nbytes)
    with torch.no_grad():
        if nproc is not None:
            run = run_real(model=ckpt.name, checkpoint=ckpt.path, mesh=str(mesh), layouts=layouts, args=args,
                           kwargs=kwargs, nproc=nproc, phase=phase, timeout=timeout, extra={"tokens": tokens})
            report.ranks, report.param_bytes_per_rank = run.backend, run.param_bytes
            report.bytes_read = run.bytes_read if phase == Phase.PREFILL else run.bytes_distinct
            got = run.output
        elif phase == Phase.PREFILL:
            got = p.program.simulate(args, kwargs)
            report.bytes_read = [p.program.bytes_read[r] for r in range(mesh.size)]
        else:
            source = p.program.weights.fresh()  # shared by the simulated ranks: no per-rank count
            got = generate(source.model, ids, tokens, mesh=mesh, layouts=layouts, simulate=True, weights=source)
        if phase == Phase.PREFILL:
            want = ref(*args, **kwargs)
            report.max_abs_diff = max_abs_diff(got, want)
            report.atol = default_atol(ckpt.dtype, want) if atol is None else atol
        else:
            report.tokens_equal, report.tokens_note = greedy_agrees(ref, got, ids.shape[1], atol)
    return report


def greedy_agrees(ref: nn.Module, tokens: torch.Tensor, prompt: int, atol: float | None = None) -> tuple[bool, str]:
    """Whether sharded greedy `tokens` ([B, prompt + new]) are the unsharded model's: in float32, identical
    to its greedy loop; in bf16/fp16, where rounding reorders sums and the logits of random weights tie
    to the last bit, each chosen token's logit is within `atol` (default_atol) of the unsharded model's
    best one at that step, the model run on the same tokens (teacher-forced). (ok, what was found)."""
    dtype = next(ref.parameters()).dtype
    if dtype not in (torch.bfloat16, torch.float16):
        same = torch.equal(tokens, reference_generate(ref, tokens[:, :prompt], tokens.shape[1] - prompt))
        return same, "identical to the unsharded model's" if same else "DIFFER from the unsharded model's"
    with torch.no_grad():
        logits = ref(tokens[:, :-1], use_cache=False).logits[:, prompt - 1:].float()
    chosen = logits.gather(-1, tokens[:, prompt:, None])[..., 0]
    gap = logits.max(-1).values - chosen
    tol = default_atol(dtype, logits.to(dtype)) if atol is None else atol
    differ = int((gap > 0).sum())
    ok = bool((gap <= tol).all())
    what = (f"{differ} of {gap.numel()} not the unsharded model's first choice, each within {tol:.2g} of it "
            f"(a tie in {str(dtype).removeprefix('torch.')})" if differ else
            f"each the unsharded model's first choice after the tokens before it ({str(dtype).removeprefix('torch.')}: "
            f"compared teacher-forced, where rounding may break ties either way)")
    return ok, (what if ok else f"DIFFER from the unsharded model's: a logit {float(gap.max()):.3g} below its best, "
                f"beyond the {tol:.2g} of {str(dtype).removeprefix('torch.')} rounding")


def default_atol(dtype: torch.dtype, want: Any) -> float:
    """float32: 1e-5 (sums reordered over ≤ 8 ranks move logits by ~1e-6). bf16 / fp16: 8 units of rounding
    (2^-8 / 2^-11) of the logits' magnitude: each sharded reduction rounds every rank's partial sum before
    adding them, about 2 extra roundings per reduction, which mostly cancel (tests/test_fuzz.py measures)."""
    u = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}.get(dtype)
    if u is None:
        return 1e-5
    big = max((float(t.float().abs().max()) for t in tree_flatten(want)[0] if isinstance(t, torch.Tensor)
               and t.is_floating_point() and t.numel()), default=1.0)
    return 8 * u * max(1.0, big)
