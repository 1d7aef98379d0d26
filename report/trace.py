"""Timelines in the Chrome trace-event format (JSON that Perfetto and chrome://tracing open).

    trace = predicted_trace(plan)              # the cost model's step, one lane per rank
    write_trace(trace, "plan.trace.json")      # open it at ui.perfetto.dev
    check_trace(trace)                         # the structure Perfetto needs, or a ShardwiseError

Every rank is a process (`pid` = rank, named "rank r") with one lane (`tid` 0, "predicted"). Along it,
each layer of the plan, block by block, is a slice holding what the cost model charges it:

    busy         the larger of compute and memory traffic, named for it; the part of each collective
                 that overlaps it (weight all-gathers, prefetched ahead of use where the hardware does;
                 the ring steps of a looped collective matmul, beside its partial matmuls; every
                 collective with `overlap`) is its child, so nothing on the lane overlaps without nesting;
                 in a parallel block's feed-forward, so is what it hides of its attention's own
                 collectives, computing beside them (`CollectiveRecord.beside`; args "layer": the
                 attention), though the lane draws the attention first
    collectives  the ones on the critical path (activations), and what the busy time leaves exposed of
                 the others, one after another
    copy         the local relayout copies around its collectives, last (where the hardware pays them)
    elementwise  its pointwise ops over activations, after those (where the hardware prices them: cpu-local)

so a layer's slice lasts exactly the time the plan gives it, and a step the plan's latency. A collective
lasts the time the cost model priced it at (`CollectiveRecord.time`): one slice where it is wholly hidden
or wholly exposed, two ("overlapped" true, then false) where the busy time hides only part of it (a
weight gather that outlasts its layer's compute, a looped one beside too little of it; the part a parallel
feed-forward hides, in that one's slice, and the rest in its attention's). Every collective
slice carries its kind, group, layouts, bytes per chip, priced time and the ranks of this rank's group in
`args`.

Times are in microseconds (`ts`, `dur`), as the format wants; a step starts at 0.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import ShardwiseError
from ..ir.hardware import Hardware, get_hardware
from ..ir.mesh import Mesh
from ..ir.plan import CollectiveRecord, LayerPlan, Plan
from .views import block_names

PREDICTED_TID = 0


def predicted_trace(plan: Plan, *, ranks: Iterable[int] | None = None, steps: int = 1) -> dict[str, Any]:
    """The plan's predicted timeline for `ranks` (default: every rank of the mesh), `steps` steps long."""
    mesh = plan.mesh
    ranks = list(range(mesh.size)) if ranks is None else list(ranks)
    if not ranks:
        raise ShardwiseError(f"ranks=[]: expected at least one rank of mesh {mesh} to draw a lane for")
    for r in ranks:
        if not isinstance(r, int) or not 0 <= r < mesh.size:
            raise ShardwiseError(f"rank {r!r}: expected a rank of mesh {mesh}, 0 … {mesh.size - 1}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ShardwiseError(f"steps={steps!r}: expected a positive number of steps to lay out")
    hw = _hardware(plan.hardware)
    timeline = _timeline(plan, hw)
    events: list[dict] = []
    for r in ranks:
        events += _lane_names(r, "predicted (cost model)", PREDICTED_TID)
        groups: dict[str, list[int]] = {}
        for step in range(steps):
            t0 = step * plan.totals.latency * 1e6
            if steps > 1:
                events.append(_slice(f"step {step}", "step", t0, plan.totals.latency * 1e6, r,
                                     {"phase": str(plan.phase), "latency_ms": plan.totals.latency * 1e3}))
            for name, cat, start, dur, args, record in timeline:
                if record is not None:
                    if record.group not in groups:
                        groups[record.group] = mesh.group(_group_atoms(record.group, mesh), r)
                    args = {**args, "ranks": groups[record.group]}
                events.append(_slice(name, cat, t0 + start, dur, r, args))
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"source": "shardwise predicted trace", "model": plan.model, "phase": str(plan.phase),
                          "mesh": str(mesh), "hardware": plan.hardware, "chosen": plan.chosen,
                          "latency_ms": plan.totals.latency * 1e3}}


def write_trace(trace: dict, path: str | Path) -> Path:
    """Write a trace as JSON (checked first)."""
    check_trace(trace)
    path = Path(path)
    try:
        path.write_text(json.dumps(trace))
    except OSError as e:
        raise ShardwiseError(f"cannot write the trace to {str(path)!r}: {e.strerror}; expected a writable file in an "
                             f"existing folder: choose another path") from None
    return path


