"""Layouts ↔ DTensor placements, for a DeviceMesh with one dim per atom of a shardwise Mesh (interop
with `torch.distributed.tensor.parallelize_module` and friends)."""

from __future__ import annotations

from typing import Sequence

from torch.distributed.tensor import Partial, Replicate, Shard

from ..errors import LayoutError
from ..ir.layout import Layout
from ..ir.mesh import Mesh


def to_placements(layout: Layout, mesh: Mesh) -> tuple:
    """DTensor placements for a DeviceMesh over the atoms of `mesh` (one mesh dim per atom)."""
    placements = []
    for atom in mesh.atoms:
        if atom.name in layout.partial:
            placements.append(Partial())
            continue
        dim = next((i for i, d in enumerate(layout.dims) if atom.name in d), None)
        placements.append(Replicate() if dim is None else Shard(dim))
    # DTensor splits a dim over several mesh dims in mesh order; ours lists atoms major→minor.
    for i, d in enumerate(layout.dims):
        if tuple(d) != mesh.mesh_order(d):
            raise LayoutError(
                f"layout {layout.notation(mesh)} splits dim {i} over {d}, not in mesh order "
                f"{mesh.mesh_order(d)}: DTensor's Shard placements cannot express it"
            )
    return tuple(placements)

def from_placements(placements: Sequence, mesh: Mesh, ndim: int) -> Layout:
    if len(placements) != len(mesh.atoms):
        raise LayoutError(
            f"{len(placements)} placements for a mesh of {len(mesh.atoms)} atoms "
            f"({', '.join(a.name for a in mesh.atoms)}): give one placement per atom"
        )
    dims: list[list[str]] = [[] for _ in range(ndim)]
    partial = []
    for atom, p in zip(mesh.atoms, placements):
        if isinstance(p, Shard):
            dims[p.dim % ndim].append(atom.name)
        elif isinstance(p, Partial):
            if p.reduce_op != "sum":
                raise LayoutError(f"Partial({p.reduce_op!r}) on {atom.name}: only sum partials are supported")
            partial.append(atom.name)
        elif not isinstance(p, Replicate):
            raise LayoutError(f"placement {p!r} on {atom.name} is not Shard, Replicate or Partial")
    return Layout(tuple(tuple(d) for d in dims), frozenset(partial))
