"""Which layer a collective or an op belongs to: one rule for the report and the cost model.

An op belongs to the layer whose module path contains it. A collective belongs to the layer that
produced its input when that is a layer's op (the output reduce-scatter of a feed-forward layer) or a
sum of its block's layer outputs (the parallel block's attn + ffn); else to the first layer that
consumes it (the input all-gather, norm statistics, a weight-gathered layout's weight all-gather).
What no layer consumes (the final gather of the logits) belongs to "output".
"""

from __future__ import annotations

from collections import deque

import torch.fx as fx

from ..ir.kinds import LayerKind
from ..ir.meta import LAYER_OF as _LAYER
from .find_layers import Layers, block_of
from .graph_utils import module_path

OUTPUT = LayerKind.OUTPUT  # what no layer owns (the final gather of the logits)


class Attribution:
    def __init__(self, layers: Layers):
        self._names = sorted((l.name for l in layers.layers), key=len, reverse=True)

    def layer_of(self, node: fx.Node) -> str | None:
        """The layer whose module holds `node` (cached on the node: it never changes with the layout)."""
        if _LAYER not in node.meta:
            path = module_path(node) if node.op == "call_function" else ""
            node.meta[_LAYER] = next((l for l in self._names if path and (path == l or path.startswith(l + "."))), None)
        return node.meta[_LAYER]

    def owner(self, src: fx.Node, consumer: fx.Node, *, skip=lambda n: False) -> str:
        if src.op == "call_function":
            if owner := self.layer_of(src) or self._producer_in_block(src):
                return owner
        if not skip(consumer) and consumer.op == "call_function" and (owner := self.layer_of(consumer)):
            return owner
        return self._first_consumer(consumer, skip) or OUTPUT

    def of_conversion(self, conversion: tuple, nodes: dict[str, fx.Node]) -> str:
        """The layer an inserted collective is accounted to (its `sw_conversion`): as insert_collectives
        decided it before inserting, else (no layers then) from its source and first consumer."""
        src, consumer, owner = conversion
        return owner or self.owner(nodes[src], nodes[consumer])

    def _producer_in_block(self, src: fx.Node) -> str | None:
        block = block_of(src)
        if block is None:
            return None
        q, seen = deque([src]), {src.name}
        while q:
            n = q.popleft()
            for m in n.all_input_nodes:
                if m.name in seen or m.op != "call_function" or block_of(m) != block:
                    continue
                if owner := self.layer_of(m):
                    return owner
                seen.add(m.name)
                q.append(m)
        return None

    def _first_consumer(self, node: fx.Node, skip) -> str | None:
        q, seen = deque([node]), {node.name}
        while q:
            n = q.popleft()
            for u in n.users:
                if u.op == "output" or u.name in seen:
                    continue
                if not skip(u) and (owner := self.layer_of(u)):
                    return owner
                seen.add(u.name)
                q.append(u)
        return None