# ------------------------------------------------------------------------------------ the schedule
def _timeline(plan: Plan, hw: Hardware | None) -> list[tuple[str, str, float, float, dict, CollectiveRecord | None]]:
    """One step of one rank as (name, category, start µs, duration µs, args, collective or None)."""
    rows = {l.name: l for l in plan.layers}
    parts = {id(l): _comm_parts(l, hw, plan) for l in plan.layers}
    guests: dict[str, list[tuple[LayerPlan, CollectiveRecord, float]]] = defaultdict(list)
    for l in plan.layers:  # a parallel block's attention collectives its feed-forward hides: in that one's slice
        for rec, b in zip(l.collectives, parts[id(l)].beside):
            if b > _TINY and rec.beside in rows:
                guests[rec.beside].append((l, rec, b))
    out = []
    t = 0.0
    for layer in plan.layers:
        for i, name in enumerate(block_names(layer)):
            out += _layer(layer, name, i, t, parts[id(layer)], rows, guests.get(layer.name, []))
            t += layer.cost.get("time", 0.0) * 1e6
    return out


class _Parts(NamedTuple):
    c: dict[str, float]  # the layer's compute, memory, comm, copy, time, beside (µs)
    hidden: list[float]  # each collective's part (µs) under the layer's own busy slice
    exposed: list[float]  # on the critical path after it
    beside: list[float]  # under the busy slice of the feed-forward computing beside it (`CollectiveRecord.beside`)
    busy: float  # the busy slice's length


def _layer(layer: LayerPlan, name: str, i: int, t: float, p: _Parts, rows: dict[str, LayerPlan],
           guests: list[tuple[LayerPlan, CollectiveRecord, float]]) -> list[tuple]:
    """The slices of the i-th block `name` of a row starting at t: the layer, busy, the collectives (and the
    parts of its guests' it hides: a parallel block's attention collectives), the relayout copies."""
    c, busy = p.c, p.busy
    what = ("compute" if busy == c["compute"] else "memory" if busy == c["memory"] else "overlapped collectives")
    out = [(name, str(layer.kind), t, c["time"],
            {"layout": layer.choice, "count": layer.count, **{f"{k}_ms": c[k] / 1e3 for k in c}}, None)]
    if busy > 0:
        out.append((what, "busy", t, busy,
                    {"compute_ms": c["compute"] / 1e3, "memory_ms": c["memory"] / 1e3,
                     "flops": layer.cost.get("flops", 0.0), "weight_bytes": layer.cost.get("weight_bytes", 0.0),
                     "kv_bytes": layer.cost.get("kv_bytes", 0.0)}, None))
    inner, after = t, t + busy
    for rec, h, e, b in zip(layer.collectives, p.hidden, p.exposed, p.beside):
        args = _collective_args(rec)
        if b > _TINY and rec.beside in rows:
            args["beside"] = _nth(rows[rec.beside], i)
        if h > _TINY:  # the part the busy slice hides
            out.append((_collective_name(rec), "collective", inner, h, {**args, "overlapped": True}, rec))
            inner += h
        if e > _TINY or h <= _TINY and b <= _TINY:  # the part on the critical path
            out.append((_collective_name(rec), "collective", after, e, {**args, "overlapped": False}, rec))
            after += e
    for of, rec, b in guests:  # what this feed-forward's busy time hides of its attention's collectives
        d = min(b, t + busy - inner)
        if d > _TINY:
            args = {**_collective_args(rec), "layer": _nth(of, i), "beside": name, "overlapped": True}
            out.append((_collective_name(rec), "collective", inner, d, args, rec))
            inner += d
    if c["copy"] > 0:  # the relayout copies around its collectives, serial with the rest (strategies/cost.py)
        out.append(("relayout copies", "copy", after, c["copy"], {"copy_ms": c["copy"] / 1e3}, None))
    if c["elementwise"] > 0:  # its pointwise ops over activations, serial with the rest (where priced)
        out.append(("elementwise ops", "elementwise", after + c["copy"], c["elementwise"],
                    {"elementwise_ms": c["elementwise"] / 1e3}, None))
    # by start, enclosing slices first: the layer, its busy slice (equal to what it hides but for rounding)
    return out[:1] + sorted(out[1:], key=lambda e: (e[2], e[1] != "busy", -e[3]))


