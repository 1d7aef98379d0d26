"""Small helpers the passes share: fake values for new nodes, module paths, signatures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

SIGNATURE = "sw_signature"  # gm.meta: Signature
STATE = "sw_state"  # gm.meta: dict state key → tensor (the full weights, or meta tensors)


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
