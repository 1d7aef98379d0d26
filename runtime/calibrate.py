"""`shardwise calibrate`: measure this machine into the `cpu-local` hardware profile.

A "chip" here is one rank: a single-threaded process, with all `ranks` processes running at once, as
real ranks do (torchrun, OMP_NUM_THREADS=1). So every figure is measured by every rank concurrently:
  peak_flops      float32 matmul FLOP/s of one rank (2·n³ per n×n×n product) with the kernel rank programs
                  multiply with (runtime/kernels.py: oneDNN's), every rank computing at once (a barrier
                  before each repeat), each repeat the slowest rank's time, median over repeats
  matmul_shapes   the same kernel's FLOP/s on a grid of [m, k]·[k, n] shapes (m 16 to 1024, k and n 256 to
                  4096), measured the same way: the cost model prices each matmul at its own shape's
  hbm_bandwidth   bytes/s of one rank's large tensor copy (read + write), measured the same way
  elementwise_bandwidth  bytes/s (read + written) of eager pointwise ops (silu, a product) over a
                  feed-forward's hidden activation, timed right after the matmuls that make it, on their
                  fresh outputs, as a program runs them
  link_bandwidth  gloo all-gather over the `ranks` processes on 127.0.0.1: the slope of time vs wire
  collective_latency   bytes, fitted by least squares over message sizes from 4 KiB to 16 MiB; each
                  collective timed as a rank program runs it, after compute (`collective_times`)
  comm_overlap    how much of a gloo all-gather of a weight's size (16 MiB out) a loop of the programs' linears
                  about twice its length, run while the gather is in flight (started, computed, then waited),
                  hides: (t_comm + t_compute − t_both) / min(t_comm, t_compute) of the slowest rank's times,
                  clamped to 0..1, mean over repeats. gloo runs
                  collectives on its own threads, so overlap is possible in principle, but with more ranks
                  than cores its threads compete with the ranks' compute
  collectives     the same least-squares fit for each kind shardwise emits (all-gather, reduce-scatter,
                  all-reduce, all-to-all) over the whole world and over groups of 2 (all pairs at once): gloo
                  implements each differently, and a mesh axis of 2 is another ring than all ranks; the cost
                  model uses the fit of a collective's own kind and group size where there is one. Above
                  16 MiB a line from each size to the next (32, 64 MiB; `fit_lines`): larger collectives
                  here take more time per byte than the small ones' line gives
  sync_waits      what a collective takes beyond its `collectives` price when the ranks computed longer since
                  their last one (1, 4 and 16 times the collectives' 1 ms of compute before it; every rank at
                  once, over the world and over every pair at once): with more ranks than cores they drift
                  apart while they compute, and the last to arrive holds the others, their cores idle
  relayout_copies whether the local copy around a collective over a dim other than the first (an
                  all-gather merging its blocks) shows in a step here: priced when a 16 MiB all-gather over
                  dim 1 takes at least half that copy's time at the measured bandwidth more than one over dim 0
The efficiencies are 1: these are what this machine achieves, not peaks to discount. Saved as JSON
(shardwise/ir/hardware.py reads it for --hardware cpu-local); the profile describes `ranks` ranks.
"""

from __future__ import annotations

import datetime
import os
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..ir.hardware import CPU_LOCAL, Hardware, cpu_local_path
from .heap import steady_heap
from .kernels import linear

SIZES = [4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20]  # charged bytes of the collectives one line is fitted to
# larger collectives, each priced by a line from the size below it: here their time grows faster than their
# bytes (a 64 MiB all-gather over 4 ranks took 155-173 ms against 61-63 ms on the line through SIZES)
LARGE_SIZES = [32 << 20, 64 << 20]
CONTEXT_S = 1e-3  # the compute before each collective in its measurement: a rank program's op between two


