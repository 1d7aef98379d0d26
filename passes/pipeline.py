"""The pass pipeline: every graph pass runs through it, and it checks the meta-key contract of each.

A pass is a function on a GraphModule decorated with `@graph_pass(needs=..., makes=...)`, naming the
keys (declared in ir/meta.py) it reads and writes. `run_pipeline` checks, for every pass it runs:
  before  every key the pass needs is there: a graph key in `gm.meta`, a node key with a scope on every
          node of its scope (`Scope.TENSORS`: every tensor-valued placeholder and op);
  after   every key it makes is there, graph keys of their declared type; the graph lints (optional:
          the planner's inner loop, which applies hundreds of candidates to one prototype, skips it).
An unexpected error escaping a pass is reported with the pass's name; a ShardwiseError (bad input)
passes through unchanged.
"""

from __future__ import annotations

import builtins
import importlib
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Callable

import torch
import torch.fx as fx

from ..errors import ShardwiseError
from ..ir.meta import Level, Scope, declared
from .graph_utils import structure_fact


@dataclass(frozen=True)
class Contract:
    name: str
    needs: tuple[str, ...] = ()
    makes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for k in self.needs + self.makes:
            declared(k)  # every key a pass names is declared once, in ir/meta.py


def graph_pass(*, needs: tuple[str, ...] = (), makes: tuple[str, ...] = ()):
    """Declare a function `fn(gm, ...) -> GraphModule` a pass with the keys it needs and makes."""

    def deco(fn: Callable[..., fx.GraphModule]) -> Callable[..., fx.GraphModule]:
        fn.contract = Contract(fn.__name__, tuple(needs), tuple(makes))
        return fn

    return deco


@dataclass
class Pass:
    """One pass with its arguments beyond the graph: `Pass(propagate, mesh, check=False)`."""

    fn: Callable[..., fx.GraphModule]
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __init__(self, fn: Callable[..., fx.GraphModule], *args, **kwargs):
        if not isinstance(getattr(fn, "contract", None), Contract):
            raise TypeError(f"{getattr(fn, '__name__', fn)} is not a declared pass (use @graph_pass)")
        self.fn, self.args, self.kwargs = fn, args, kwargs

    @property
    def contract(self) -> Contract:
        return self.fn.contract


def run_pipeline(gm: fx.GraphModule, passes: list[Pass], *, lint: bool = True) -> fx.GraphModule:
    for p in passes:
        c = p.contract
        missing = _missing(gm, c.needs)
        if missing:
            raise RuntimeError(f"pass {c.name} needs {', '.join(missing)}, which no earlier pass wrote")
        try:
            gm = p.fn(gm, *p.args, **p.kwargs)
        except ShardwiseError:
            raise
        except Exception as e:
            raise RuntimeError(f"pass {c.name} failed: {type(e).__name__}: {e}") from e
        absent = _missing(gm, c.makes, check_types=True)
        if absent:
            raise RuntimeError(f"pass {c.name} did not write {', '.join(absent)}")
        if lint:
            try:
                gm.graph.lint()
            except Exception as e:
                raise RuntimeError(f"pass {c.name} left an invalid graph: {e}") from e
    return gm


def run(gm: fx.GraphModule, fn: Callable[..., fx.GraphModule], *args, **kwargs) -> fx.GraphModule:
    """One pass through the pipeline (its contract checked, the graph linted)."""
    return run_pipeline(gm, [Pass(fn, *args, **kwargs)])


def _missing(gm: fx.GraphModule, keys: tuple[str, ...], *, check_types: bool = False) -> list[str]:
    out = []
    for name in keys:
        key = declared(name)
        if key.level is Level.GRAPH:
            if name not in gm.meta:
                out.append(f"gm.meta[{name!r}]")
            elif check_types and not isinstance(gm.meta[name], _types(key.type)):
                out.append(f"gm.meta[{name!r}] as {key.type} (found {type(gm.meta[name]).__name__})")
        elif key.scope is not Scope.SOME:
            lacking = [n.name for n in _scope(gm, key.scope) if name not in n.meta]
            if lacking:
                out.append(f"node.meta[{name!r}] on {', '.join(lacking[:3])}{' ...' if len(lacking) > 3 else ''}")
    return out


def _scope(gm: fx.GraphModule, scope: Scope) -> list[fx.Node]:
    """The nodes of `scope`, in order (a fact of the graph's structure: made once while the planner
    costs candidates on it)."""
    return structure_fact(gm, f"scope {scope.name}", lambda g: [n for n in g.graph.nodes if _in_scope(n, scope)])


def _in_scope(n: fx.Node, scope: Scope) -> bool:
    if scope is Scope.CALLS:
        return n.op == "call_function"
    return n.op in ("placeholder", "call_function") and isinstance(n.meta.get("val"), torch.Tensor)


@cache
def _types(spec: str) -> tuple[type, ...]:
    """The classes a declared type names ("shardwise.ir.plan.Plan", "builtins.str | None")."""
    out = []
    for part in (p.strip() for p in spec.split("|")):
        if part == "None":
            out.append(type(None))
            continue
        module, _, name = part.rpartition(".")
        out.append(getattr(builtins if module == "builtins" else importlib.import_module(module), name))
    return tuple(out)
