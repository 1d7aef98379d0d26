"""What a plan splits and what it leaves whole: the fractions of parameter bytes and matmul FLOPs
sharded (`Tally` → `ir.Sharding`), and `check_sharded`, which warns (NotShardedWarning) or, with
`strict`, refuses when a block's matmuls run whole on every chip.
"""

from __future__ import annotations

import math
import re
import sys
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx

from ..errors import ShardwiseError
from ..ir.mesh import Mesh
from ..ir.meta import IN_LAYOUTS, LAYERS, LAYOUT
from ..ir.plan import (
    NotShardedWarning,
    Plan,
    ReplicatedParam,
    Sharding,
    UnshardedOp,
)
from ..passes.find_layers import Layers, block_of
from ..passes.graph_utils import MATMULS, is_experts_ffn, module_path, routed_rows, signature
from ..passes.storage import weights
from .costing import experts_flops, op_flops


def blocks_named(name: str, block: str, start: int, end: int) -> str:
    head, _, idx = block.rpartition(".")
    if not idx.isdigit():
        return name
    return name.replace(block, f"{head}.[{start}-{end}]" if end > start else f"{head}.{start}", 1)


# ------------------------------------------------------------------------------------ what is sharded
aten = torch.ops.aten
_SDPA = aten.scaled_dot_product_attention.default
# matmul-like ops outside the matmul table: the position of the operand contracted on its last dim
_BATCHED = {aten.matmul.default: 0, aten.baddbmm.default: 1}
_GROUPED = re.compile(r"(^|[:_])grouped_mm")  # a mixture of experts' grouped matmul (torch._grouped_mm, HF's)


def _contracted(node: fx.Node) -> int | None:
    """The position of the operand a matmul-like op outside the matmul table contracts on its last dim."""
    t = node.target
    if t in _BATCHED:
        return _BATCHED[t]
    name = getattr(getattr(t, "_schema", None), "name", "")
    return 0 if _GROUPED.search(name) else None


def matmul_work(node: fx.Node, mesh: Mesh) -> tuple[float, float] | None:
    """(FLOPs of the whole op, FLOPs one chip spends on it) for a matmul-like op of a propagated graph
    (projections, batched and grouped matmuls, attention cores; the cost model's count where it has
    one), else None. An op without recorded layouts runs whole on every chip."""
    if node.op != "call_function":
        return None
    if is_experts_ffn(node):
        try:
            return experts_flops(node, mesh, busiest=False)
        except (KeyError, TypeError, ValueError):
            rows, E = routed_rows(node), node.args[0].meta["val"].shape[-1]
            whole = 2.0 * rows * 3 * E * node.args[3].meta["val"].shape[1]
            return whole, whole
    t = node.target
    i = None if t in MATMULS or t is _SDPA else _contracted(node)
    if (i is None and t not in MATMULS and t is not _SDPA) or not isinstance(node.meta.get("val"), torch.Tensor):
        return None
    try:
        if t is _SDPA:
            B, H, Lq, D = node.args[0].meta["val"].shape
            whole = float(4 * B * H * Lq * node.args[1].meta["val"].shape[2] * D)
        else:
            x = node.args[MATMULS[t].x if t in MATMULS else i]
            whole = float(2 * node.meta["val"].numel() * x.meta["val"].shape[-1])
    except (TypeError, ValueError, RuntimeError):  # shapes not known as numbers (data-dependent)
        return None
    try:
        if i is None:
            return whole, op_flops(node, mesh)
        name = t._schema.arguments[i].name
        k_local = node.meta[IN_LAYOUTS][name].local_shape(tuple(x.meta["val"].shape), mesh)[-1]
        local_out = math.prod(node.meta[LAYOUT].local_shape(tuple(node.meta["val"].shape), mesh))
        return whole, 2.0 * local_out * k_local
    except (KeyError, AttributeError, TypeError, IndexError, ValueError):  # no layouts recorded: run whole
        return whole, whole


def _weight_read(node: fx.Node, params: dict[str, str]) -> fx.Node | None:
    """The parameter a matmul multiplies by (not its bias): directly, or through ops of one input (a
    transpose, a view, an expert's slice of stacked expert weights)."""
    if node.target in MATMULS:
        operands = [node.args[MATMULS[node.target].w]]
    else:
        i = _contracted(node)
        operands = node.args[i + 1:i + 2] if i is not None else []  # the operand multiplied by the contracted one
    for a in operands:
        if not isinstance(a, fx.Node):
            continue
        for _ in range(6):
            if a.name in params:
                return a
            if a.op != "call_function" or len(a.all_input_nodes) != 1:
                break
            a = a.all_input_nodes[0]
    return None


