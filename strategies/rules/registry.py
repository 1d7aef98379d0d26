"""Per-op propagation rules: given the layouts of an op's inputs, the layouts it needs and produces.

A rule sees an `OpCall` (the node, its inputs' current layouts, shapes, the mesh) and returns a
`Decision`: the layout each tensor argument must have (the propagation pass inserts the collectives
that get it there) and the layout of the output. Rules live in a registry keyed by ATen overload that
refuses duplicates; an op without a rule runs on replicated inputs and is reported.

Rules are in `shape_rules.py` (views, slicing, joining, factories) and `math_rules.py` (pointwise,
reductions, matmuls, attention, embedding); the package's `__init__` imports both, so importing
`shardwise.strategies.rules` registers every rule.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx

from ...ir.layout import Layout
from ...ir.mesh import Mesh
from ...ir.meta import BOUND, WEIGHT

aten = torch.ops.aten

@dataclass(frozen=True)
class WeightSpec:
    """A weight's layout at rest (what a rank stores) and in use (what the matmul reads)."""

    at_rest: Layout
    in_use: Layout
    fixed: bool = True  # False: the weight may adopt whatever layout its use needs (a free local slice)

    def __hash__(self) -> int:  # the frozen dataclass's value, made once (a key of propagate's memo)
        try:
            return self.__dict__["_hash"]
        except KeyError:
            h = hash((self.at_rest, self.in_use, self.fixed))
            object.__setattr__(self, "_hash", h)
            return h

    def __reduce__(self):  # the fields only: hashes (of strings, of layouts) differ between processes
        return type(self), (self.at_rest, self.in_use, self.fixed)


@dataclass(frozen=True)
class AttentionSpec:
    """How the attention core is split: its batch dim over `batch`, its heads over `heads`."""

    batch: tuple[str, ...]
    heads: tuple[str, ...]
    mode: str = "heads"


@dataclass
class Decision:
    inputs: dict[str, Any]  # schema argument name → Layout, or a list of Layouts for a list argument
    output: Any  # Layout or tuple of Layouts
    note: str | None = None


# ------------------------------------------------------------------------------------ the op call
@dataclass
class OpCall:
    node: fx.Node
    mesh: Mesh
    args: dict[str, Any]  # schema name → value (fx.Node, list, or constant)
    layouts: dict[str, Any]  # schema name → Layout / list of Layouts for tensor arguments

    def val(self, name: str):
        v = self.args[name]
        return v.meta["val"] if isinstance(v, fx.Node) else v

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.args[name].meta["val"].shape)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.node.meta["val"].shape)

    def weight(self, name: str) -> WeightSpec | None:
        v = self.args.get(name)
        return v.meta.get(WEIGHT) if isinstance(v, fx.Node) else None

    def tensor_args(self) -> Iterable[str]:
        return self.layouts.keys()


Rule = Callable[[OpCall], Decision]
_RULES: dict[Any, Rule] = {}
_BY_NAME: list[tuple[Any, Rule]] = []  # (compiled pattern of schema names, rule): ops of libraries loaded later


def register_named(pattern: str) -> Callable[[Rule], Rule]:
    """Register a rule for every op whose schema name matches `pattern` (a regex): ops of a library that
    may not be loaded when the rules are (transformers' `grouped_mm_fallback`), and their ATen cousins."""
    import re

    def deco(fn: Rule) -> Rule:
        _BY_NAME.append((re.compile(pattern), fn))
        return fn

    return deco


def register(*ops: Any) -> Callable[[Rule], Rule]:
    """Register a rule for ATen overloads (or packets: every overload). Duplicates are an error."""

    def deco(fn: Rule) -> Rule:
        for op in ops:
            targets = [getattr(op, o) for o in op.overloads()] if isinstance(op, torch._ops.OpOverloadPacket) else [op]
            for t in targets:
                if t in _RULES:
                    raise KeyError(f"a propagation rule for {t} is already registered ({_RULES[t].__name__})")
                _RULES[t] = fn
        return fn

    return deco


def rule_for(target: Any) -> Rule | None:
    rule = _RULES.get(target)
    if rule is None and _BY_NAME and isinstance(target, torch._ops.OpOverload):
        name = target._schema.name
        rule = next((fn for pattern, fn in _BY_NAME if pattern.search(name)), None)
    return rule


