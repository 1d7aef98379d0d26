"""Sweeps: models × chip counts × batch sizes × phases × weight precisions × objectives → one table.

    sweep = run_sweep(["palm-8b", "palm-540b"], chips=[32, 64, 128], batches=[1, 64, 512],
                      phases=["prefill", "decode"], weights=["int8", "bf16"])
    sweep.to_csv("sweep.csv"); sweep.to_json("sweep.json")
    sweep.frontier("palm-540b", "decode")        # the points no other point beats on both axes

Every point is a Plan made by `report.engine.Engine` (what `shardwise.plan` makes, with prototypes,
candidate costs and mesh answers kept across points), read into one row: the layouts chosen, the mesh,
latency per step, cost in chip-milliseconds per token, MFU and memory per chip. A point with no plan
(the model does not fit) is a row too, with the planner's reason. A progress bar with an ETA runs on
standard error (tqdm) unless `progress=False`.

Steps: prefill processes `seq` prompt tokens per sequence into a cache of `context` positions; decode
generates one token per sequence at the end of a `context`-long cache, so its latency per step is the
latency per generated token (PAPER.md's Figure 1 and Table 2).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..errors import PlanError, ShardwiseError
from ..ir.kinds import Objective, Phase
from ..ir.plan import Plan
from .engine import Engine, MemberSet, MeshSet


@dataclass(frozen=True)
class SweepRow:
    model: str
    phase: str
    chips: int  # asked for (an objective of cost may use fewer: `mesh`)
    batch: int
    weights: str
    objective: str
    seq: int  # tokens per sequence in this step
    context: int  # KV-cache length
    ok: bool
    mesh: str = ""
    chips_used: int = 0
    layout: str = ""  # the blocks' layouts run by run ("ws2d+batch", "117×ws2d+batch, 1×ws1d_ar+batch")
    family: str = ""  # the main run in the paper's words ("2D WS + attention by batch")
    ffn: str = ""  # the main run's family ("2D WS")
    attention: str = ""  # the main run's attention split ("batch")
    latency_ms: float = 0.0  # per step (decode: per generated token)
    cost_chip_ms_per_token: float = 0.0
    mfu: float = 0.0
    tokens_per_step: int = 0
    weights_per_chip: float = 0.0  # bytes
    kv_cache_per_chip: float = 0.0  # bytes
    why: str = ""  # no plan: the planner's reason

    @classmethod
    def of(cls, plan: Plan, *, chips: int, weights: str, objective: str) -> SweepRow:
        main = plan.main
        return cls(model=plan.model, phase=str(plan.phase), chips=chips, batch=plan.batch, weights=weights,
                   objective=objective, seq=plan.seq, context=plan.settings.context or plan.seq, ok=True,
                   mesh=str(plan.mesh), chips_used=plan.mesh.size, layout=plan.chosen, family=plan.family,
                   ffn=main.family if main else "", attention=main.attention if main else "",
                   latency_ms=plan.totals.latency * 1e3, cost_chip_ms_per_token=plan.totals.chip_ms_per_token,
                   mfu=plan.totals.mfu, tokens_per_step=plan.totals.tokens_per_step,
                   weights_per_chip=plan.memory.weights_per_chip, kv_cache_per_chip=plan.memory.kv_cache_per_chip)

    @property
    def label(self) -> str:
        """How a figure names the point: chips, batch and the layouts of its main run."""
        return f"C:{self.chips_used} B:{self.batch} {self.ffn}+{self.attention}"


@dataclass
class Sweep:
    rows: list[SweepRow]
    seconds: float = 0.0  # wall time of the sweep

    def select(self, **where) -> list[SweepRow]:
        """The rows whose fields equal every given value (`select(model="palm-8b", phase="decode")`)."""
        names = {f.name for f in fields(SweepRow)}
        bad = set(where) - names
        if bad:
            raise ShardwiseError(f"select({', '.join(sorted(bad))}=...): no such column; the columns are "
                                 f"{', '.join(sorted(names))}")
        return [r for r in self.rows if all(getattr(r, k) == v for k, v in where.items())]

    def frontier(self, model: str, phase: str) -> list[SweepRow]:
        """The Pareto frontier of (latency per step, cost per token) among the model's planned points of
        one phase, by increasing latency: every point no other point beats on both axes."""
        points = sorted((r for r in self.select(model=model, phase=phase) if r.ok),
                        key=lambda r: (r.latency_ms, r.cost_chip_ms_per_token))
        out: list[SweepRow] = []
        for r in points:
            if not out or r.cost_chip_ms_per_token < out[-1].cost_chip_ms_per_token:
                out.append(r)
        return out

    def to_csv(self, path: str | Path) -> Path:
        """One line per point, a column per SweepRow field."""
        out = io.StringIO()
        w = csv.DictWriter(out, fieldnames=[f.name for f in fields(SweepRow)])
        w.writeheader()
        w.writerows(asdict(r) for r in self.rows)
        return _write(path, out.getvalue())

    def to_json(self, path: str | Path) -> Path:
        """{"seconds": wall time of the sweep, "rows": [one object per point]}."""
        return _write(path, json.dumps({"seconds": self.seconds, "rows": [asdict(r) for r in self.rows]}, indent=1))


def _write(path: str | Path, text: str) -> Path:
    path = Path(path)
    try:
        path.write_text(text)
    except OSError as e:
        raise ShardwiseError(f"cannot write the sweep to {str(path)!r}: {e.strerror}; expected a writable file in an "
                             f"existing folder: choose another path") from None
    return path


def _positive(name: str, values: Iterable[int]) -> list[int]:
    out = list(values)
    if not out or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in out):
        raise ShardwiseError(f"{name}={out!r}: expected a non-empty list of positive whole numbers")
    return out


def _names(name: str, values: Iterable[str], parse) -> list[str]:
    out = [str(parse(v, name)) if parse else v for v in values]
    if not out:
        raise ShardwiseError(f"{name}=[]: expected at least one value")
    return out


def run_sweep(models: Iterable[str], *, chips: Iterable[int], batches: Iterable[int],
              phases: Iterable[str] = ("prefill", "decode"), weights: Iterable[str] = ("bf16",),
              objectives: Iterable[str] = ("latency",), seq: int = 2048, context: int = 2048,
              hardware: str = "tpu-v4", meshes: MeshSet = "paper", members: MemberSet = "paper",
              workers: int = 1, progress: bool = True) -> Sweep:
    """Plan every point of models × chips × batches × phases × weights × objectives (prefill: `seq`
    tokens per sequence; decode: one token after `context`) and gather one row per point.

    `meshes`/`members` choose the search space (see report.engine): the paper's meshes and named layouts
    by default, as its figures use; "search"/"all" for what `shardwise.plan` searches. Points sharing a
    prototype (model, phase, batch) are planned together by one Engine; with `workers` > 1 such groups
    are spread over that many processes."""
    import time

    from ..planning.planner import check_model

    models = [str(m) for m in models]
    for m in models:
        check_model(m)  # neither a preset nor a checkpoint directory: fails here, before any point is planned
    chips, batches = _positive("chips", chips), _positive("batches", batches)
    phases = _names("phases", phases, Phase.parse)
    objectives = _names("objectives", objectives, Objective.parse)
    weights = _names("weights", weights, None)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ShardwiseError(f"workers={workers!r}: expected a positive number of processes")
    settings = {"hardware": hardware, "seq": seq, "context": context, "meshes": meshes, "members": members}
    Engine(hardware)  # an unknown hardware profile fails here, before any worker starts
    groups = [(settings, [(model, phase, batch, w, n, o) for w in weights for n in chips for o in objectives])
              for model in models for phase in phases for batch in batches]
    t0 = time.perf_counter()
    rows: list[SweepRow] = []
    pool = _pool(workers, len(groups))
    bar = _progress(sum(len(g[1]) for g in groups), progress)
    try:
        for done in (pool.imap(_plan_group, groups) if pool else map(_plan_group, groups)):
            rows += done
            bar.set_postfix_str(f"{done[-1].model} {done[-1].phase} B={done[-1].batch}", refresh=False)
            bar.update(len(done))
    finally:
        bar.close()
        if pool:
            pool.close()
            pool.join()
    return Sweep(rows, time.perf_counter() - t0)


def _plan_group(group: tuple[dict, list[tuple]]) -> list[SweepRow]:
    """The rows of points that share one prototype (model, phase, batch), planned by one Engine."""
    settings, points = group
    engine = Engine(settings["hardware"])
    rows = []
    for model, phase, batch, w, n, objective in points:
        L = settings["seq"] if phase == Phase.PREFILL else 1
        try:
            plan = engine.plan(model, phase=phase, batch=batch, seq=L, context=settings["context"], weights=w,
                               chips=n, objective=objective, meshes=settings["meshes"], members=settings["members"])
            rows.append(SweepRow.of(plan, chips=n, weights=w, objective=objective))
        except PlanError as e:
            rows.append(SweepRow(model=model, phase=str(phase), chips=n, batch=batch, weights=w, objective=objective,
                                 seq=L, context=settings["context"], ok=False, why=str(e).splitlines()[0]))
    return rows


def _pool(workers: int, groups: int):
    """A pool of worker processes, or None to plan in this process. Forked when this process runs one
    thread (workers start with everything imported); from a fresh server process otherwise, since a
    fork copies locks other threads may hold (a test runner's, a progress bar's)."""
    if workers == 1 or groups == 1:
        return None
    import multiprocessing
    import threading

    method = "fork" if threading.active_count() == 1 else "forkserver"
    if method == "forkserver":
        multiprocessing.set_forkserver_preload([__name__])
    return multiprocessing.get_context(method).Pool(min(workers, groups))


def _progress(total: int, show: bool):
    """A tqdm bar on standard error: points done, rate and ETA (redrawn at most once a second)."""
    from tqdm import tqdm

    return tqdm(total=total, disable=not show, unit="point", desc="sweep", dynamic_ncols=True, mininterval=1.0)