@dataclass
class Tally:
    """Parameter bytes and matmul FLOPs, split or whole, summed over the runs of blocks of a plan: a
    prototype's block counted once per block of each run, the ops before the blocks (the embedding)
    from the first run's layouts, those after them (the head) from the last run's."""

    mesh: Mesh
    params: dict[str, list[float]] = field(default_factory=dict)  # name → [bytes, sharded bytes]
    flops: float = 0.0
    sharded_flops: float = 0.0
    ops: dict[tuple[str, str], UnshardedOp] = field(default_factory=dict)
    experts: dict[str, None] = field(default_factory=dict)
    expert_bytes: float = 0.0
    experts_per_block: int | None = None

    def add(self, gm: fx.GraphModule, start: int, end: int, *, first: bool, last: bool) -> None:
        layers: Layers = gm.meta[LAYERS]
        sig = signature(gm)
        nodes = list(gm.graph.nodes)
        order = {n: i for i, n in enumerate(nodes)}
        by_name = {n.name: n for n in nodes}
        inputs = [by_name[b.input] for b in layers.blocks]
        begin = min((order[n] for n in inputs), default=len(nodes))
        block_path = layers.blocks[0].name if len(layers.blocks) == 1 else None
        count = end - start + 1

        def times(node: fx.Node | None, in_block: bool) -> int:
            if in_block:
                return count
            before = node is not None and order[node] < begin
            return int(first if before else last)

        def named(name: str) -> str:  # a prototype's block stands for blocks start..end
            return blocks_named(name, block_path, start, end) if block_path else name

        experts = list(layers.experts)
        whole_weights = set()  # parameters every chip holds whole
        for s in weights(gm, self.mesh):
            if not s.is_parameter:
                continue
            if s.factor == self.mesh.size:
                whole_weights.add(s.node.name)
            user = next(iter(s.node.users), None)
            n = times(user, s.in_block)
            if not n:
                continue
            nbytes = n * s.numel * s.itemsize
            entry = self.params.setdefault(named(s.key), [0.0, 0.0])
            entry[0] += nbytes
            entry[1] += nbytes if s.factor < self.mesh.size else 0.0
            if user is not None and _under(module_path(user), experts):
                self.expert_bytes += nbytes
        for e in experts:
            self.experts[named(e)] = None
        if experts and self.experts_per_block is None:
            self.experts_per_block = _experts_per_block(gm, experts)

        fed = _downstream(inputs)  # what the residual stream reaches (not position tables, rotary angles)
        params = {k: v for k, v in sig.params.items() if v not in sig.buffers}
        kv = _kv_weights(layers) | _routers(layers) | _latents(layers)
        for node in nodes:
            work = matmul_work(node, self.mesh)
            if work is None or not work[0]:
                continue
            whole, local = work
            in_block = block_of(node) is not None
            n = times(node, in_block)
            split = local < whole
            self.flops += n * whole
            self.sharded_flops += n * whole if split else 0.0
            if self.mesh.size == 1 or not n or not in_block:
                continue
            w = _weight_read(node, params)
            if w is not None and w.name in kv:
                continue  # K/V heads that do not split over every chip, a mixture's router: replicated by the layout
            why = [] if split or not (w is not None or node in fed) else ["every chip computes it whole"]
            if w is not None and w.name in whole_weights:
                why.append("every chip holds its weight whole")
            if why:
                key = (node.name, named(module_path(node)))
                op = self.ops.setdefault(key, UnshardedOp(node=node.name, target=_op_name(node), module=key[1],
                                                          weight=named(params[w.name]) if w is not None else "",
                                                          why=", ".join(why), count=0))
                op.flops += n * whole
                op.count += n

    def sharding(self) -> Sharding:
        total = sum(b for b, _ in self.params.values())
        sharded = sum(s for _, s in self.params.values())
        replicated = sorted((ReplicatedParam(name, b - s, (b - s) / total) for name, (b, s) in self.params.items()
                             if b - s > 0), key=lambda r: -r.bytes)
        ops = sorted(self.ops.values(), key=lambda o: -o.flops)
        for o in ops:
            o.share = o.flops / self.flops if self.flops else 0.0
        return Sharding(chips=self.mesh.size, param_bytes=total, sharded_param_bytes=sharded, flops=self.flops,
                        sharded_flops=self.sharded_flops, replicated=replicated, unsharded=ops,
                        experts=list(self.experts), expert_param_bytes=self.expert_bytes,
                        experts_per_block=self.experts_per_block)


def _kv_weights(layers: Layers) -> set[str]:
    """The weights of attention's own K and V projections (not fused with q or o): with fewer KV heads than
    chips along the heads' axes, the layout replicates them (MQA, GQA); the attention's note says so."""
    out: set[str] = set()
    for l in layers.by_kind("attention"):
        own = {l.projections[r].weight for r in ("q", "o", "gate") if r in l.projections}
        out |= {l.projections[r].weight for r in ("k", "v") if r in l.projections} - own
    return out


def _routers(layers: Layers) -> set[str]:
    """The routers of the experts layers: replicated by design, so every rank routes exactly as the unsharded
    model does (the experts layer's note says so)."""
    return {l.info["router"] for l in layers.by_kind("experts") if "router" in l.info}


def _latents(layers: Layers) -> set[str]:
    """The low-rank projections of latent attentions: replicated or split by the planner's choice (`latent`),
    which the attention's note names."""
    return {p.weight for l in layers.by_kind("attention") for p in l.info.get("latent", {}).values()}