def _median_time(fn, repeats: int = 7, warmup: int = 2, *, together: bool = False) -> float:
    """Median seconds of `fn` over `repeats` after `warmup` calls. `together` (inside the process group): every
    rank starts each repeat at once (a barrier) and a repeat takes the slowest rank's time, as a step does.
    Timed each on its own, one rank can find a core to itself while the others wait, and measure twice
    the FLOP/s that ranks computing together get (one calibration here saw 36, 35, 36 and 84 GFLOP/s)."""
    for _ in range(warmup):
        fn()
    if together:
        return statistics.median(_slowest(_started_together(fn)) for _ in range(repeats))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _started_together(fn) -> float:
    """This rank's seconds of `fn`, every rank starting it at once (a barrier first)."""
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _slowest(seconds: float) -> float:
    """The largest of every rank's `seconds` (a step ends when its last rank does)."""
    import torch.distributed as dist

    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _context_compute():
    """A matmul loop of about CONTEXT_S, the same number of matmuls on every rank: what a rank program
    computes between two collectives, run before each collective these measurements time."""
    import torch.distributed as dist

    a, b = torch.randn(256, 256), torch.randn(256, 256)
    k = torch.tensor([max(1, round(CONTEXT_S / _median_time(lambda: torch.mm(a, b))))])
    dist.all_reduce(k, op=dist.ReduceOp.MAX)
    k = int(k)

    def compute():
        for _ in range(k):
            torch.mm(a, b)

    return compute


FLOPS_N = 1024  # n of the n³ matmuls FLOP/s is measured on: about 50 ms each here, as a program's projections


def matmul_flops(n: int = 1024, calls: int = 1, *, together: bool = False, repeats: int = 7) -> float:
    """FLOP/s of n×n×n float32 matmuls. With `together`, n must make each call long against the scheduler's
    slices: 512³ matmuls (6 ms each, four per repeat) gave bimodal repeats here (43 or 88 GFLOP/s, as the four
    ranks happened to run side by side or in turn on two cores) and calibrations 20 to 43 GFLOP/s apart;
    1024³ (a program's projection at 1024 tokens) gave 40 to 46 within and across runs."""
    a, b = torch.randn(n, n), torch.randn(n, n)

    def loop():
        for _ in range(calls):
            linear(a, b)

    return 2 * n**3 * calls / _median_time(loop, repeats=repeats, together=together)


GEMM_M, GEMM_KN = (16, 64, 256, 1024), (256, 1024, 4096)  # the grid of local matmul shapes FLOP/s is measured at
GEMM_REPEAT_S = 0.03  # at least this long a repeat (several calls of a small shape)


def matmul_grid(peak: float, rounds: int) -> list[tuple[int, int, int, float]]:
    """[(m, k, n, FLOP/s)] of the rank programs' linear (runtime/kernels.py) on [m, k]·[k, n] for every m in
    GEMM_M and k, n in GEMM_KN, every rank at once: each time at least GEMM_REPEAT_S (calls of the shape, as
    many as `peak` FLOP/s says fill it) and the slowest rank's; in rounds that time every shape once, the
    order rotating, so a slow minute of the machine falls on all shapes alike; median over rounds. (Timed
    shape after shape instead, two calibrations put one shape 10% apart and the grid's neighbours 43 to
    53 GFLOP/s apart, without a pattern between them.)"""
    shapes = [(m, k, n) for m in GEMM_M for k in GEMM_KN for n in GEMM_KN]
    loops = {}
    for m, k, n in shapes:
        a, w = torch.randn(m, k), torch.randn(n, k)
        calls = max(1, round(GEMM_REPEAT_S * peak / (2 * m * k * n)))

        def loop(a=a, w=w, calls=calls):
            for _ in range(calls):
                linear(a, w)

        loop()  # warm-up: oneDNN sets each shape up once
        loops[(m, k, n)] = (loop, calls)
    times: dict = {shape: [] for shape in shapes}
    for r in range(rounds):
        for shape in shapes[r % len(shapes):] + shapes[:r % len(shapes)]:
            times[shape].append(_slowest(_started_together(loops[shape][0])))
    return [(m, k, n, 2 * m * k * n * loops[(m, k, n)][1] / statistics.median(times[(m, k, n)])) for m, k, n in shapes]


def call_overhead(n: int = 64, calls: int = 200, *, together: bool = False) -> float:
    """Seconds one small matmul call costs ([1, n] · [n, n]: its FLOPs are nothing): what a mixture's
    experts pay per touched expert and projection beyond their FLOPs and bytes."""
    a, b = torch.randn(1, n), torch.randn(n, n)

    def loop():
        for _ in range(calls):
            torch.mm(a, b)

    return _median_time(loop, together=together) / calls


def memory_bandwidth(nbytes: int = 256 << 20, *, together: bool = False) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    return 2 * nbytes / _median_time(lambda: dst.copy_(src), repeats=5, together=together)


ELEMENTWISE_SHAPE = (1024, 4096)  # a feed-forward's hidden activation at 1024 tokens


