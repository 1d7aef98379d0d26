"""What a rank stores: one walk over the weight placeholders and the sharded program inputs (KV caches).

Every count of bytes or parameters — the plan's memory per chip, what stays replicated, the model's
parameter count, the planner's HBM check — is a sum over `stored_tensors`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.fx as fx

from ..ir.layout import Layout
from ..ir.mesh import Mesh
from ..ir.meta import IO_LAYOUTS, LAYOUT
from ..ir.plan import ReplicatedWeight
from .find_layers import block_of
from .graph_utils import signature, structure_fact


@dataclass(frozen=True, init=False)
class Stored:
    node: fx.Node
    key: str | None  # state key of a weight; None for a sharded program input (a KV cache)
    is_parameter: bool  # a parameter, not a buffer or a lifted constant (weights only)
    in_block: bool  # read by ops of a repeated block (counted once per block by the planner)
    numel: int  # the whole tensor
    local_numel: int  # one rank's piece under the node's layout
    itemsize: int  # bytes per element as captured
    factor: int  # how many ranks hold each element (1: split over every chip)

    def __init__(self, node: fx.Node, key: str | None, is_parameter: bool, in_block: bool, numel: int,
                 local_numel: int, itemsize: int, factor: int) -> None:
        # the fields written straight into the dict (a frozen dataclass's own __init__ sets each through
        # object.__setattr__): the planner makes one per stored tensor of every candidate it costs
        d = self.__dict__
        d["node"], d["key"], d["is_parameter"], d["in_block"] = node, key, is_parameter, in_block
        d["numel"], d["local_numel"], d["itemsize"], d["factor"] = numel, local_numel, itemsize, factor

    @property
    def kind(self) -> str:
        return "kv_cache" if self.key is None else "weights"

    def local_bytes(self, itemsize: int | None = None) -> float:
        return self.local_numel * (itemsize or self.itemsize)


def stored_tensors(gm: fx.GraphModule, mesh: Mesh | None = None) -> list[Stored]:
    """Every weight placeholder and every sharded program input, with its size on one rank of `mesh`
    under its planned layout (replicated when it has none; whole when `mesh` is None)."""
    io = gm.meta.get(IO_LAYOUTS, {})
    out = []
    for n, key, is_parameter, in_block, shape, numel, itemsize in structure_fact(gm, "placeholders", _placeholders):
        if key is None and n.name not in io:
            continue
        layout = n.meta.get(LAYOUT) or Layout.replicated(len(shape))
        local, factor = _split(layout, shape, mesh) if mesh is not None else (numel, 1)
        out.append(Stored(n, key, is_parameter, in_block, numel, local, itemsize, factor))
    return out


@lru_cache(maxsize=1 << 14)
def _split(layout: Layout, shape: tuple[int, ...], mesh: Mesh) -> tuple[int, int]:
    """(elements one rank holds, how many ranks hold each element) of a tensor of `shape` in `layout`
    (remembered: the planner asks it for every stored tensor of every candidate)."""
    return math.prod(layout.local_shape(shape, mesh)), mesh.size // mesh.group_size(layout.used)


def _placeholders(gm: fx.GraphModule) -> list[tuple]:
    """(node, state key or None, is a parameter, in a block, shape, numel, itemsize) of every tensor
    placeholder: what `stored_tensors` reads that no layout changes."""
    sig = signature(gm)
    out = []
    for n in gm.graph.nodes:
        if n.op != "placeholder" or not isinstance(n.meta.get("val"), torch.Tensor):
            continue
        key = sig.params.get(n.name)
        v = n.meta["val"]
        in_block = bool(n.users) and block_of(next(iter(n.users))) is not None
        out.append((n, key, key is not None and key not in sig.buffers, in_block, tuple(v.shape), v.numel(),
                    v.element_size()))
    return out


def weights(gm: fx.GraphModule, mesh: Mesh | None = None) -> list[Stored]:
    return [s for s in stored_tensors(gm, mesh) if s.key is not None]


def weight_memory(gm: fx.GraphModule, mesh: Mesh) -> dict[str, float]:
    """Bytes a rank stores as captured: all weights, its share, and what is replicated beyond 1/n."""
    ws = weights(gm, mesh)
    total = sum(s.numel * s.itemsize for s in ws)
    local = sum(s.local_bytes() for s in ws)
    return {"weights_total": total, "weights_per_chip": local, "replicated_per_chip": local - total / mesh.size}


def replicated_weights(gm: fx.GraphModule, mesh: Mesh) -> list[ReplicatedWeight]:
    """Every weight not split n ways: its key, bytes per rank beyond the 1/n share, replication factor."""
    return [ReplicatedWeight(s.key, s.local_bytes() * (1 - 1 / s.factor), s.factor)
            for s in weights(gm, mesh) if s.factor > 1]
