"""The public entry points: plan, simulate, verify, generate.

    >>> import shardwise, torch
    >>> model = shardwise.models.build_model("llama-tiny")
    >>> ids = torch.randint(0, 256, (8, 16))
    >>> plan = shardwise.plan(model, (ids,), {"use_cache": False}, mesh="1x1x4", layouts="ffn=ws1d,attn=heads")
    >>> print(plan.summary())                       # per layer: layout, weights, collectives
    >>> logits = shardwise.simulate(plan, (ids,), {"use_cache": False})   # all 4 ranks in this process
    >>> shardwise.verify(model, (ids,), {"use_cache": False}, mesh="1x1x4").max_abs_diff

Each is a thin face over the floor that does the work: planning/ (plan), drivers/ (verify, generate).
"""

from __future__ import annotations

from typing import Any

from .drivers.generate import Generation, generate
from .drivers.verify import VerifyReport, verify
from .errors import ShardwiseError
from .ir.plan import Plan
from .planning.planner import plan
from .planning.program import Program, ShardedModule

__all__ = ["Generation", "Plan", "Program", "ShardedModule", "VerifyReport", "generate", "plan", "simulate", "verify"]


def simulate(plan: Plan, args: tuple, kwargs: dict | None = None) -> Any:
    """Run every rank of `plan` in this process (collectives computed across ranks); the global output."""
    if plan.program is None:
        raise ShardwiseError("this Plan has no program (it was loaded from JSON): re-plan to simulate")
    return plan.program.simulate(tuple(args), kwargs)