def _collective_args(rec: CollectiveRecord) -> dict[str, Any]:
    return {"kind": rec.kind, "group": rec.group, "src": rec.src, "dst": rec.dst, "bytes": rec.bytes,
            "wire_bytes": rec.wire_bytes, "weight": rec.weight, "looped": rec.looped, "time_ms": rec.time * 1e3}


def _nth(row: LayerPlan, i: int) -> str:
    """The name of a row's i-th block (rows of one run stand for as many blocks)."""
    names = block_names(row)
    return names[min(i, len(names) - 1)]


def _comm_parts(layer: LayerPlan, hw: Hardware | None, plan: Plan) -> _Parts:
    """Each collective's part (µs) hidden under the layer's busy slice, its part on the critical path after
    it, its part hidden beside a parallel feed-forward, and the busy slice's length.

    The plan gives a layer's compute, memory, comm, time and beside, with time = busy + copy + E for busy =
    max(compute, memory), the exposed communication E, the part `beside` a parallel block's feed-forward
    hides, and the hidden H = comm − beside − E. The collectives that can overlap the busy time
    (prefetched weight gathers, looped ones, all with `overlap`) share H in proportion to their time, each
    at most its whole time; those the feed-forward runs beside share `beside` so; what is left of them all
    shares E.
    A collective's time is what the cost model priced (`CollectiveRecord.time`); without it (a plan that
    does not carry it), its time on `hw` (strategies.cost.collective_time's latency + ring steps + wire
    bytes over bandwidth, from the record), or its wire bytes where no profile can be read. Either is
    scaled to add up to the layer's comm: solving for the parts keeps every layer's slices equal to the
    plan's time."""
    c = {k: layer.cost.get(k, 0.0) * 1e6 for k in ("compute", "memory", "comm", "copy", "elementwise", "time",
                                                  "beside")}
    serial = c["copy"] + c["elementwise"]  # local traffic after the busy time and the exposed comm
    records = layer.collectives
    busy = max(c["compute"], c["memory"])
    if not records:
        return _Parts(c, [], [], [], busy)
    own = _comm_times(records, hw, plan.mesh)
    scale = c["comm"] / sum(own) if sum(own) > 0 else 0.0
    full = [o * scale for o in own]
    prefetch = hw is None or hw.weight_prefetch
    can = [plan.settings.overlap or (prefetch and r.weight) or r.looped for r in records]
    exposed_all = min(c["comm"], max(0.0, c["time"] + c["beside"] - busy - serial))
    overlappable = sum(f for f, o in zip(full, can) if o)
    share = min(1.0, (c["comm"] - exposed_all) / overlappable) if overlappable > 0 else 0.0
    hidden = [f * share if o else 0.0 for f, o in zip(full, can)]
    if sum(hidden) > busy + _TINY:  # (the hidden parts fill the busy time at most, but for rounding)
        busy = sum(hidden)
    branch = sum(f for f, o, r in zip(full, can, records) if r.beside and not o)
    share = min(1.0, c["beside"] / branch) if branch > 0 else 0.0
    beside = [f * share if r.beside and not o else 0.0 for f, o, r in zip(full, can, records)]
    exposed = [f - h - b for f, h, b in zip(full, hidden, beside)]
    left, drawn = max(0.0, c["time"] - busy - serial), sum(exposed)
    return _Parts(c, hidden, [e * left / drawn for e in exposed] if drawn > 0 else exposed, beside, busy)


def _comm_times(records: list[CollectiveRecord], hw: Hardware | None, mesh: Mesh) -> list[float]:
    """Each collective's time as the cost model priced it or, where a record lacks it, as estimated."""
    if all(r.time > 0 for r in records):
        return [r.time for r in records]
    own = []
    for r in records:
        if hw is None:
            own.append(r.wire_bytes)
            continue
        g = mesh.group_size(_group_atoms(r.group, mesh))
        rings = 2 if r.kind == "all_reduce" else 1
        own.append(hw.collective_latency + rings * (g - 1) * hw.hop_latency + r.wire_bytes / hw.collective_bandwidth(r.axes))
    return own


def _hardware(name: str) -> Hardware | None:
    """The plan's hardware profile, or None when it cannot be read here (cpu-local not calibrated)."""
    try:
        return get_hardware(name)
    except ShardwiseError:
        return None