def elementwise_bandwidth(rounds: int) -> float:
    """Bytes/s (read + written) of eager pointwise ops over an activation, in context: a SwiGLU feed-forward's
    silu(h1) · h2 (silu reads and writes the hidden activation, the product reads two and writes one: 5 passes
    of its bytes), timed alone right after the matmuls that make h1 = x·W1 and h2 = x·W2, on their fresh
    outputs, as a program runs it; all ranks at once (a barrier after the matmuls), each round the slowest
    rank's, median over rounds.

    Timed directly: an earlier version took a whole feed-forward less its matmuls alone, and the pointwise
    ops' few ms were lost in the matmuls' noise (three calibrations gave 5.8 to 9.8 GB/s, and one a
    difference of nothing). Timed so, six calibrations gave 7.4 to 10.0 GB/s: steadier, not steady."""
    import torch.distributed as dist

    rows, cols = ELEMENTWISE_SHAPE
    e = 256  # d_model of the feed-forward
    x, w1, w2 = torch.randn(rows, e), torch.randn(cols, e), torch.randn(cols, e)
    seconds = []
    for r in range(rounds + 1):  # the first round warms up
        h1, h2 = linear(x, w1), linear(x, w2)
        dist.barrier()
        t0 = time.perf_counter()
        torch.nn.functional.silu(h1) * h2
        t = _slowest(time.perf_counter() - t0)
        if r:
            seconds.append(t)
        del h1, h2
    return 5 * rows * cols * 4 / statistics.median(seconds)


@dataclass(frozen=True)
class Rounds:
    """How many times each measurement repeats (each figure is a median or mean over them): the one place the
    counts are set; the measurements take them as arguments."""

    flops: int = 9
    # the grid: 7 rounds left each shape's FLOP/s (relative to its grid's median) 2-7% apart between 13
    # calibrations here (median 4%), as large as the compute layouts differ by; the median of those 13 grids
    # ranked the saved bench_layouts runs better for the calibration that ranked them worst (ρ 0.898 → 0.928)
    grid: int = 15
    elementwise: int = 31
    # the collectives and the waits: a 15-round median of a collective's cost moved ±5-17%, a 45-round one
    # ±2-11% (90% of medians resampled from 30 rounds, 4 ranks here), and one calibration's 2-rank all-gather
    # 15% off another's took bench_layouts' ranking at 1024 tokens from ρ 0.965 to 0.898 (its other figures kept)
    collectives: int = 45
    waits: int = 15
    overlap: int = 60
    relayout: int = 9


FULL = Rounds()
# `calibrate --quick`: every measurement, each repeated a few times only; a rough profile in a fraction of the
# time (the full one takes ~6 min here), to try the planner on this machine (rankings are quoted on the full one)
QUICK = Rounds(flops=3, grid=2, elementwise=7, collectives=3, waits=2, overlap=12, relayout=3)


def _gloo_worker(rank: int, world: int, port: int, out, rounds: Rounds = FULL) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    steady = steady_heap()  # the heap shardwise.init() gives the programs' ranks (runtime/heap.py)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    dist.barrier()
    # every rank at once, one thread each, each repeat the slowest rank's time (so every rank has the same figures)
    peak = matmul_flops(FLOPS_N, calls=2, together=True, repeats=rounds.flops)
    local = (peak, memory_bandwidth(64 << 20, together=True), call_overhead(together=True),
             elementwise_bandwidth(rounds.elementwise), steady, matmul_grid(peak, rounds.grid))
    per_rank = [None] * world
    dist.all_gather_object(per_rank, local)
    groups = _groups(rank, world)
    kinds = collective_times(world, groups, rounds.collectives)
    waits = sync_waits(world, groups, rounds.waits)
    overlap = comm_overlap(world, dist.group.WORLD.group_name, rounds.overlap)
    overlaps = [None] * world
    dist.all_gather_object(overlaps, overlap)
    relayout = relayout_cost(world, dist.group.WORLD.group_name, rounds.relayout)
    if rank == 0:
        out.put((per_rank, overlaps, kinds, relayout, waits))
    dist.barrier()
    dist.destroy_process_group()


KINDS = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all")



