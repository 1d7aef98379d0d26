"""Applying a choice of layouts to a captured graph, through the pass pipeline.

`choices_for` names the layout of every layer from the chosen candidates (one per block, or one for
all) and what the user forced; `apply` forgets the previous choice, runs assign_layouts and propagate,
and returns the conversions insert_collectives inserts (inserting them when asked). The planner applies
hundreds of candidates to one prototype graph this way; the recorder and the program builder, one.
"""

from __future__ import annotations

import torch.fx as fx

from ..ir.kinds import LayerKind
from ..ir.mesh import Mesh
from ..ir.meta import ANCHOR, ASSIGNMENT, ATTENTION, GATHER, IN_LAYOUTS, IO_LAYOUTS, LAYOUT, NOTE, UNKNOWN, WEIGHT
from ..passes.assign_layouts import assign_layouts
from ..passes.find_layers import Layers
from ..passes.insert_collectives import Conversion, insert_collectives, plan_conversions
from ..passes.pipeline import Pass, run_pipeline
from ..passes.propagate import propagate
from ..strategies.request import DEFAULTS
from .candidate import Candidate

_NODE_KEYS = (WEIGHT, ANCHOR, ATTENTION, GATHER, LAYOUT, IN_LAYOUTS, NOTE)
_GRAPH_KEYS = (IO_LAYOUTS, ASSIGNMENT, UNKNOWN)


def choices_for(layers: Layers, chosen: list[Candidate], forced: dict[str, str]) -> dict[str, str]:
    """Layer name → layout name: block i takes chosen[i] (the last one past the end, so one candidate
    serves every block); embeddings and heads take what was forced, else their defaults."""
    out = {}
    for l in layers.layers:
        c = chosen[min(l.block, len(chosen) - 1)] if l.block is not None else chosen[0]
        if l.kind == LayerKind.FFN:
            out[l.name] = c.member.name
        elif l.kind == LayerKind.EXPERTS:  # the block's member, and how the experts split under it
            mode = c.experts or forced.get(LayerKind.EXPERTS, "sliced")
            out[l.name] = c.member.name + (f":{mode}" if mode != "sliced" else "")
        elif l.kind == LayerKind.ATTENTION:  # the split of heads, and of a latent attention's low-rank projections
            out[l.name] = c.attention + (":split" if (c.latent or forced.get("latent")) == "split" else "")
        else:
            out[l.name] = forced.get(l.kind, DEFAULTS[l.kind])
    return out


def reset(gm: fx.GraphModule) -> None:
    """Forget the previous choice's decisions (a prototype graph is reused for every candidate)."""
    for n in gm.graph.nodes:
        meta = n.meta
        for k in _NODE_KEYS:
            if k in meta:  # (most are not there: cheaper than pop(k, None) for each)
                del meta[k]
    for k in _GRAPH_KEYS:
        gm.meta.pop(k, None)


def apply(gm: fx.GraphModule, mesh: Mesh, choices: dict[str, str], *, check: bool = True,
          insert: bool = False) -> list[Conversion]:
    """assign_layouts + propagate for `choices` (`check=False`: the planner's inner loop, which skips
    validating rule answers and linting); the conversions they need, inserted with `insert=True`."""
    reset(gm)
    run_pipeline(gm, [Pass(assign_layouts, mesh, choices), Pass(propagate, mesh, check=check)], lint=check)
    conversions = plan_conversions(gm, mesh)
    if insert:
        run_pipeline(gm, [Pass(insert_collectives, mesh)])
    return conversions