def _under(path: str, modules: list[str]) -> bool:
    return any(path == m or path.startswith(m + ".") for m in modules)


def _downstream(sources: list[fx.Node]) -> set[fx.Node]:
    seen, todo = set(sources), deque(sources)
    while todo:
        for u in todo.popleft().users:
            if u not in seen:
                seen.add(u)
                todo.append(u)
    return seen


def _op_name(node: fx.Node) -> str:
    t = node.target
    return t._schema.name.replace("::", ".") if hasattr(t, "_schema") else str(t)


def _experts_per_block(gm: fx.GraphModule, experts: list[str]) -> int | None:
    """How many experts one mixture-of-experts module holds: the leading dim of its stacked (3-D) expert
    weights, else the most numbered children (experts.0 … experts.7) its weights' modules are in."""
    sig = signature(gm)
    path = experts[0]
    stacked, numbered = [], {}
    for n in gm.graph.nodes:
        if n.op != "placeholder" or n.name not in sig.params or sig.params[n.name] in sig.buffers:
            continue
        for u in n.users:
            p = module_path(u)
            if not _under(p, [path]):
                continue
            if n.meta["val"].ndim == 3:
                stacked.append(n.meta["val"].shape[0])
            rest = p[len(path):].split(".")
            i = next((j for j, part in enumerate(rest) if part.isdigit()), None)
            if i is not None:
                numbered.setdefault(tuple(rest[:i]), set()).add(rest[i])
    if stacked:
        return max(stacked)
    return max((len(v) for v in numbered.values()), default=None) or None


def check_sharded(plan: Plan, strict: bool = False) -> Plan:
    """Warn (NotShardedWarning), or with `strict` raise a ShardwiseError, when some of a block's matmuls
    are not sharded (every chip computes them, or holds their weights, whole): `Plan.sharding.unsharded`.
    Returns the plan, for chaining; warns once per plan (plan() and verify() may both check it)."""
    if not isinstance(strict, bool):
        raise ShardwiseError(f"strict={strict!r}: expected True (a block's unsharded matmuls are an error) or False "
                             f"(a warning)")
    s = plan.sharding
    if s is None or not s.unsharded:
        return plan
    experts = [u for u in s.unsharded if _under(u.module, s.experts)]
    others = [u for u in s.unsharded if u not in experts]
    share = sum(u.share for u in s.unsharded)
    parts = []
    if others:
        parts.append("; ".join(u.describe() for u in others[:6]) + (f"; … {len(others) - 6} more" if len(others) > 6
                                                                      else ""))
    if experts:
        parts.append(f"{len(experts)} matmul{'s' * (len(experts) > 1)} of mixture-of-experts experts "
                     f"({', '.join(s.experts[:3])}{' …' if len(s.experts) > 3 else ''}: "
                     f"{sum(u.share for u in experts) * 100:.1f}% of the matmul FLOPs)")
    n = len(s.unsharded)
    msg = (f"{plan.model} on mesh {plan.mesh}: {n} matmul{'s' * (n > 1)} inside the blocks {'are' if n > 1 else 'is'} "
           f"not sharded ({share * 100:.1f}% of the matmul FLOPs; {s.line()}): {'; '.join(parts)}. Expected every "
           f"matmul of a block to be split over the chips, its weight too: "
           f"shardwise splits the projections of attention (q, k, v, o, an output gate) and of a feed-forward "
           f"(in → activation → out, gated or not); other matmuls run replicated"
           + (", and so do the experts of a mixture of experts" if experts else "")
           + ". To shard them, "
           + ("write the block's extra projections as part of its attention or feed-forward (q/k/v/o, in/gate/out), "
              if others else "")
           + ("plan a dense model (shardwise splits experts only when they are grouped matmuls over stacked "
              "[experts, ·, ·] weights), " if experts else "")
           + "or "
           + ("accept them replicated: plan(..., strict=False) warns instead of failing" if strict else
              "accept them replicated (plan(..., strict=True) makes this an error)"))
    if strict:
        raise ShardwiseError(msg)
    if not getattr(plan, "_warned_unsharded", False):
        warnings.warn(msg, NotShardedWarning, stacklevel=_user_level())
        plan._warned_unsharded = True
    return plan


_ROOT = Path(__file__).resolve().parents[1]
_OURS = {p.name for p in _ROOT.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()} - {
    "tests", "experiments", "benchmarks"}  # the library's modules and packages, not the scripts that use it


def _user_level() -> int:
    """The stack level of the first frame outside shardwise (the user's call), for warnings.warn."""
    level, f = 2, sys._getframe(2)  # the frame that called check_sharded
    while f is not None:
        try:
            inside = Path(f.f_code.co_filename).resolve().relative_to(_ROOT).parts[0] in _OURS
        except (ValueError, IndexError, OSError):
            inside = False
        if not inside:
            return level
        f, level = f.f_back, level + 1
    return 2
