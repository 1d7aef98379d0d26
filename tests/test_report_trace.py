"""Timelines: the predicted Chrome trace of a plan, and measured per-rank traces merged with it.

Perfetto reads a trace whose slices have name/ph/ts/dur/pid/tid and nest on each lane; the predicted
step must last exactly the plan's latency and every collective must carry its bytes. Measured traces
come from torch.profiler (`export_chrome_trace`) on real calls of a rank's emitted program.
"""

import json

import pytest

import shardwise
from shardwise.errors import ShardwiseError
from shardwise.models import example_inputs
from shardwise.report.measure import STEP, load_trace, merge_traces, profile_step, step_times
from shardwise.report.trace import PREDICTED_TID, check_trace, lanes, predicted_trace, write_trace


@pytest.fixture(scope="module")
def prefill_512():
    """Table 2's high-throughput prefill: weight all-gathers that overlap compute, and some that do not."""
    return shardwise.plan("palm-540b", mesh="4x4x4", phase="prefill", batch=512, seq=2048, context=2048,
                          weight_dtype="bf16")


def top_level(slices):
    out, end = [], 0.0
    for e in slices:
        if e["ts"] >= end - 0.01:
            out.append(e)
            end = e["ts"] + e["dur"]
    return out


def test_predicted_trace_structure(prefill_512, tmp_path):
    """Would catch: a missing field, a lane out of order or overlapping without nesting, a step that does
    not last the plan's latency, collectives without bytes or group ranks."""
    plan = prefill_512
    trace = predicted_trace(plan, ranks=[0, 5])
    check_trace(trace)
    path = write_trace(trace, tmp_path / "plan.trace.json")
    again = json.loads(path.read_text())
    assert again["traceEvents"] == trace["traceEvents"]
    slices = [e for e in again["traceEvents"] if e["ph"] == "X"]
    assert all({"name", "ph", "ts", "dur", "pid", "tid"} <= e.keys() for e in slices)
    by_lane = lanes(again)
    assert set(by_lane) == {(0, PREDICTED_TID), (5, PREDICTED_TID)}
    names = {e["args"]["name"] for e in again["traceEvents"] if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {"rank 0", "rank 5"}
    for lane in by_lane.values():
        assert [e["ts"] for e in lane] == sorted(e["ts"] for e in lane)  # monotonic per lane
        layers = top_level(lane)
        assert sum(l.count for l in plan.layers) == len(layers)  # every block, one after another
        assert sum(e["dur"] for e in layers) == pytest.approx(plan.totals.latency * 1e6, rel=1e-6)
        collectives = [e for e in lane if e["cat"] == "collective"]
        expected = sum(len(l.collectives) * l.count for l in plan.layers)
        # each collective once, or twice where only part of it is hidden (its hidden part, its exposed rest)
        assert expected <= len(collectives) < 2 * expected and all(e["args"]["bytes"] > 0 for e in collectives)
        assert sum(e["dur"] for e in collectives) == pytest.approx(sum(l.cost["comm"] * l.count for l in plan.layers)
                                                                   * 1e6, rel=1e-6)  # as priced
        assert any(e["args"]["overlapped"] for e in collectives)  # prefetched weight all-gathers
        assert any(not e["args"]["overlapped"] for e in collectives)
        head = [e for e in collectives if e["args"]["time_ms"] > 20 and e["args"]["weight"]
                and e["ts"] >= layers[-1]["ts"]]  # the head's weight gather: longer than the head's memory time
        assert [e["args"]["overlapped"] for e in head] == [True, False]
        assert sum(e["dur"] for e in head) == pytest.approx(head[0]["args"]["time_ms"] * 1e3, rel=1e-6)
    ag = next(e for e in by_lane[(5, 0)] if e["cat"] == "collective" and e["args"]["group"] == "xyz")
    assert ag["args"]["ranks"] == list(range(64))


def test_each_layer_lasts_its_predicted_time(prefill_512):
    """Would catch a layer whose slices add up to more or less than the cost model's time for it."""
    trace = predicted_trace(prefill_512, ranks=[0])
    lane = lanes(trace)[(0, 0)]
    layers = top_level(lane)
    times = [l.cost["time"] * 1e6 for l in prefill_512.layers for _ in range(l.count)]
    assert [e["dur"] for e in layers] == pytest.approx(times, rel=1e-6, abs=2e-3)
    for e in layers:
        inside = [c for c in lane if e["ts"] <= c["ts"] < e["ts"] + e["dur"] - 0.01]  # ts, dur in ns
        assert all(c["ts"] + c["dur"] <= e["ts"] + e["dur"] + 0.01 for c in inside)


def _check_layers(plan, trace, rank=0):
    """check_trace passes; every layer's slice lasts its planned time and holds its own slices."""
    check_trace(trace)
    lane = lanes(trace)[(rank, PREDICTED_TID)]
    layers = top_level(lane)
    times = [l.cost["time"] * 1e6 for l in plan.layers for _ in range(l.count)]
    assert [e["dur"] for e in layers] == pytest.approx(times, rel=1e-6, abs=2e-3)
    for e in layers:
        inside = [c for c in lane if e["ts"] <= c["ts"] < e["ts"] + e["dur"] - 0.01]
        assert all(c["ts"] + c["dur"] <= e["ts"] + e["dur"] + 0.01 for c in inside)
    return lane, layers


def test_looped_collectives_are_drawn_hidden(tiny):
    """A looped collective matmul's ring steps run beside its partial matmuls: the part of the collective
    the cost model hides (comm_overlap · min(looped, busy)) is a child of the busy slice, the rest runs
    after it. Would catch looped collectives drawn exposed whole (the layer's slices then outlast it)."""
    from shardwise.models import example_inputs

    model = tiny("ref-tiny")
    args, kwargs = example_inputs(model, 8, 16)
    plan = shardwise.plan(model, args, kwargs, mesh="2x2x1", layouts="ffn=ws1d,attn=heads", collective_matmul=True)
    looped = [r for l in plan.layers for r in l.collectives if r.looped]
    assert looped and all(r.time > 0 for r in looped)
    lane, layers = _check_layers(plan, predicted_trace(plan, ranks=[0]))
    busy = [e for e in lane if e["cat"] == "busy"]
    for layer in layers:
        mine = [e for e in lane if layer["ts"] <= e["ts"] < layer["ts"] + layer["dur"] - 0.01 and e["cat"] == "collective"]
        row = next(l for l in plan.layers if l.name == layer["name"])
        assert sum(e["dur"] for e in mine) == pytest.approx(row.cost["comm"] * 1e6, abs=0.01)  # ts, dur in ns
        for e in mine:
            if e["args"]["overlapped"]:  # only looped ones here (no weight gathers under ws1d)
                assert e["args"]["looped"]
                b = next(b for b in busy if b["ts"] <= e["ts"] and e["ts"] + e["dur"] <= b["ts"] + b["dur"] + 0.01)
                assert layer["ts"] <= b["ts"] < layer["ts"] + layer["dur"]
    hidden = [e for e in lane if e["cat"] == "collective" and e["args"]["overlapped"]]
    assert hidden and all(e["args"]["looped"] for e in hidden)
    # the tiny model's busy time is far shorter than its collectives: each looped one mostly runs after it
    for e in hidden:
        rest = next(x for x in lane if x["cat"] == "collective" and not x["args"]["overlapped"] and x["ts"] > e["ts"]
                    and x["name"] == e["name"] and x["args"]["time_ms"] == e["args"]["time_ms"])
        assert e["dur"] + rest["dur"] == pytest.approx(e["args"]["time_ms"] * 1e3, abs=2e-3)


def test_steps_and_rank_errors(prefill_512):
    trace = predicted_trace(prefill_512, ranks=[1], steps=3)
    check_trace(trace)
    assert [e["name"] for e in trace["traceEvents"] if e.get("cat") == "step"] == ["step 0", "step 1", "step 2"]
    with pytest.raises(ShardwiseError, match="expected a rank of mesh 4x4x4"):
        predicted_trace(prefill_512, ranks=[64])
    with pytest.raises(ShardwiseError, match="at least one rank"):
        predicted_trace(prefill_512, ranks=[])
    with pytest.raises(ShardwiseError, match="positive number of steps"):
        predicted_trace(prefill_512, steps=0)


def test_check_trace_refuses_what_perfetto_would_misdraw():
    """Would catch a checker that lets through slices out of order, overlapping or lacking fields."""
    ok = {"name": "a", "ph": "X", "ts": 0, "dur": 10, "pid": 0, "tid": 0}
    check_trace({"traceEvents": [ok, {**ok, "name": "b", "ts": 2, "dur": 3}, {**ok, "name": "c", "ts": 10}]})
    with pytest.raises(ShardwiseError, match="must nest"):
        check_trace({"traceEvents": [ok, {**ok, "name": "b", "ts": 5, "dur": 10}]})
    with pytest.raises(ShardwiseError, match="order of start"):
        check_trace({"traceEvents": [{**ok, "ts": 20}, ok]})
    with pytest.raises(ShardwiseError, match="lacks pid"):
        check_trace({"traceEvents": [{k: v for k, v in ok.items() if k != "pid"}]})
    with pytest.raises(ShardwiseError, match="traceEvents"):
        check_trace([ok])


def test_measured_traces_merge_with_the_prediction(tiny, tmp_path):
    """Real torch.profiler exports of a rank's emitted program, one per rank, merged lane by lane with the
    predicted trace: would catch measured events left in their own processes, not shifted to the step's
    start, or a merged trace Perfetto would misdraw."""
    from shardwise.models import example_inputs

    model = tiny("ref-tiny")
    args, kwargs = example_inputs(model, 4, 8)
    plan = shardwise.plan(model, args, kwargs, mesh="1x1x1")
    program = plan.emit(0, group_name=lambda atoms: "unused")  # one chip: no collective to run
    paths = {r: profile_step(lambda: program(*args, **kwargs), tmp_path / f"rank{r}.json", rank=r, steps=2)
             for r in (0, 1)}
    assert load_trace(paths[0])["traceEvents"]  # what export_chrome_trace wrote
    merged = merge_traces(paths, predicted_trace(plan))
    check_trace(merged)
    by_lane = lanes(merged)
    assert {pid for pid, _ in by_lane} == {0, 1}
    assert (0, PREDICTED_TID) in by_lane and any(pid == 0 and tid > PREDICTED_TID for pid, tid in by_lane)
    for (pid, tid), slices in by_lane.items():
        if tid != PREDICTED_TID:
            steps = [e for e in slices if e["name"].startswith(STEP)]
            assert steps and min(e["ts"] for e in slices) == 0.0 == steps[0]["ts"]
    threads = [e["args"]["name"] for e in merged["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"]
    assert "predicted (cost model)" in threads and any(t.startswith("measured: ") for t in threads)
    times = step_times(merged)
    assert times[0]["predicted_ms"] == pytest.approx(plan.totals.latency * 1e3, abs=1e-5)  # ts, dur rounded to ns
    assert times[0]["measured_ms"] > 0 and times[1]["measured_ms"] > 0


def test_measured_trace_errors(tmp_path):
    with pytest.raises(ShardwiseError, match="does not exist"):
        load_trace(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ShardwiseError, match="is not JSON"):
        load_trace(tmp_path / "bad.json")
    with pytest.raises(ShardwiseError, match="no measured trace"):
        merge_traces({})
    with pytest.raises(ShardwiseError, match="holds no slice"):
        merge_traces({0: {"traceEvents": []}})
    with pytest.raises(ShardwiseError, match="folder does not exist"):
        profile_step(lambda: None, tmp_path / "missing" / "rank0.json", rank=0)


# ------------------------------------------------------------------ a parallel block's feed-forward beside its attention
def _check_beside(plan):
    """check_trace passes, every layer lasts its planned time, holds its own slices, and its collectives' parts
    add up: what a parallel feed-forward hides of its attention's is a child of that one's busy slice."""
    trace = predicted_trace(plan, ranks=[0])
    check_trace(trace)
    lane = lanes(trace)[(0, PREDICTED_TID)]
    layers = top_level(lane)
    assert [e["dur"] for e in layers] == pytest.approx([l.cost["time"] * 1e6 for l in plan.layers for _ in range(l.count)],
                                                       rel=1e-6, abs=2e-3)
    collectives = [e for e in lane if e["cat"] == "collective"]
    assert sum(e["dur"] for e in collectives) == pytest.approx(
        sum(l.cost["comm"] * l.count for l in plan.layers) * 1e6, abs=5e-4 * len(collectives))  # each as priced (ns)
    guests = [e for e in collectives if "layer" in e["args"]]
    for e in layers:
        inside = [c for c in lane if e["ts"] <= c["ts"] < e["ts"] + e["dur"] - 0.01]
        assert all(c["ts"] + c["dur"] <= e["ts"] + e["dur"] + 0.01 for c in inside)
        busy = next((c for c in inside if c["cat"] == "busy"), None)
        for g in (c for c in inside if c in guests):
            assert g["args"]["overlapped"] and g["args"]["beside"] == e["name"] and e["cat"] == "ffn"
            assert g["args"]["layer"].replace("attn", "") == e["name"].replace("mlp", "")  # the same block
            assert busy["ts"] <= g["ts"] and g["ts"] + g["dur"] <= busy["ts"] + busy["dur"] + 0.01
    return lane, layers, guests


def test_trace_draws_the_hidden_part_in_the_ffn(tiny):
    """a100-80g (branch_overlap = comm_overlap = 1): the feed-forward's busy time hides part of each block's
    heads→batch all-to-alls (the tiny model's busy time is far shorter): that part in the feed-forward's
    slice, the rest in the attention's."""
    m = tiny("ref-tiny-parallel")
    plan = shardwise.plan(m, *example_inputs(m, 8, 16), mesh="1x1x4", layouts="ffn=ws1d,attn=batch",
                          hardware="a100-80g")
    attn = [l for l in plan.layers if str(l.kind) == "attention"]
    assert attn and all(l.cost["beside"] > 0 for l in attn)
    lane, _, guests = _check_beside(plan)
    assert len(guests) == sum(1 for l in attn for r in l.collectives if r.beside)
    for g in guests:
        rest = [e for e in lane if e["cat"] == "collective" and e["args"].get("beside") == g["args"]["beside"]
                and "layer" not in e["args"] and e["name"] == g["name"] and e["ts"] < g["ts"]]
        assert rest and not rest[-1]["args"]["overlapped"]
        assert g["dur"] + rest[-1]["dur"] == pytest.approx(g["args"]["time_ms"] * 1e3, abs=2e-3)
    for l in attn:
        assert sum(g["dur"] for g in guests if g["args"]["layer"] == l.name) == pytest.approx(l.cost["beside"] * 1e6,
                                                                                            abs=2e-3)


def test_trace_of_block_runs_on_a_gpu():
    """PaLM 8B decode on 8 A100s: every block's all-to-alls wholly hidden in its own feed-forward's slice, row
    by row of a run of 32 blocks; with collective matmuls too."""
    for loop in (False, True):
        plan = shardwise.plan("palm-8b", mesh="2x2x2", phase="decode", batch=64, seq=1, context=2048,
                              hardware="a100-80g", layouts="ffn=ws1d,attn=batch", collective_matmul=loop)
        attn = next(l for l in plan.layers if str(l.kind) == "attention")
        assert attn.count == 32 and attn.cost["beside"] > 0
        *_, guests = _check_beside(plan)
        assert {g["args"]["layer"] for g in guests} == {f"blocks.{i}.attn" for i in range(32)}
