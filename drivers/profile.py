"""One rank's step under torch.profiler, exported as a Chrome trace (what `verify --nproc N --trace DIR`
records on every rank; report/measure.py merges the ranks' traces with the plan's predicted timeline)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ShardwiseError

STEP = "shardwise step"  # the name of each profiled step's slice (torch.profiler.record_function)


def profile_step(step: Callable[[], Any], path: str | Path, *, rank: int, steps: int = 1, warmup: int = 1) -> Path:
    """Run `step()` `warmup` times, then `steps` times under torch.profiler (CPU, and CUDA when there is a
    GPU), each call a slice named "shardwise step i"; export this rank's Chrome trace to `path`."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    for name, v in (("steps", steps), ("warmup", warmup), ("rank", rank)):
        if not isinstance(v, int) or isinstance(v, bool) or v < (1 if name == "steps" else 0):
            raise ShardwiseError(f"{name}={v!r}: expected a whole number ≥ {1 if name == 'steps' else 0}")
    path = Path(path)
    if not path.parent.is_dir():
        raise ShardwiseError(f"cannot write the trace of rank {rank} to {str(path)!r}: its folder does not exist; "
                             f"create it first, or choose another path")
    cuda = torch.cuda.is_available()
    with torch.no_grad():
        for _ in range(warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for i in range(steps):
                with record_function(f"{STEP} {i}"):
                    step()
                if cuda:
                    torch.cuda.synchronize()
    prof.export_chrome_trace(str(path))
    return path
