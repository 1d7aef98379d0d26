"""Constant folding of a rank program: values that depend on no input and no weight are computed once, when
the program is built, and held as buffers.

A captured step computes some tensors from shapes alone, on every call: the causal mask of a Hugging Face
prefill without padding (aranges compared, and-ed, expanded over the batch: on the benchmarks' Llama at
8×256 two `bitwise_and`s of [8, 1, 256, 256] took 54 ms of a 3 s step), the rotary angles of positions
0 … L−1, index tensors. Eager transformers skips the mask (SDPA's is_causal); the export spells it out,
so without folding a sharded program did work the model it stands for does not.

What folds: a call_function node whose inputs are all folded nodes or literals (no placeholder, and no
get_attr: a value derived from a weight stays in the program, a second copy of a weight is not worth the
time it saves), whose op is an operator overload that neither mutates, nor draws random numbers, nor
communicates, and whose value is a tensor of at most MAX_BYTES (bounded before it is computed). A value that some op later writes in place
(directly, or through views or anything computed from it) is not folded: the write would carry over to
the next call. The folded values that unfolded nodes read become non-persistent buffers (not in the
state_dict: they are not weights the rank holds); the folded nodes are erased. Every rank folds the same
nodes (they depend on shapes, which SPMD ranks share), so the programs keep one structure.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

MAX_BYTES = 16 << 20  # a folded value is held for the program's life: small tables, not activations
_NEVER = ("_c10d_functional", "c10d")  # communication is never a constant


def fold_constants(g: fx.Graph, root: nn.Module, bound: dict[fx.Node, int]) -> list[str]:
    """Fold `g` in place (buffers registered on `root`, which the program will be built from); the buffers'
    names (a GraphModule built from `root` copies them as persistent buffers: `keep_out_of_state` them).
    `bound`: for the nodes that may fold, an upper bound of their value's bytes, known before computing it
    (emit: the size of the global value a rank's node lowers). A node without one, or over MAX_BYTES, is
    never computed here: the causal mask of a large preset's prefill is gigabytes, and computing it to find
    that out would be the allocation folding must not make."""
    values: dict[fx.Node, Any] = {}
    written = _written(g)
    for node in g.nodes:
        if node.op != "call_function" or node in written or not _pure(node.target):
            continue
        if bound.get(node, MAX_BYTES + 1) > MAX_BYTES or not all(a in values for a in node.all_input_nodes):
            continue
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), values.__getitem__)
        try:
            with torch.no_grad():
                out = node.target(*args, **kwargs)
        except Exception:  # noqa: BLE001 — not computable here (e.g. a capture on meta run elsewhere): not a
            continue  # constant to fold; the program computes it, and raises there if it must
        if isinstance(out, torch.Tensor) and out.numel() * out.element_size() <= MAX_BYTES:
            values[node] = out
    # what the program still reads: folded values with an unfolded user
    made: list[str] = []
    for node in [n for n in values if any(u not in values for u in n.users)]:
        name = f"_folded_{len(made)}"
        made.append(name)
        root.register_buffer(name, values[node], persistent=False)
        with g.inserting_before(node):
            ref = g.get_attr(name)
        ref.meta = dict(node.meta)
        node.replace_all_uses_with(ref, delete_user_cb=lambda user: user not in values)
    for node in reversed(list(values)):
        if not node.users:
            g.erase_node(node)
    return made


def keep_out_of_state(program: nn.Module, names: list[str]) -> None:
    """The folded buffers of a built program non-persistent again: not in its state_dict."""
    for name in names:
        program.register_buffer(name, getattr(program, name), persistent=False)


def _pure(target) -> bool:
    if not isinstance(target, torch._ops.OpOverload) or target.namespace in _NEVER:
        return False
    return not target._schema.is_mutable and torch.Tag.nondeterministic_seeded not in target.tags


def _written(g: fx.Graph) -> set[fx.Node]:
    """Every node some op writes in place, with everything it was computed from (a write through a view
    changes its base; a conservative closure: all ancestors)."""
    out: set[fx.Node] = set()
    for node in g.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        if not target._schema.is_mutable:
            continue
        written = [a for a, arg in zip(node.args, target._schema.arguments)
                   if isinstance(a, fx.Node) and arg.alias_info is not None and arg.alias_info.is_write]
        written += [node.kwargs[arg.name] for arg in target._schema.arguments
                    if arg.name in node.kwargs and isinstance(node.kwargs[arg.name], fx.Node)
                    and arg.alias_info is not None and arg.alias_info.is_write]
        stack = list(written)
        while stack:
            n = stack.pop()
            if n not in out:
                out.add(n)
                stack.extend(n.all_input_nodes)
    return out