# ------------------------------------------------------------------------------------ schema binding
@functools.cache
def _schema(target) -> tuple[tuple[str, bool, Any], ...]:
    return tuple((a.name, a.kwarg_only, a.default_value if a.has_default_value() else None)
                 for a in target._schema.arguments)


def bind(node: fx.Node) -> dict[str, Any]:
    """Map an ATen call's positional and keyword arguments to schema names (defaults filled in).

    Cached on the node while its arguments stay the same objects (passes that rewire a node replace them)."""
    args, kwargs = node.args, node.kwargs
    cached = node.meta.get(BOUND)
    if cached is not None and cached[0] is args and cached[1] is kwargs:
        return cached[2]
    out: dict[str, Any] = {}
    for i, (name, kwarg_only, default) in enumerate(_schema(node.target)):
        if i < len(args) and not kwarg_only:
            out[name] = args[i]
        else:
            out[name] = kwargs.get(name, default)
    node.meta[BOUND] = (args, kwargs, out)
    return out


def tensor_positions(args: dict[str, Any]) -> dict[str, Any]:
    """Names of the arguments holding tensors: a node, or a list with nodes (None kept in place)."""
    out: dict[str, Any] = {}
    for name, v in args.items():
        if isinstance(v, fx.Node) and _is_tensor(v):
            out[name] = v
        elif isinstance(v, (list, tuple)) and any(isinstance(x, fx.Node) for x in v):
            out[name] = list(v)
    return out


def _is_tensor(n: fx.Node) -> bool:
    v = n.meta.get("val")
    return isinstance(v, torch.Tensor) or (isinstance(v, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in v))


# ------------------------------------------------------------------------------------ helpers for rules
def replicated_like(layout: Layout) -> Layout:
    return Layout.replicated(layout.ndim)


def clear_dims(layout: Layout, dims: Iterable[int]) -> Layout:
    out = layout
    for d in dims:
        out = out.with_dim(d % layout.ndim, ())
    return out


def drop_atoms(layout: Layout, atoms: Iterable[str]) -> Layout:
    """Remove atoms from every dim (each from its position to the minor end, so the rest stays a prefix)."""
    bad = set(atoms)
    dims = []
    for d in layout.dims:
        keep = []
        for a in d:
            if a in bad:
                break
            keep.append(a)
        dims.append(tuple(keep))
    return Layout(tuple(dims), layout.partial - bad)


def scatter_partial(layout: Layout, shape: Sequence[int], mesh: Mesh) -> Layout:
    """Where a partial must be resolved: reduce-scatter onto an already split dim, else all-reduce.

    Continuing an existing split is the paper's BLF_yz{Σx} → BLF_yzx: the next op can consume it and a
    later all-gather restores it. Scattering onto an unsplit dim would only be gathered back at once
    (RS + AG where one all-reduce does), so a partial with no split dim to extend is all-reduced.
    Returns the non-partial target layout.
    """
    if not layout.partial:
        return layout
    atoms = mesh.mesh_order(layout.partial)
    g = mesh.group_size(atoms)
    base = layout.without_partial()
    local = base.local_shape(shape, mesh)
    for d in sorted((d for d in range(len(shape)) if layout.dims[d]), key=lambda d: -local[d]):
        if local[d] % g == 0:
            return base.with_dim(d, layout.dims[d] + tuple(atoms))
    return base


def longest_dividing_prefix(atoms: Sequence[str], n: int, mesh: Mesh) -> tuple[str, ...]:
    out: list[str] = []
    for a in atoms:
        if n % mesh.group_size(out + [a]):
            break
        out.append(a)
    return tuple(out)


def broadcast_map(in_shape: Sequence[int], out_shape: Sequence[int]) -> list[int | None]:
    """For each dim of an input, the output dim it aligns with, or None where it broadcasts (size 1)."""
    off = len(out_shape) - len(in_shape)
    return [None if (s == 1 and out_shape[i + off] != 1) else i + off for i, s in enumerate(in_shape)]


def project(out_layout: Layout, in_shape: Sequence[int], out_shape: Sequence[int], partial=frozenset()) -> Layout:
    """The layout an input of `in_shape` needs so that it broadcasts against an output in `out_layout`."""
    if partial == out_layout.partial and tuple(in_shape) == tuple(out_shape):
        return out_layout  # (what the rest would make again: the output's own dims and partial)
    dims = tuple(() if j is None else out_layout.dims[j] for j in broadcast_map(in_shape, out_shape))
    return Layout(dims, frozenset(partial))

