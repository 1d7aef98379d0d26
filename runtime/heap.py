"""A steady heap for CPU ranks: what one step frees, the next step reuses, without new pages.

PyTorch's CPU tensors come from the C library's malloc. glibc's defaults suit a program whose memory use
drifts, not one that runs the same step again and again: it serves an allocation from fresh pages of the
kernel (mmap) until a free of that size raises its threshold, and it hands memory back to the kernel
whenever the free space at the top of the heap exceeds twice that threshold. A step frees almost all it
allocated when it ends, so the heap is trimmed after every step and the next one faults every page of its
activations in again (the kernel zeroes each). Measured here, 4 single-threaded ranks on 2 cores:

- a fresh 64 MiB buffer took 29 ms to fill, a reused one 3.5 ms; a 64 MiB merging copy 35 ms and 7 ms;
- the elementwise ops of a feed-forward (silu, product) streamed 1.5–1.8 GB/s with the default heap and
  7.3 GB/s with this one (`shardwise calibrate`);
- and the cost model's ranking of bench_layouts' 20 layouts at 1024 tokens went from Spearman ρ
  0.82–0.88 against measured times to 0.95: page faults are a cost that depends on how much memory a
  layout touches per step, not on its FLOPs or bytes, and no term of the model prices them.

`steady_heap` sets glibc's two thresholds for the rest of the process (`mallopt`): allocations up to
32 MiB (the largest threshold glibc takes on 64-bit) come from the heap, and freed memory stays in the
heap up to 2 GiB at its top. The price: a rank's resident memory stays at its peak rather than shrinking
between steps, as a GPU's caching allocator keeps its blocks. Larger allocations (above 32 MiB) are still
mapped fresh each time; passes/gather_pieces.py keeps the largest collective buffers below that.

shardwise.init() calls it on gloo ranks, and so do calibrate's ranks (a profile is measured on the heap
the programs run on). Elsewhere (musl, macOS, Windows) it does nothing and says so."""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
MMAP_BYTES = 32 * 2**20  # glibc's largest mmap threshold on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_BYTES = 2**31 - 1  # an int: free memory kept at the top of the heap before any is given back

_state: dict[str, bool] = {}


def steady_heap() -> bool:
    """Keep freed memory in this process's heap for reuse (module doc); True where glibc took both
    settings, False where this C library has no `mallopt` (nothing is changed then)."""
    if "set" in _state:
        return _state["set"]
    ok = False
    if sys.platform.startswith("linux"):
        try:
            mallopt = ctypes.CDLL("libc.so.6").mallopt
        except (OSError, AttributeError):
            mallopt = None
        if mallopt is not None:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            ok = mallopt(M_MMAP_THRESHOLD, MMAP_BYTES) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_BYTES) == 1
    _state["set"] = ok
    return ok