def _groups(rank: int, world: int) -> dict[int, str]:
    """group size → the name of this rank's group of it: the world, and (an even world over 2) this rank's pair
    of the pairs that split it, as a mesh axis of 2 does (every rank creates every group)."""
    import torch.distributed as dist

    groups = {world: dist.group.WORLD.group_name}
    if world > 2 and world % 2 == 0:
        pairs = [dist.new_group([r, r + 1]) for r in range(0, world, 2)]
        groups[2] = pairs[rank // 2].group_name
    return groups


def collective_times(world: int, groups: dict[int, str], rounds: int,
                     calls: int = 4) -> dict[tuple[str, int], list[tuple[int, float]]]:
    """(kind, group size) → [(charged bytes, seconds)]: each kind of collective shardwise emits, over the whole
    world and over groups of 2 (every pair at once, as a mesh axis of 2 runs them), on tensors whose
    charged bytes (ir/collective.py: all-gather output, reduce-scatter / all-to-all input, all-reduce twice
    its input) are SIZES.

    Each is timed where a rank program runs it: after some compute (a matmul loop of about CONTEXT_S), its
    wait right away. Its cost is what it adds to that compute: (compute, collective) × `calls` minus
    compute × `calls`, the two timed in the same round. Back to back, with nothing between them, collectives
    here cost several times less than in a program: with more ranks than cores, a rank that computes
    holds a core the others' gloo threads need, and the last rank to arrive decides when everyone goes
    on. A round times every collective once (the order rotating from round to round, so the machine's
    other load falls on all of them alike); a time is the slowest rank's; each figure is the median
    over `rounds`. (With 7 rounds, two calibrations minutes apart fitted the 4-rank all-reduce at 1.0 and
    1.4 GB/s, enough to move the ranking of bench_layouts' 1024-token layouts from ρ 0.92 to 0.84.)"""

    c10d = torch.ops._c10d_functional
    keys = [(kind, g, size) for g in groups for kind in KINDS for size in SIZES + LARGE_SIZES]
    steps = {(kind, g, size): _collective_step(c10d, kind, size // 4, g, groups[g]) for kind, g, size in keys}
    compute = _context_compute()

    def repeats(size: int) -> int:  # a large collective is long against the machine's noise: once a round
        return calls if size <= SIZES[-1] else 1

    def timed(n: int, step=None) -> float:
        def run():
            for _ in range(n):
                compute()
                if step is not None:
                    step()

        return _started_together(run)

    for key in keys:  # warm-up: gloo's buffers and pairs set up
        steps[key]()
        steps[key]()
    slowest = _with_and_without(keys, lambda key: timed(repeats(key[2]), steps[key]),
                                lambda key: timed(repeats(key[2])), rounds, world)
    out: dict = {}
    for kind, g, size in keys:
        per_round = [(both - alone) / repeats(size) for both, alone in slowest[(kind, g, size)]]
        out.setdefault((kind, g), []).append((size, max(statistics.median(per_round), 1e-6)))
    return out


def _with_and_without(keys: list, both, alone, rounds: int, world: int) -> dict:
    """key → [(seconds of `both(key)`, seconds of `alone(key)`)] per round, each the slowest rank's: every key
    once a round, the two run back to back, the keys' order rotating from round to round (so the machine's
    other load falls on all of them alike)."""
    import torch.distributed as dist

    raw: dict = {key: [] for key in keys}  # this rank's
    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            raw[key].append((both(key), alone(key)))
    every = [None] * world
    dist.all_gather_object(every, raw)
    return {key: [(max(e[key][i][0] for e in every), max(e[key][i][1] for e in every)) for i in range(rounds)]
            for key in keys}


def _collective_step(c10d, kind: str, n: int, g: int, name: str):
    """One `kind` collective over group `name` of `g` ranks, charged n float32 elements, run and waited."""
    if kind == "all_gather":
        x = torch.ones(n // g)
        return lambda: c10d.wait_tensor(c10d.all_gather_into_tensor(x, g, name))
    if kind == "reduce_scatter":
        x = torch.ones(n)
        return lambda: c10d.wait_tensor(c10d.reduce_scatter_tensor(x, "sum", g, name))
    if kind == "all_reduce":  # in place, as a rank program reduces the buffers nothing else reads (passes/in_place.py)
        x = torch.zeros(n // 2)  # zeros: the sums stay finite however often it runs
        return lambda: c10d.wait_tensor(c10d.all_reduce_(x, "sum", name))
    x = torch.ones(n)
    return lambda: c10d.wait_tensor(c10d.all_to_all_single(x, [n // g] * g, [n // g] * g, name))


SYNC_GAPS = (1, 4, 16)  # the compute before the collective in `sync_waits`, in the collectives' contexts (CONTEXT_S)
SYNC_BYTES = 64 << 10  # its charged bytes: an all-reduce whose own time is short against the wait it measures
SYNC_RUN_S = 0.3  # about this long each timed run


def sync_waits(world: int, groups: dict[int, str], rounds: int) -> list[tuple[int, float, float]]:
    """[(group size, gap s, extra s)]: what a small all-reduce over each group adds after `gap` seconds of
    compute beyond what it adds after the `collectives`' context (the first of SYNC_GAPS, so its extra is 0).

    Measured as `collective_times` measures: (compute, collective) repeated against the compute alone, in the
    same round, each the slowest rank's, the difference per collective; its compute k of the context's
    matmul loops for k in SYNC_GAPS, repeated for about SYNC_RUN_S; the gap is the compute alone's time per
    repeat (every rank at once: the time the cost model prices it at). Each figure the median over
    `rounds`, the keys' order rotating from round to round; an extra below 0 (noise) is taken as 0.
    Measured here (4 ranks, 2 cores), a 64 KiB all-reduce took 6.7, 7.5, 8.4 and 8.1-9.7 ms over the
    world after 1, 4, 8 and 13-51 ms of compute, and 2.5, 3.1, 3.0 and 3.7-4.2 ms over pairs."""

    c10d = torch.ops._c10d_functional
    compute = _context_compute()
    x = torch.zeros(SYNC_BYTES // 8)  # charged twice its bytes (ir/collective.py)
    steps = {g: (lambda name=name: c10d.wait_tensor(c10d.all_reduce_(x, "sum", name))) for g, name in groups.items()}
    unit = _median_time(compute, together=True)
    keys = [(g, k) for g in groups for k in SYNC_GAPS]
    n = {k: max(4, round(SYNC_RUN_S / (k * unit))) for k in SYNC_GAPS}

    def timed(k: int, step=None) -> float:
        def run():
            for _ in range(n[k]):
                for _ in range(k):
                    compute()
                if step is not None:
                    step()

        return _started_together(run)

    for step in steps.values():
        step(), step()
    slowest = _with_and_without(keys, lambda key: timed(key[1], steps[key[0]]), lambda key: timed(key[1]),
                                rounds, world)
    out = []
    for g in groups:
        added, gaps = {}, {}
        for k in SYNC_GAPS:
            added[k] = statistics.median((both - alone) / n[k] for both, alone in slowest[(g, k)])
            gaps[k] = statistics.median(alone for _, alone in slowest[(g, k)]) / n[k]
        out += [(g, gaps[k], max(0.0, added[k] - added[SYNC_GAPS[0]])) for k in SYNC_GAPS]
    return out


RELAYOUT_BYTES = 16 << 20  # the gathered output in the relayout measurement


def relayout_cost(world: int, group: str, rounds: int) -> tuple[float, float]:
    """(seconds an all-gather over dim 1 adds to one over dim 0 of the same bytes, the merge copy's bytes
    read + written): the gather of a [1024, cols / world] block into [1024, cols] as runtime/lower.py
    lowers it (all-gathered stacked, then its blocks merged into dim 1: one copy of the output), against
    the gather of [1024 / world, cols] that needs no copy. Both timed after 1 ms of compute, as a program
    runs them, in alternation; each round the slowest rank's; median over rounds of the difference."""

    c10d = torch.ops._c10d_functional
    rows, cols = 1024, RELAYOUT_BYTES // 4 // 1024
    by_rows = torch.ones(rows // world, cols)
    by_cols = torch.ones(rows, cols // world)
    compute = _context_compute()

    def dim0():
        return c10d.wait_tensor(c10d.all_gather_into_tensor(by_rows, world, group))

    def dim1():
        y = c10d.wait_tensor(c10d.all_gather_into_tensor(by_cols, world, group))
        return y.view(world, rows, cols // world).permute(1, 0, 2).reshape(rows, cols).contiguous()

    def timed(fn) -> float:
        return _slowest(_started_together(lambda: (compute(), fn())))

    dim0(), dim1()
    extra = [timed(dim1) - timed(dim0) for _ in range(rounds)]
    return statistics.median(extra), 2.0 * RELAYOUT_BYTES


def fit_line(rows: list[tuple[int, float]], group: int) -> tuple[float, float]:
    """(latency s ≥ 0, wire bytes/s) by least squares of seconds against wire bytes, (g − 1)/g of charged."""
    wire = [size * (group - 1) / group for size, _ in rows]
    t = [s for _, s in rows]
    n = len(wire)
    mx, my = sum(wire) / n, sum(t) / n
    slope = sum((a - mx) * (b - my) for a, b in zip(wire, t)) / sum((a - mx) ** 2 for a in wire)
    slope = max(slope, 1e-15)  # a flat fit (all latency) still has a finite bandwidth
    return max(my - slope * mx, 0.0), 1.0 / slope


def fit_lines(rows: list[tuple[int, float]], group: int) -> list[tuple[float, float, float | None]]:
    """[(latency s, wire bytes/s, up to wire bytes)] for one kind and group: the least-squares line
    (`fit_line`) over the SIZES, up to the largest of them; then for each of the LARGE_SIZES, the line from
    the price of the size below it to its own time, up to it; the last line also prices anything larger
    (None). A line never rises slower than the one below it (a noisy large time is not taken as
    cheaper bytes than small ones had)."""
    on_wire = (group - 1) / group  # wire bytes per charged byte
    latency, bandwidth = fit_line([(s, t) for s, t in rows if s <= SIZES[-1]], group)
    x0 = SIZES[-1] * on_wire  # where the last line ends, and the price there
    t0, slope = latency + x0 / bandwidth, 1.0 / bandwidth
    lines = [(latency, bandwidth, x0)]
    for size, t in sorted((s, t) for s, t in rows if s > SIZES[-1]):
        x1 = size * on_wire
        slope = max(slope, (t - t0) / (x1 - x0))
        lines.append((t0 - slope * x0, 1.0 / slope, x1))
        t0 += slope * (x1 - x0)
        x0 = x1
    return lines[:-1] + [lines[-1][:2] + (None,)]


OVERLAP_BYTES = 16 << 20  # the all-gather's output in the overlap measurement: a [1024, 4096] float32 weight
OVERLAP_LINEAR = (256, 1024, 1024)  # the compute beside it: [m, k]·[k, n] linears, the rank programs' kernel


def comm_overlap(world: int, group: str, repeats: int) -> list[tuple[float, float, float]]:
    """This rank's (t_comm, t_compute, t_both) per repeat, every rank running it at once: a gloo all-gather
    alone, a loop of linears about twice its length alone, and the two together (the gather started, the
    loop run, then the gather waited); the three run in turn in each repeat, so the machine's other load
    falls on all three alike (barrier before each run). `hidden_fraction` makes one figure of every rank's.

    Measured as a weight-gathered program overlaps: a gather of a weight's size (a feed-forward weight at
    bench_layouts' scale) issued ahead of a layer whose compute outlasts it, that compute the programs'
    linears. An earlier version gathered 4 MiB beside a loop of 256³ products of about its length, 21
    repeats: calibrations gave 0.07 to 0.25, and back to back 0.19 and 0.39, enough to move bench_layouts'
    ranking at 1024 tokens from ρ 0.905 to 0.940 on the same measurements. This one gave 0.09 to 0.19 in six
    trials (40 to 60 repeats each)."""
    c10d = torch.ops._c10d_functional
    x = torch.ones(OVERLAP_BYTES // 4 // world)
    m, k, n = OVERLAP_LINEAR
    a, w = torch.randn(m, k), torch.randn(n, k)

    def comm():
        c10d.wait_tensor(c10d.all_gather_into_tensor(x, world, group))

    def compute(calls):
        for _ in range(calls):
            linear(a, w)

    once = _started_together

    def both():
        y = c10d.all_gather_into_tensor(x, world, group)
        compute(calls)
        c10d.wait_tensor(y)

    comm(), compute(1)  # warm-up: gloo's buffers, oneDNN's shape
    t_comm = statistics.median(_slowest(once(comm)) for _ in range(5))  # (the slowest rank's: the same on every rank)
    calls = max(1, round(2 * t_comm / _median_time(lambda: compute(1), together=True)))
    return [(once(comm), once(lambda: compute(calls)), once(both)) for _ in range(repeats)]  # interleaved: same load


def hidden_fraction(runs: list[list[tuple[float, float, float]]]) -> tuple[float, list[float]]:
    """The fraction of the gather the compute hides, from every rank's `comm_overlap` runs: per repeat, each
    time the slowest rank's (a step ends when its last rank does), hidden = (comm + compute − both) /
    min(comm, compute) clamped to 0..1; the mean over repeats, and each repeat's. The mean, not the median:
    many repeats hide nothing and the others up to 0.7 (as the four ranks happen to share the two cores),
    so medians gave 0 to 0.5 from one calibration to the next, while a step runs dozens of gathers and
    hides the sum of their fractions: the mean's share."""
    hidden = []
    for i in range(len(runs[0])):
        comm, compute, both = (max(r[i][j] for r in runs) for j in range(3))
        hidden.append(min(1.0, max(0.0, (comm + compute - both) / min(comm, compute))))
    return statistics.fmean(hidden), hidden


def measure_ranks(ranks: int, rounds: Rounds = FULL) -> tuple:
    """(latency s, bandwidth bytes/s, raw (output bytes, seconds)) of gloo all-gather on loopback, each
    rank's (matmul FLOP/s, copy bytes/s) measured while all ranks run, each rank's `comm_overlap`, and
    every kind's times over each group size (`collective_times`)."""
    import torch.multiprocessing as mp

    from .distributed import free_port

    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    mp.start_processes(_gloo_worker, args=(ranks, free_port(), q, rounds), nprocs=ranks, join=True, start_method="spawn")
    per_rank, overlaps, kinds, relayout, waits = q.get()
    # the generic link figures: an all-gather over every rank, the line through the SIZES
    raw = [(s, t) for s, t in kinds[("all_gather", ranks)] if s <= SIZES[-1]]
    latency, bandwidth = fit_line(raw, ranks)
    return latency, bandwidth, raw, per_rank, overlaps, kinds, relayout, waits


def calibrate(*, ranks: int = 4, path: Path | None = None, quick: bool = False) -> tuple[Hardware, Path]:
    """Measure this machine with `ranks` gloo ranks and save the cpu-local profile (to `path`, or the cache);
    `quick`: each measurement repeated fewer times (QUICK), said so in the profile's source."""
    rounds = QUICK if quick else FULL
    latency, link, raw, per_rank, overlaps, kinds, (extra, copied), waits = measure_ranks(ranks, rounds)
    fits = {key: fit_lines(rows, key[1]) for key, rows in kinds.items()}
    overlap, hidden = hidden_fraction(overlaps)
    flops = statistics.median(r[0] for r in per_rank)
    bandwidth = statistics.median(r[1] for r in per_rank)
    call = statistics.median(r[2] for r in per_rank)
    pointwise = statistics.median(r[3] for r in per_rank)
    steady = all(r[4] for r in per_rank)  # the ranks' heap, as they measured on it
    shapes = per_rank[0][5]  # (the slowest rank's times: every rank has the same)
    priced = copied / bandwidth  # what the cost model would add for that copy (strategies/cost.py: copy)
    relayout = extra >= 0.5 * priced
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    when = datetime.datetime.now().isoformat(timespec="seconds")
    hw = Hardware(
        name=CPU_LOCAL, peak_flops=flops, hbm_bytes=float(ram), hbm_bandwidth=bandwidth, link_bandwidth=link,
        topology="switch", collective_latency=latency, hop_latency=0.0, call_overhead=call,
        weight_prefetch=True,  # emitted programs issue weight gathers ahead of use (passes/schedule.py) ...
        comm_overlap=overlap,  # ... and this much of them the compute meanwhile hides here, measured
        relayout_copies=relayout,  # priced where a relayout's copy shows in a step here at all, measured
        elementwise_bandwidth=pointwise,  # eager pointwise ops run between the matmuls, one thread each
        matmul_shapes=tuple(shapes),
        sync_waits=tuple(waits),  # what a collective waits beyond its price after longer compute, measured
        collectives=tuple((k, g, a, b, up_to) for (k, g), lines in sorted(fits.items()) for a, b, up_to in lines),
        source=f"measured by `shardwise calibrate` on {socket.gethostname()} at {when}: {ranks} single-threaded "
               f"ranks running at once, gloo on loopback, "
               f"{'a steady heap (runtime/heap.py)' if steady else 'the C library default heap'}"
               + ("; --quick: each measurement repeated a few times only, a rough profile" if quick else ""),
        fitted={
            "ranks": str(ranks),
            "peak_flops": f"float32 {FLOPS_N}³ linears (runtime/kernels.py, 2 per repeat) per rank, all {ranks} ranks "
                          f"at once, each repeat the slowest rank's time, median over repeats: "
                          f"{flops / 1e9:.1f} GFLOP/s",
            "matmul_shapes": f"float32 [m, k]·[k, n] linears (runtime/kernels.py) for m in {GEMM_M}, k and n in "
                             f"{GEMM_KN}, calls of at least {GEMM_REPEAT_S * 1e3:.0f} ms a time, all ranks at once, "
                             f"the slowest rank's, in rounds over every shape, median over rounds: "
                             + ", ".join(f"{m}×{k}×{n} {f / 1e9:.1f}" for m, k, n, f in shapes) + " GFLOP/s",
            "hbm_bandwidth": f"64 MiB copy (read + write) per rank, all ranks at once, each repeat the slowest "
                             f"rank's time, median over repeats: {bandwidth / 1e9:.1f} GB/s",
            "elementwise_bandwidth": f"silu(h1) · h2 over a {ELEMENTWISE_SHAPE[0]}×{ELEMENTWISE_SHAPE[1]} float32 "
                                     f"hidden activation (5 passes of its bytes), timed right after the matmuls "
                                     f"that make h1 and h2, all ranks at once, the slowest rank's, median over "
                                     f"rounds: {pointwise / 1e9:.2f} GB/s",
            "call_overhead": f"[1, 64]·[64, 64] torch.mm call (a mixture's experts'), all ranks at once, each repeat "
                             f"the slowest rank's time, median over repeats: {call * 1e6:.1f} µs",
            "sync_waits": f"a {SYNC_BYTES >> 10} KiB all-reduce after k × the collectives' compute (k in "
                          f"{', '.join(map(str, SYNC_GAPS))}) against the compute alone, every rank at once "
                          f"(groups of 2: every pair at once), the slowest rank's, median over rounds, less its "
                          f"time after k = {SYNC_GAPS[0]}: "
                          + "; ".join(f"group {g}: " + ", ".join(f"{gap * 1e3:.1f} ms {e * 1e3:.2f} ms"
                                                                 for h, gap, e in waits if h == g)
                                      for g in sorted({w[0] for w in waits}, reverse=True)),
            "relayout_copies": f"{relayout}: a {RELAYOUT_BYTES >> 20} MiB all-gather over dim 1 (its blocks merged, "
                               f"one copy) took {extra * 1e3:.1f} ms more than one over dim 0, after 1 ms of compute, "
                               f"the slowest rank's, median over rounds; the copy's bytes at the measured "
                               f"bandwidth are {priced * 1e3:.1f} ms (priced when the difference is at least half that)",
            "link_bandwidth": "slope of gloo all-gather time vs wire bytes, "
                              + ", ".join(f"{s >> 10} KiB: {t * 1e6:.0f} µs" for s, t in raw),
            "collective_latency": "intercept of the same least-squares fit",
            "collectives": "per kind and group size, the same fit of its own times up to "
                           f"{SIZES[-1] >> 20} MiB, then a line from there through each of "
                           f"{', '.join(f'{s >> 20}' for s in LARGE_SIZES)} MiB (every rank at once; groups "
                           "of 2: every pair at once), each the time it adds after 1 ms of compute, used for "
                           "those collectives instead of the two above: "
                           + "; ".join(f"{k}/{g}: " + ", ".join(f"{s >> 10} KiB {t * 1e6:.0f} µs" for s, t in rows)
                                       for (k, g), rows in sorted(kinds.items())),
            "comm_overlap": f"a {OVERLAP_BYTES >> 20} MiB gloo all-gather with a loop of "
                            f"[{OVERLAP_LINEAR[0]}, {OVERLAP_LINEAR[1]}]·[{OVERLAP_LINEAR[1]}, {OVERLAP_LINEAR[2]}] "
                            f"linears about twice its length run while it is in flight, all ranks at once: per "
                            f"repeat, the slowest rank's times, "
                            f"hidden = (comm + compute − both) / min(comm, compute); the mean of "
                            + ", ".join(f"{h:.2f}" for h in hidden)
                            + "; median times (comm, compute, both) per rank, ms: "
                            + ", ".join("(" + ", ".join(f"{statistics.median(x[j] for x in o) * 1e3:.1f}"
                                                        for j in range(3)) + ")" for o in overlaps),
        },
    )
    path = path or cpu_local_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(hw.to_json())
    return hw, path
