"""The CPU linear kernel of rank programs (runtime/kernels.py, oneDNN) beside torch's `aten.linear`.

One process, one thread (as a rank runs), float32; for each shape [M, K]·[K, N] of a projection in the
benchmarks' programs (E = 1024, F = 4096 over 4 ranks; the head's [2048, 256]·[256, 8192] and
[2048, 1024]·[1024, 2048]) at M = 8, 256 and 2048 rows: the median time of each kernel over `--runs`
calls, interleaved call by call, their ratio, and the largest difference of their outputs (of order 1e-4
on these products of standard normals, whose outputs are of order √K ≈ 32: float32 rounding of two
blockings of the same sums).

    python -m shardwise.benchmarks.bench_kernels
    python -m shardwise.benchmarks.bench_kernels --ranks 4      # 4 such processes at once, as 4 ranks run

`--ranks R` runs R copies at once (started together, no barrier; the first one's table is shown): on
2 cores the 4 ranks time-share, as in bench_layouts and bench_hf_dtensor.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [(1024, 384), (256, 1024), (1024, 2048), (1024, 1024), (256, 8192)]  # (K, N): qkv, o, gate+up, down, head
ROWS = (8, 256, 2048)


def timed_pair(fa, fb, runs: int) -> tuple[float, float]:
    for _ in range(2):
        fa(), fb()
    ta, tb = [], []
    for _ in range(runs):
        t = time.perf_counter()
        fa()
        ta.append(time.perf_counter() - t)
        t = time.perf_counter()
        fb()
        tb.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def main() -> None:
    from shardwise.cli import _whole  # a whole number ≥ 1, refused by argparse otherwise

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=_whole, default=15, help="timed runs (default 15)")
    ap.add_argument("--ranks", type=int, default=1, help="copies run at once (rank 0's table is shown)")
    args = ap.parse_args()
    if args.ranks > 1:
        cmd = [sys.executable, "-m", "shardwise.benchmarks.bench_kernels", "--runs", str(args.runs)]
        procs = [subprocess.Popen(cmd, stdout=None if r == 0 else subprocess.DEVNULL) for r in range(args.ranks)]
        sys.exit(max(p.wait() for p in procs))

    from shardwise.runtime import kernels
    from shardwise.runtime.kernels import linear, onednn_applies

    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, 1 thread, float32; oneDNN built in: {torch.backends.mkldnn.is_available()}, "
          f"used from {kernels.ONEDNN_MIN_MACS} multiply-adds (M·K·N) up (column oneDNN)")
    print(f"{'M':>5} {'K':>5} {'N':>5} {'oneDNN':>6} {'aten.linear ms':>15} {'kernels.linear ms':>18} {'ratio':>6} "
          f"{'max |diff|':>11}")
    ratios = []
    for m in ROWS:
        for k, n in SHAPES:
            x, w = torch.randn(m, k), torch.randn(n, k)
            ta, tk = timed_pair(lambda: F.linear(x, w), lambda: linear(x, w), args.runs)
            diff = (F.linear(x, w) - linear(x, w)).abs().max().item()
            ratios.append(tk / ta)
            used = "yes" if onednn_applies(x, w) else "no"
            print(f"{m:5d} {k:5d} {n:5d} {used:>6} {ta * 1e3:15.3f} {tk * 1e3:18.3f} {tk / ta:6.2f} {diff:11.1e}")
    print(f"median ratio kernels.linear / aten.linear: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
