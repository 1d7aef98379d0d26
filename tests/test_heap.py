"""The steady heap (runtime/heap.py): freed memory stays in the process for the next step.

Checked where it is observable without timing: a touched 16 MiB tensor, freed, leaves the resident set
with glibc's defaults (it was mapped fresh and is unmapped) and stays in it on the steady heap (it came
from the heap, which keeps it). Each case runs in a fresh interpreter, so the defaults are the defaults.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import sys
import torch
from shardwise.runtime.heap import steady_heap

def resident():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

if sys.argv[1] == "steady":
    assert steady_heap() is True
t = torch.ones(4 * 2**20)  # 16 MiB, every page touched
before = resident()
del t
print(before - resident())
"""


def _released(mode: str) -> int:
    env = dict(os.environ)
    for k in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_"):
        env.pop(k, None)
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/statm").exists() or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="the resident set is read from /proc and the heap is glibc's (Linux with glibc only)")
def test_freed_memory_stays_on_the_steady_heap_and_leaves_without_it():
    assert _released("default") >= 12 * 2**20  # mapped fresh, unmapped on free
    assert _released("steady") <= 2**20  # kept for the next allocation


def test_init_refuses_a_steady_heap_that_is_not_a_bool():
    import shardwise
    from shardwise.errors import ShardwiseError

    with pytest.raises(ShardwiseError, match=r"steady_heap='yes'.*expected True .* or False"):
        shardwise.init(steady_heap="yes")
