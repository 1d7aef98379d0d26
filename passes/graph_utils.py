"""Small helpers the passes share: the matmul table, fake values for new nodes, module paths, signatures."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from ..ir.meta import BOUND, LAYERS, SIGNATURE

aten = torch.ops.aten


@dataclass(frozen=True)
class MatmulArgs:
    """Where a matmul op keeps its operands: positions and schema names of the activation and weight."""

    x: int
    w: int
    bias: int | None
    x_name: str
    w_name: str
    rows_out: bool  # the weight is [out, in] (nn.Linear) rather than [in, out] (mm, addmm: GPT-2's Conv1D)
    projection: bool  # a 2-D weight: can be a layer's projection (bmm multiplies batches of activations)


MATMULS = {  # the one table of matmul ops: find_layers, canonicalize and the cost model read it
    aten.linear.default: MatmulArgs(0, 1, 2, "input", "weight", rows_out=True, projection=True),
    aten.addmm.default: MatmulArgs(1, 2, 0, "mat1", "mat2", rows_out=False, projection=True),
    aten.mm.default: MatmulArgs(0, 1, None, "self", "mat2", rows_out=False, projection=True),
    aten.bmm.default: MatmulArgs(0, 1, None, "self", "mat2", rows_out=False, projection=False),
}
PROJECTIONS = {op: m for op, m in MATMULS.items() if m.projection}



@dataclass
class Signature:
    """How the captured graph's placeholders map to weights and to the user's call."""

    params: dict[str, str]  # placeholder name → state key (parameters, buffers, lifted constants)
    inputs: list[str]  # user-input placeholder names, in flat call order
    in_spec: Any  # pytree spec of (args, kwargs)
    out_spec: Any  # pytree spec of the outputs
    model: str = ""
    buffers: set[str] = field(default_factory=set)  # state keys that are buffers or constants, not parameters
    derived: dict[str, tuple[str, int, int, int]] = field(default_factory=dict)  # key → (base key, dim, start, length)


def signature(gm: fx.GraphModule) -> Signature:
    return gm.meta[SIGNATURE]


def fake_mode_of(gm: fx.GraphModule):
    vals = [n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    return detect_fake_mode(vals)


def fake_run(node: fx.Node, mode) -> None:
    """Fill `node.meta["val"]` by running its target on its inputs' fake values."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta["val"])
    with mode:
        node.meta["val"] = node.target(*args, **kwargs)


def module_path(node: fx.Node) -> str:
    """Innermost module that produced the node ('' at top level)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def module_paths(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [v[0] for v in stack.values()]


def shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["val"].shape)


def copy_meta(dst: fx.Node, src: fx.Node, *keys: str) -> None:
    for k in keys or ("nn_module_stack", "stack_trace"):
        if k in src.meta:
            dst.meta[k] = src.meta[k]


def copy_program(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of a captured graph that later passes can annotate and rewrite without touching `gm`:
    new nodes (same names) with their own meta dicts, the same weights and fake values (never mutated),
    and copies of the whole-graph records. Planning a copy gives what planning a fresh capture gives."""
    import copy

    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = g.graph_copy(gm.graph, env)
    old_out = next(n for n in gm.graph.nodes if n.op == "output")
    new_out = g.output(out)
    new_out.meta = dict(old_out.meta)
    for old, new in env.items():
        new.meta = {k: v for k, v in old.meta.items() if k != BOUND}  # the cache holds the old arguments
    copied = fx.GraphModule(gm, g)
    copied.meta = {k: dict(v) if isinstance(v, dict) else v for k, v in gm.meta.items()}
    sig = gm.meta[SIGNATURE]  # its specs are immutable; its tables are copied
    copied.meta[SIGNATURE] = replace(sig, params=dict(sig.params), inputs=list(sig.inputs), buffers=set(sig.buffers),
                                     derived=dict(sig.derived))
    if LAYERS in gm.meta:
        copied.meta[LAYERS] = copy.deepcopy(gm.meta[LAYERS])
    return copied
