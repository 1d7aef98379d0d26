"""The pass pipeline: runs passes in order, checks what each needs and makes, lints the graph.

Each pass reads and writes documented keys (`gm.meta` for whole-graph records, `node.meta` for
per-node ones, listed in each pass's docstring). The pipeline checks the whole-graph keys a pass needs
before it runs and the ones it promises after, lints the graph, and names the failing pass when an
unexpected error escapes one (a ShardwiseError — bad input — passes through unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.fx as fx

from ..errors import ShardwiseError


@dataclass(frozen=True)
class Pass:
    name: str
    fn: Callable[[fx.GraphModule], fx.GraphModule]
    needs: tuple[str, ...] = ()
    makes: tuple[str, ...] = ()


def run_pipeline(gm: fx.GraphModule, passes: list[Pass]) -> fx.GraphModule:
    for p in passes:
        missing = [k for k in p.needs if k not in gm.meta]
        if missing:
            raise RuntimeError(f"pass {p.name} needs {missing}, which no earlier pass wrote")
        try:
            gm = p.fn(gm)
        except ShardwiseError:
            raise
        except Exception as e:
            raise RuntimeError(f"pass {p.name} failed: {type(e).__name__}: {e}") from e
        absent = [k for k in p.makes if k not in gm.meta]
        if absent:
            raise RuntimeError(f"pass {p.name} did not write {absent}")
        try:
            gm.graph.lint()
        except Exception as e:
            raise RuntimeError(f"pass {p.name} left an invalid graph: {e}") from e
    return gm
