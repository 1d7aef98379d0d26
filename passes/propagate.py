"""propagate: a layout on every tensor node, and the layout every op needs of its inputs.

Walks the graph in order. Placeholders start at their stored layout (`sw_weight.at_rest`, the layout of
a sharded program input, else replicated). Each op's rule (strategies/rules*.py) reads the layouts
its inputs are *seen* with (a node's `sw_anchor` when it has one) and decides what it needs and what it
makes. An op with no rule needs replicated inputs, makes a replicated output, and is reported.

Reads  `val`, `sw_weight`, `sw_anchor`, `sw_attention`, `sw_signature`, gm.meta["sw_io_layouts"].
Writes `sw_layout`, `sw_in_layouts` (schema name → layout), `sw_note`; gm.meta["sw_unknown_ops"].
Weights with no planned layout then adopt the split their uses need, when that is a free local slice.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from ..errors import LayoutError
from ..ir.layout import Layout
from ..ir.mesh import Mesh
from ..ir.meta import (
    ANCHOR,
    ASSIGNMENT,
    ATTENTION,
    DISPATCH,
    GATHER,
    IN_LAYOUTS,
    IO_LAYOUTS,
    LAYERS,
    LAYOUT,
    NOTE,
    SIGNATURE,
    UNKNOWN,
    WEIGHT,
)
from ..ir.plan import UnknownOp
from ..strategies.rules import Decision, OpCall, bind, rule_for, tensor_positions
from .graph_utils import signature
from .pipeline import graph_pass


def seen(node: fx.Node) -> Any:
    """The layout consumers of `node` see: its anchor if it has one, else what it produces."""
    return node.meta.get(ANCHOR) or node.meta.get(LAYOUT)


@graph_pass(needs=(SIGNATURE, LAYERS, ASSIGNMENT, IO_LAYOUTS), makes=(LAYOUT, UNKNOWN))
def propagate(gm: fx.GraphModule, mesh: Mesh, *, check: bool = True) -> fx.GraphModule:
    """`check=False` skips validating each rule's answer: the planner propagates hundreds of candidates
    with the same rules, and validates the one it chooses when it records the plan."""
    io = gm.meta.get(IO_LAYOUTS, {})
    unknown: list[UnknownOp] = []
    memo = None if check else gm.__dict__.setdefault(_MEMO, {}).setdefault(mesh, {})
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            node.meta[LAYOUT] = _placeholder_layout(node, io)
        elif node.op == "get_attr":
            v = getattr(gm, node.target)
            node.meta[LAYOUT] = Layout.replicated(v.ndim) if isinstance(v, torch.Tensor) else None
        elif node.op == "call_function":
            _propagate_call(node, mesh, unknown, check, memo)
        elif node.op == "output":
            outs = node.args[0]
            node.meta[IN_LAYOUTS] = {
                "outputs": [
                    io.get(f"output:{i}", Layout.replicated(o.meta["val"].ndim))
                    if isinstance(o, fx.Node) and isinstance(o.meta.get("val"), torch.Tensor) else None
                    for i, o in enumerate(outs)
                ]
            }
    _adopt_free_weights(gm, mesh)
    gm.meta[UNKNOWN] = unknown
    return gm


def _placeholder_layout(node: fx.Node, io: dict) -> Layout | None:
    v = node.meta.get("val")
    if not isinstance(v, torch.Tensor):
        return None
    if WEIGHT in node.meta:
        return node.meta[WEIGHT].at_rest
    return io.get(node.name, Layout.replicated(v.ndim))


# The planner propagates hundreds of candidates through one prototype graph, and most nodes see the
# same inputs under many of them: a rule's decision depends only on the node, the mesh, the layouts its
# inputs are seen with, the node's `sw_attention` and `sw_dispatch` and its inputs' `sw_weight` (what
# OpCall reads), so it is remembered per mesh and node under that key (only with check=False: a checked
# propagation recomputes), beside what does not change between candidates (the rule, the bound
# arguments, which nodes feed which tensor argument: `_Static`). A remembered decision is found without
# building the rule's view of the inputs (the dict of layouts an OpCall holds): the key is read straight
# off the input nodes. The memo (mesh → node → `_Static`) lives on the graph module itself (an
# attribute, not graph meta), and goes with it.
_MEMO = "_shardwise_propagate_memo"


class _Static:
    """What a call node's propagation reads that no choice of layouts changes, and its remembered
    decisions. Valid while the node keeps its argument objects (a pass that rewires it replaces them)."""

    __slots__ = ("args", "kwargs", "rule", "bound", "tensors", "inputs", "sources", "decisions")

    def __init__(self, node: fx.Node):
        self.args, self.kwargs = node.args, node.kwargs
        is_op = isinstance(node.target, torch._ops.OpOverload)
        self.rule = rule_for(node.target) if is_op else None
        self.bound = bind(node) if is_op else {f"arg{i}": a for i, a in enumerate(node.args)} | dict(node.kwargs)
        self.tensors = tensor_positions(self.bound)
        self.inputs = tuple(v for v in self.bound.values() if isinstance(v, fx.Node))
        # every tensor argument's node in order (a list argument's entries in place, None where no node):
        # with the fixed structure of `tensors`, their layouts say as much as the OpCall's dict of them
        self.sources = tuple(n if isinstance(n, fx.Node) else None
                             for v in self.tensors.values() for n in (v if isinstance(v, list) else (v,)))
        # key → (decision, whether its inputs hold a list: the copy `_record` makes)
        self.decisions: dict[tuple, tuple[Decision, bool]] = {}


def _propagate_call(node: fx.Node, mesh: Mesh, unknown: list[UnknownOp], check: bool = True,
                    memo: dict | None = None) -> None:
    if node.target is operator.getitem:
        src, i = node.args
        node.meta[LAYOUT] = seen(src)[i]
        node.meta[IN_LAYOUTS] = {}
        return
    static = None if memo is None else memo.get(node)
    if static is None or static.args is not node.args or static.kwargs is not node.kwargs:
        static = _Static(node)
        if memo is not None:
            memo[node] = static
    rule, args, tensors = static.rule, static.bound, static.tensors
    key = None
    if memo is not None and rule is not None:
        # what the rule reads (OpCall) but the mesh (the memo's): its inputs' layouts (as `seen` gives
        # them), its `sw_attention` and `sw_dispatch`, and its inputs' `sw_weight`
        meta = node.meta
        key = (tuple([None if n is None else (n.meta.get(ANCHOR) or n.meta.get(LAYOUT)) for n in static.sources]),
               meta.get(ATTENTION), meta.get(DISPATCH), tuple([n.meta.get(WEIGHT) for n in static.inputs]))
        found = static.decisions.get(key)
        if found is not None:
            decision, lists = found
            meta[LAYOUT] = decision.output
            # a copy: a remembered decision is shared by every candidate that meets it
            meta[IN_LAYOUTS] = _copy(decision.inputs) if lists else decision.inputs.copy()
            if decision.note:
                meta[NOTE] = decision.note
            return
    layouts = {
        k: [seen(n) if isinstance(n, fx.Node) else None for n in v] if isinstance(v, list) else seen(v)
        for k, v in tensors.items()
    }
    call = OpCall(node, mesh, args, layouts)
    if rule is None:
        decision = _replicated(call)
        node.meta[NOTE] = f"no layout rule for {node.target}: ran on replicated inputs"
        unknown.append(UnknownOp(node.name, str(node.target), _module(node)))
    else:
        try:
            decision = rule(call)
        except LayoutError as e:
            raise LayoutError(f"while propagating layouts through {node.format_node()}: {e}") from None
    if check:
        _check(node, call, decision, mesh)
    if key is not None:
        static.decisions[key] = (decision, any(isinstance(v, list) for v in decision.inputs.values()))
    _record(node, decision)


def _record(node: fx.Node, decision: Decision) -> None:
    node.meta[LAYOUT] = decision.output
    node.meta[IN_LAYOUTS] = _copy(decision.inputs)  # (a decision may be remembered: shared)
    if decision.note:
        node.meta[NOTE] = decision.note


def _copy(inputs: dict) -> dict:
    return {k: list(v) if isinstance(v, list) else v for k, v in inputs.items()}


def _replicated(call: OpCall) -> Decision:
    req = {
        k: [None if l is None else Layout.replicated(l.ndim) for l in v] if isinstance(v, list) else Layout.replicated(v.ndim)
        for k, v in call.layouts.items()
    }
    val = call.node.meta.get("val")
    if isinstance(val, (list, tuple)):
        out = tuple(Layout.replicated(t.ndim) if isinstance(t, torch.Tensor) else None for t in val)
    elif isinstance(val, torch.Tensor):
        out = Layout.replicated(val.ndim)
    else:
        out = None
    return Decision(req, out)


def _check(node: fx.Node, call: OpCall, d: Decision, mesh: Mesh) -> None:
    """A rule must only ask for layouts that split the tensors evenly: a bug otherwise."""

    def ok(layout, n):
        if layout is None or not isinstance(n, fx.Node):
            return
        layout.check(tuple(n.meta["val"].shape), mesh)

    try:
        for k, v in d.inputs.items():
            src = call.args[k]
            if isinstance(v, list):
                for l, n in zip(v, src):
                    ok(l, n)
            else:
                ok(v, src)
        val = node.meta.get("val")
        if isinstance(d.output, Layout) and isinstance(val, torch.Tensor):
            d.output.check(tuple(val.shape), mesh)
    except LayoutError as e:
        raise LayoutError(f"layout rule for {node.target} at {node.format_node()} proposed an invalid layout: {e}") from None


def _module(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else ""


def uses(node: fx.Node):
    """(consumer, required layout) for every use of `node` that has a requirement."""
    for user in node.users:
        req = user.meta.get(IN_LAYOUTS)
        if not req:
            continue
        args = bind(user) if isinstance(user.target, torch._ops.OpOverload) else (
            {"outputs": user.args[0]} if user.op == "output" else {}
        )
        for k, want in req.items():
            src = args.get(k)
            if isinstance(src, (list, tuple)):
                for s, w in zip(src, want):
                    if s is node and w is not None:
                        yield user, w
            elif src is node and want is not None:
                yield user, want


def _adopt_free_weights(gm: fx.GraphModule, mesh: Mesh) -> None:
    """A weight with no planned layout is stored already split the way all its uses need it; under a
    weight-gathered layout (`sw_gather_over`), further split over the batch atoms and gathered before use."""
    params = signature(gm).params
    for node in gm.graph.nodes:
        if node.op != "placeholder" or node.name not in params or WEIGHT in node.meta:
            continue
        wants = {w.without_partial() for _, w in uses(node)}
        if len(wants) != 1:
            continue
        layout = wants.pop()
        extra = [a for a in node.meta.get(GATHER, ()) if a not in layout.used]
        node.meta[LAYOUT] = spread(layout, tuple(node.meta["val"].shape), extra, mesh) if extra else layout


def spread(layout: Layout, shape: tuple[int, ...], atoms: list[str], mesh: Mesh) -> Layout:
    """`layout` further split over `atoms` on its largest dim that divides, else unchanged."""
    local = layout.local_shape(shape, mesh)
    g = mesh.group_size(atoms)
    for d in sorted(range(len(shape)), key=lambda d: -local[d]):
        if local[d] % g == 0 and local[d] >= g:
            return layout.with_dim(d, layout.dims[d] + tuple(atoms))
    return layout