def _group_atoms(group: str, mesh: Mesh) -> tuple[str, ...]:
    """The atoms of a collective's group as a record writes it: "yz" (whole axes) or "{x,z0}" (parts)."""
    parts = group[1:-1].split(",") if group.startswith("{") else list(group)
    atoms: list[str] = []
    for p in parts:
        atoms += mesh.axis_atoms(p) if p in ("x", "y", "z") else [p]
    return tuple(atoms)


def _collective_name(rec: CollectiveRecord) -> str:
    return f"{rec.kind.replace('_', '-')}({rec.group})"


def _slice(name: str, cat: str, ts: float, dur: float, pid: int, args: dict, tid: int = PREDICTED_TID) -> dict:
    return {"name": name, "cat": cat, "ph": "X", "ts": round(ts, 3), "dur": round(dur, 3), "pid": pid, "tid": tid,
            "args": args}


def _lane_names(rank: int, lane: str, tid: int) -> list[dict]:
    return [{"name": "process_name", "ph": "M", "pid": rank, "tid": tid, "args": {"name": f"rank {rank}"}},
            {"name": "process_sort_index", "ph": "M", "pid": rank, "tid": tid, "args": {"sort_index": rank}},
            {"name": "thread_name", "ph": "M", "pid": rank, "tid": tid, "args": {"name": lane}}]


# ------------------------------------------------------------------------------------ checking
def check_trace(trace: Any) -> None:
    """Raise a ShardwiseError unless `trace` is a trace Perfetto reads as intended: a dict with a
    `traceEvents` list; every complete slice (ph "X") with a name, numeric ts ≥ 0 and dur ≥ 0, pid and
    tid; on every lane (pid, tid) slices in order of start and properly nested (each one either inside
    the slice still open before it, or after it)."""
    if not isinstance(trace, dict) or not isinstance(trace.get("traceEvents"), list):
        raise ShardwiseError(f"a trace must be a dict with a 'traceEvents' list; found {type(trace).__name__} "
                             f"with keys {sorted(trace) if isinstance(trace, dict) else '-'}")
    open_slices: dict[tuple, list[tuple[float, float, str]]] = defaultdict(list)
    last_start: dict[tuple, float] = {}
    for i, e in enumerate(trace["traceEvents"]):
        missing = [k for k in ("name", "ph", "pid", "tid") if k not in e]
        if missing:
            raise ShardwiseError(f"trace event {i} ({e!r:.120}) lacks {', '.join(missing)}: every event needs a name, "
                                 f"ph, pid and tid")
        if e["ph"] != "X":
            continue
        ts, dur = e.get("ts"), e.get("dur")
        if not all(isinstance(v, (int, float)) and v >= 0 for v in (ts, dur)):
            raise ShardwiseError(f"slice {e['name']!r} (event {i}) has ts={ts!r}, dur={dur!r}: expected numbers ≥ 0")
        lane = (e["pid"], e["tid"])
        if ts < last_start.get(lane, 0.0):
            raise ShardwiseError(f"slice {e['name']!r} (event {i}) starts at {ts} µs on lane pid {lane[0]} tid {lane[1]}, "
                                 f"before the slice before it ({last_start[lane]} µs): a lane's slices must come in "
                                 f"order of start")
        last_start[lane] = ts
        stack = open_slices[lane]
        while stack and ts >= stack[-1][1] - _EPS:
            stack.pop()
        if stack and ts + dur > stack[-1][1] + _EPS:
            raise ShardwiseError(f"slice {e['name']!r} (event {i}, {ts}–{ts + dur} µs) starts inside "
                                 f"{stack[-1][2]!r} (until {stack[-1][1]} µs) and ends after it on lane pid {lane[0]} "
                                 f"tid {lane[1]}: slices on one lane must nest")
        stack.append((ts, ts + dur, e["name"]))


_EPS = 0.01  # µs: rounding of ts and dur to nanoseconds
_TINY = 1e-6  # µs: a part of a collective this short is rounding, not drawn


def lanes(trace: dict) -> dict[tuple[int, int], list[dict]]:
    """The complete slices of each lane (pid, tid), in order."""
    out: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for e in trace["traceEvents"]:
        if e.get("ph") == "X":
            out[(e["pid"], e["tid"])].append(e)
    return dict(out)
