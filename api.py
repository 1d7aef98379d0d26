"""The public entry points: plan, simulate, verify, generate.

    >>> import shardwise, torch
    >>> model = shardwise.models.build_model("llama-tiny")
    >>> ids = torch.randint(0, 256, (8, 16))
    >>> plan = shardwise.plan(model, (ids,), {"use_cache": False}, mesh="1x1x4", layouts="ffn=ws1d,attn=heads")
    >>> print(plan.summary())                       # per layer: layout, weights, collectives
    >>> logits = shardwise.simulate(plan, (ids,), {"use_cache": False})   # all 4 ranks in this process
    >>> shardwise.verify(model, (ids,), {"use_cache": False}, mesh="1x1x4").max_abs_diff

Each is a thin face over the floor that does the work: planning/ (plan), drivers/ (verify, generate).
The drivers are imported on first use: planning (`shardwise inspect`) needs none of them.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .errors import ShardwiseError
from .ir.plan import Plan
from .planning.planner import plan
from .planning.program import Program, ShardedModule

if TYPE_CHECKING:
    from .drivers.generate import Generation, generate
    from .drivers.verify import VerifyReport, verify

_DRIVERS = {"Generation": ".drivers.generate", "generate": ".drivers.generate", "VerifyReport": ".drivers.verify",
            "verify": ".drivers.verify"}


def __getattr__(name: str):
    if name not in _DRIVERS:
        raise AttributeError(f"module 'shardwise.api' has no attribute {name!r}")
    value = getattr(import_module(_DRIVERS[name], __package__), name)
    globals()[name] = value
    return value

__all__ = ["Generation", "Plan", "Program", "ShardedModule", "VerifyReport", "generate", "plan", "simulate", "verify"]


def simulate(plan: Plan, args: tuple, kwargs: dict | None = None) -> Any:
    """Run every rank of `plan` in this process (collectives computed across ranks); the global output."""
    if plan.program is None:
        raise ShardwiseError("this Plan has no program (it was loaded from JSON): re-plan to simulate")
    return plan.program.simulate(tuple(args), kwargs)
