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
from ..ir.plan import Plan, ReplicatedWeight
from ..models import presets
from ..planning.planner import model_and_inputs, plan
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
            lines.append(f"  greedy tokens {'identical to' if self.tokens_equal else 'DIFFER from'} the unsharded "
                         f"model's{logits}")
        if self.param_bytes_per_rank:
            per = self.param_bytes_per_rank
            lines.append(f"  parameter bytes per rank: {', '.join(f'{b:,}' for b in per)} of {self.param_bytes_total:,} "
                         f"total ({per[0] / max(1, self.param_bytes_total):.3f} of the model per rank)")
        for key, extra, factor in self.replicated[:6]:
            lines.append(f"    replicated ×{factor}: {key} (+{extra:,.0f} B per rank)")
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
    atol: float = 1e-5,
    batch: int = 8,
    seq: int = 16,
    nproc: int | None = None,
    phase: str = "prefill",
    tokens: int = 16,
    bytes: bool = False,
    timeout: float | None = None,
    trace_dir: str | None = None,
) -> VerifyReport:
    """Plan, run every rank, and compare with the unsharded model.

    prefill: the outputs of `model(*args, **kwargs)` (max abs difference); decode: `tokens` greedy
    tokens generated with sharded prefill and decode steps (must be identical). `bytes=True` also
    compares the collective bytes each layer executed with the plan's prediction. Ranks are simulated
    in this process, or, with `nproc`, real torch.distributed worker processes on loopback
    (`model` must then be a preset name, so each worker can rebuild it on the meta device); `timeout`
    (seconds, drivers.launch.DEFAULT_TIMEOUT when None) bounds how long a real rank waits for the others;
    `trace_dir`: with `nproc`, each rank profiles one more prefill step into `trace_dir/rank{r}.json`.
    """
    mesh = Mesh.parse(mesh)
    phase = Phase.parse(phase, "phase")
    _check_request(model, atol=atol, tokens=tokens, nproc=nproc)
    if nproc is not None:
        return _verify_real(model, args, kwargs, mesh=mesh, layouts=layouts, atol=atol, batch=batch, seq=seq,
                            nproc=nproc, phase=phase, tokens=tokens, record=bytes, timeout=timeout,
                            trace_dir=trace_dir)
    model, args, kwargs, name = model_and_inputs(model, args, kwargs, batch, seq)
    p = plan(model, args, kwargs, mesh=mesh, layouts=layouts)
    trace = Trace()
    with torch.no_grad():
        want = model(*args, **kwargs)
        got = p.program.simulate(args, kwargs, trace=trace)
    report = VerifyReport(model=name, mesh=str(mesh), layouts=p.settings.requested,
                          max_abs_diff=max_abs_diff(got, want), atol=atol, ranks="simulated",
                          param_bytes_per_rank=[_held(p, r) for r in range(mesh.size)],
                          param_bytes_total=model_bytes(model), replicated=p.memory.replicated, phase=phase)
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
    if isinstance(model, str) and presets.get(model).shape_only:
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
                 record, timeout) -> VerifyReport:
    if not isinstance(model, str):
        raise ShardwiseError("verify(..., nproc=N) launches fresh processes: pass a preset name as the model")
    if nproc != mesh.size:
        raise MeshError(f"mesh {mesh} has {mesh.size} chips but --nproc is {nproc}: they must be equal")
    name = model
    model, args, kwargs, _ = model_and_inputs(model, args, kwargs, batch, seq)
    p = plan(model, args, kwargs, mesh=mesh, layouts=layouts)
    state = p.program.state
    run = run_real(model=name, mesh=str(mesh), layouts=layouts, args=args, kwargs=kwargs, state=state, nproc=nproc,
                   phase=phase, timeout=timeout, extra={"tokens": tokens, "record": record,
                                                                   "trace_dir": trace_dir})
    report = VerifyReport(model=name, mesh=str(mesh), layouts=p.settings.requested, max_abs_diff=None, atol=atol,
                          ranks=run.backend, param_bytes_per_rank=run.param_bytes, param_bytes_total=model_bytes(model),
                          replicated=p.memory.replicated, phase=phase, bytes_rows=run.bytes_rows)
    with torch.no_grad():
        if phase == "prefill":
            report.max_abs_diff = max_abs_diff(run.output, model(*args, **kwargs))
        else:
            report.tokens_equal = torch.equal(run.output, reference_generate(model, args[0], tokens))
    return report
