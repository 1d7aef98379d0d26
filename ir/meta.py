"""Every key shardwise keeps in `gm.meta` (whole graph) or `node.meta` (one node): the pass contract.

Each pass declares the keys it needs and the keys it makes (`passes/pipeline.py`), and the pipeline
checks them for every pass it runs: a graph key must be present (and of its declared type); a node key
with a scope must be on every node of that scope. A key used anywhere must be declared here, once.

The values' types live on higher floors (a `Layers` record is made by passes/find_layers.py), so they
are named here by dotted path and resolved only by the pipeline, which sits above them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Level(str, Enum):
    GRAPH = "graph"  # gm.meta
    NODE = "node"  # node.meta


class Scope(str, Enum):
    """Which nodes must carry a node key once a pass has made it (SOME: no such promise)."""

    SOME = "some"
    TENSORS = "tensors"  # every placeholder and call_function whose value is a tensor
    CALLS = "calls"  # every call_function node


@dataclass(frozen=True)
class MetaKey:
    name: str
    level: Level
    type: str  # dotted path of the value's type ("builtins.dict", "shardwise.ir.layout.Layout", ...)
    meaning: str
    scope: Scope = Scope.SOME

    def __str__(self) -> str:
        return self.name


KEYS: dict[str, MetaKey] = {}


def _declare(name: str, level: Level, type_: str, meaning: str, scope: Scope = Scope.SOME) -> str:
    if name in KEYS:
        raise ValueError(f"meta key {name!r} is declared twice")
    KEYS[name] = MetaKey(name, level, type_, meaning, scope)
    return name


G, N = Level.GRAPH, Level.NODE
_P = "shardwise.passes"

# ------------------------------------------------------------------------------------ whole graph
SIGNATURE = _declare("sw_signature", G, f"{_P}.graph_utils.Signature",
                     "placeholders → weights (state keys) and the user's call (flat inputs, pytree specs)")
STATE = _declare("sw_state", G, "builtins.dict",
                 "state key → tensor: the full weights (real or meta tensors), derived slices included")
LAYERS = _declare("sw_layers", G, f"{_P}.find_layers.Layers",
                  "the layer regions (embedding, attention, ffn, head) and blocks, with the model's dims")
ASSIGNMENT = _declare("sw_assignment", G, f"{_P}.assign_layouts.Assignment",
                      "the layout chosen per layer, the family member per block, notes per layer")
IO_LAYOUTS = _declare("sw_io_layouts", G, "builtins.dict",
                      "placeholder name or 'output:j' → Layout of a sharded program input/output (KV caches)")
UNKNOWN = _declare("sw_unknown_ops", G, "builtins.list",
                   "ops with no layout rule, run on replicated inputs (UnknownOp records)")
PLAN = _declare("sw_plan", G, "shardwise.ir.plan.Plan", "the Plan record summarize made of the graph")
RANK_BLOCKS = _declare("sw_rank_blocks", G, "builtins.dict",
                       "on a rank program (emit): its node name → the block (repeated module, layers.3) of the "
                       "global-view op it lowers, or None; passes/schedule.py bounds weight prefetch by it")
PROTOTYPE_NOTE = _declare("sw_prototype_note", G, "builtins.str",
                          "a one-block prototype: how the model's blocks differ from it ('' where they do not)")

# ------------------------------------------------------------------------------------ per node
FUSED_NORM = _declare("sw_fused_norm", N, f"{_P}.canonicalize.FusedNorm",
                      "on the last node of a decomposed norm: how emit fuses it back where E is whole")
BLOCK = _declare("sw_block", N, "builtins.str | None", "cache: the repeated module holding the node (layers.3)")
LAYER_OF = _declare("sw_layer_of", N, "builtins.str | None", "cache: the layer whose module holds the node")
WEIGHT = _declare("sw_weight", N, "shardwise.strategies.rules.WeightSpec",
                  "on a planned weight placeholder: its layout at rest and in use")
ATTENTION = _declare("sw_attention", N, "shardwise.strategies.rules.AttentionSpec",
                     "on an attention core: how its batch and heads are split")
DISPATCH = _declare("sw_dispatch", N, "builtins.tuple",
                    "on a moe_ffn: the atoms its tokens stay split over, routed rows sent to their experts' "
                    "ranks by all-to-all")
RAGGED = _declare("sw_ragged", N, "builtins.bool",
                  "on a lowered all-to-all of uneven splits: charged its output (the rows its rank owns)")
ANCHOR = _declare("sw_anchor", N, "shardwise.ir.layout.Layout",
                  "on a block's input: the residual layout every consumer must see")
GATHER = _declare("sw_gather_over", N, "builtins.tuple",
                  "on a weight no layer plans (norm, bias): atoms it is stored split over (weight-gathered)")
LAYOUT = _declare("sw_layout", N, "shardwise.ir.layout.Layout | tuple",
                  "the layout of the node's output (a tuple of layouts for tuple outputs)", Scope.TENSORS)
IN_LAYOUTS = _declare("sw_in_layouts", N, "builtins.dict",
                      "schema argument name → the layout the op needs (a list for list arguments)")
NOTE = _declare("sw_note", N, "builtins.str", "why an op ran on replicated inputs")
BOUND = _declare("sw_bound", N, "builtins.tuple", "cache: the node's arguments bound to its schema names")
COLLECTIVE = _declare("sw_collective", N, "shardwise.ir.collective.Collective",
                      "on an inserted redistribution node: the collective step it stands for")
CONVERSION = _declare("sw_conversion", N, "builtins.tuple",
                      "on an inserted node (or a moe_ffn running its own dispatch): (source node, first consumer) "
                      "names of its conversion, and the layer it is accounted to (None: attribute it)")
STEP = _declare("sw_step", N, "shardwise.ir.collective.Collective",
                "on a lowered collective op of a rank program: the Collective it runs")
GLOBAL = _declare("sw_global", N, "builtins.str",
                  "on a lowered collective op: the name of the global-view node it lowers")
LOOP = _declare("sw_loop", N, "builtins.tuple",
                "on a ring step of a looped collective matmul (passes/collective_matmul.py): (the collective kind its loop performs, the group size, whether it is the loop's first step)")


def declared(name: str) -> MetaKey:
    try:
        return KEYS[name]
    except KeyError:
        raise KeyError(f"meta key {name!r} is not declared in shardwise/ir/meta.py") from None
