"""Per-op propagation rules: the registry (`registry.py`) and the rules, which register themselves on
import (`math_rules.py`, `shape_rules.py`). Importing this package loads every rule."""

from . import math_rules, shape_rules  # noqa: F401  (each registers its rules)
from .registry import (
    AttentionSpec,
    Decision,
    OpCall,
    WeightSpec,
    bind,
    broadcast_map,
    clear_dims,
    drop_atoms,
    longest_dividing_prefix,
    project,
    register,
    register_named,
    replicated_like,
    rule_for,
    scatter_partial,
    tensor_positions,
)

__all__ = [
    "AttentionSpec", "Decision", "OpCall", "WeightSpec", "bind", "broadcast_map", "clear_dims", "drop_atoms",
    "longest_dividing_prefix", "project", "register", "register_named", "replicated_like", "rule_for", "scatter_partial",
    "tensor_positions",
]
