"""Measured timelines from real ranks, merged rank by rank with the predicted one.

On each rank (a torchrun script, or the real-rank worker), the step is profiled with torch.profiler and
exported as a Chrome trace of that rank:

    program = plan.emit(rank)
    profile_step(lambda: program(*args), f"traces/rank{rank}.json", rank=rank)

then, in one process, the ranks' traces are merged with the plan's predicted trace:

    merged = merge_traces({r: f"traces/rank{r}.json" for r in range(n)}, predicted_trace(plan))
    write_trace(merged, "compare.trace.json")           # open it at ui.perfetto.dev
    step_times(merged)                                    # rank → predicted and measured ms per step

In the merged trace every rank is one process (`pid` = rank, "rank r"): lane 0 holds the prediction, the
following lanes the rank's measured threads (and GPU streams), each named "measured: ...". Each rank's
measured events are shifted so that its first profiled step starts at 0, as the predicted step does,
so the two read side by side lane by lane.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..drivers.profile import STEP, profile_step  # noqa: F401  (part of this module's face)
from ..errors import ShardwiseError
from .trace import PREDICTED_TID, check_trace, lanes


def load_trace(source: str | Path | dict) -> dict:
    """A Chrome trace from a file (or as given), with a `traceEvents` list, else a ShardwiseError."""
    if isinstance(source, dict):
        trace = source
    else:
        path = Path(source)
        try:
            trace = json.loads(path.read_text())
        except FileNotFoundError:
            raise ShardwiseError(f"trace file {str(path)!r} does not exist: expected the Chrome trace a rank "
                                 f"exported (profile_step, export_chrome_trace); check the path") from None
        except json.JSONDecodeError as e:
            raise ShardwiseError(f"trace file {str(path)!r} is not JSON ({e.msg} at line {e.lineno}): expected a "
                                 f"Chrome trace; was the export interrupted? Profile the rank again") from None
    if not isinstance(trace, dict) or not isinstance(trace.get("traceEvents"), list):
        raise ShardwiseError(f"{source if not isinstance(source, dict) else 'the trace'} has no 'traceEvents' list: "
                             f"expected a Chrome trace (a JSON object with traceEvents)")
    return trace


def merge_traces(measured: dict[int, str | Path | dict], predicted: dict | None = None) -> dict:
    """One trace with a process per rank: the predicted lane (from `predicted_trace`) and that rank's
    measured lanes, shifted to start with its first profiled step at 0. `measured`: rank → its trace."""
    if not measured:
        raise ShardwiseError("merge_traces got no measured trace: expected {rank: trace file} for at least one rank")
    events: list[dict] = []
    if predicted is not None:
        check_trace(predicted)
        events += predicted["traceEvents"]
    named = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    for rank, source in sorted(measured.items()):
        if not isinstance(rank, int) or rank < 0:
            raise ShardwiseError(f"measured trace key {rank!r}: expected a rank (a whole number ≥ 0)")
        events += _rank_events(rank, load_trace(source), name_process=rank not in named)
    slices = sorted((e for e in events if e.get("ph") == "X"), key=lambda e: (e["pid"], e["tid"], e["ts"], -e["dur"]))
    merged = {"traceEvents": [e for e in events if e.get("ph") != "X"] + slices, "displayTimeUnit": "ms",
              "otherData": {"source": "shardwise: predicted and measured, merged by rank",
                            **((predicted or {}).get("otherData") or {})}}
    check_trace(merged)
    return merged


def _rank_events(rank: int, trace: dict, *, name_process: bool) -> list[dict]:
    """A rank's measured events moved into process `rank`: each of its (pid, tid) lanes becomes a lane of
    that process after the predicted one, its timestamps shifted so its first step starts at 0."""
    raw = trace["traceEvents"]
    starts = [e["ts"] for e in raw if e.get("ph") == "X" and str(e.get("name", "")).startswith(STEP)]
    starts = starts or [e["ts"] for e in raw if e.get("ph") == "X" and isinstance(e.get("ts"), (int, float))]
    if not starts:
        raise ShardwiseError(f"the measured trace of rank {rank} holds no slice (ph 'X'): expected a profiled step; "
                             f"profile it with report.measure.profile_step")
    origin = min(starts)
    names = {(e.get("pid"), e.get("tid")): e["args"].get("name") for e in raw
             if e.get("ph") == "M" and e.get("name") == "thread_name" and isinstance(e.get("args"), dict)}
    lane: dict[tuple, int] = {}
    for e in raw:  # the lanes: those that hold slices, in order of appearance
        if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) not in lane:
            lane[(e.get("pid"), e.get("tid"))] = PREDICTED_TID + 1 + len(lane)
    out: list[dict] = []
    for e in raw:  # metadata is rewritten below, events of other lanes (profiler markers) and before the step dropped
        key = (e.get("pid"), e.get("tid"))
        if e.get("ph") == "M" or key not in lane or not isinstance(e.get("ts"), (int, float)) or e["ts"] < origin:
            continue
        out.append({**e, "pid": rank, "tid": lane[key], "ts": round(e["ts"] - origin, 3)})
    meta = [{"name": "thread_name", "ph": "M", "pid": rank, "tid": t,
             "args": {"name": f"measured: {names.get(k) or f'pid {k[0]} tid {k[1]}'}"}} for k, t in lane.items()]
    meta += [{"name": "thread_sort_index", "ph": "M", "pid": rank, "tid": t, "args": {"sort_index": t}}
             for t in lane.values()]
    if name_process:
        meta.append({"name": "process_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": f"rank {rank}"}})
    return meta + out


def step_times(trace: dict) -> dict[int, dict[str, float]]:
    """Per rank of a merged trace: the predicted step (the sum of the top-level slices of the predicted
    lane) and the measured one (the median of its "shardwise step" slices), in ms; absent sides are
    left out."""
    out: dict[int, dict[str, float]] = {}
    for (pid, tid), slices in lanes(trace).items():
        row = out.setdefault(pid, {})
        if tid == PREDICTED_TID:
            end = 0.0
            total = 0.0
            for e in slices:
                if e["ts"] >= end - 0.01 and e.get("cat") != "step":  # top level: starts after the last ended
                    total += e["dur"]
                    end = e["ts"] + e["dur"]
            row["predicted_ms"] = total / 1e3
        else:
            steps = sorted(e["dur"] for e in slices if str(e["name"]).startswith(STEP))
            if steps and "measured_ms" not in row:
                row["measured_ms"] = steps[len(steps) // 2] / 1e3
    return out
