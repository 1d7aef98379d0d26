"""Redistribution: the collectives that turn one layout of a tensor into another.

This is the one source of truth for communication: `insert_collectives` puts exactly these steps on
the graph, and the cost model charges exactly these bytes.

The rules of DESIGN.md, applied one atom group at a time (greedy, cheapest kind first):
  partial → a dim that wants the atoms next          reduce-scatter
  atoms leave one dim and are wanted next by another  all-to-all
  replicated → sharded                                local slice (free, so as early as possible)
  partial → nowhere                                   all-reduce (while the tensor is smallest)
  atoms leave a dim                                   all-gather (minor atoms first)
  replicated → partial                                local mask (free: one rank keeps the value)
Atoms on a dim are major→minor, so only a minor suffix can leave a dim without reordering data.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

from ..errors import LayoutError
from ..ir.collective import Collective
from ..ir.layout import Layout
from ..ir.mesh import Mesh


def _is_prefix(a: Sequence[str], b: Sequence[str]) -> bool:
    return len(a) <= len(b) and tuple(b[: len(a)]) == tuple(a)


def _common_prefix(a: Sequence[str], b: Sequence[str]) -> int:
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n


class _State:
    def __init__(self, layout: Layout, local: list[int]):
        self.dims = [list(d) for d in layout.dims]
        self.partial = set(layout.partial)
        self.local = local

    def layout(self) -> Layout:
        return Layout(tuple(map(tuple, self.dims)), frozenset(self.partial))

    @property
    def used(self) -> set[str]:
        return {a for d in self.dims for a in d}


def redistribute(
    src: Layout, dst: Layout, shape: Sequence[int], mesh: Mesh, *, itemsize: int = 4
) -> list[Collective]:
    """The steps from `src` to `dst` for a tensor of global `shape`; empty when they are equal.

    >>> m = Mesh.parse("2x2x2")
    >>> [s.kind for s in redistribute(Layout(((), ("x","y","z"))), Layout(((), ("x",))), (8, 8), m)]
    ['all_gather']
    """
    return list(_redistribute(src, dst, tuple(shape), mesh, itemsize))


@lru_cache(maxsize=1 << 16)
def _redistribute(src: Layout, dst: Layout, shape: tuple[int, ...], mesh: Mesh, itemsize: int) -> tuple[Collective, ...]:
    if src == dst:
        return ()
    local = src.local_shape(shape, mesh)  # (checks src against the shape)
    dst.check(shape, mesh)
    state = _State(src, list(local))
    steps: list[Collective] = []
    cur = src  # the state's layout: each step's target is the next one's source
    for _ in range(4 * (len(mesh.atoms) + 1) * (len(shape) + 1)):
        if cur == dst:
            return tuple(steps)
        step = _apply(state, _next_step(state, dst, mesh), mesh, itemsize, cur)
        steps.append(step)
        cur = step.dst
    raise AssertionError(f"redistribute did not converge from {src} to {dst} (steps so far: {steps})")


def _next_step(s: _State, dst: Layout, mesh: Mesh) -> tuple:
    pending = s.partial - dst.partial
    wanted = dst.used
    # 1. reduce-scatter pending partial atoms onto a dim that wants them next
    for d, cur in enumerate(s.dims):
        if _is_prefix(cur, dst.dims[d]):
            run = _run(dst.dims[d][len(cur) :], lambda a: a in pending)
            if run:
                return ("reduce_scatter", run, d, None)
    # 2. all-to-all: a minor suffix leaving one dim is exactly what another dim wants next
    for a, cur in enumerate(s.dims):
        leaving = cur[_common_prefix(cur, dst.dims[a]) :]
        if not leaving:
            continue
        for b, other in enumerate(s.dims):
            if b == a or not _is_prefix(other, dst.dims[b]):
                continue
            nxt = dst.dims[b][len(other) :]
            for k in range(len(leaving), 0, -1):
                if tuple(leaving[-k:]) == tuple(nxt[:k]):
                    return ("all_to_all", tuple(leaving[-k:]), a, b)
    # 3. local slice: atoms a dim wants next that are free (always part of the result, and it may open
    #    an all-to-all: B → B_x makes B_x L H_y → B_xy L H a move instead of a gather)
    used = s.used
    for d, cur in enumerate(s.dims):
        if _is_prefix(cur, dst.dims[d]):
            run = _run(dst.dims[d][len(cur) :], lambda a: a not in used and a not in s.partial)
            if run:
                return ("slice", run, d, None)
    # 4. all-reduce pending partial atoms no dim wants (now, while the tensor is smallest)
    unwanted = [a for a in pending if a not in wanted]
    if unwanted:
        return ("all_reduce", mesh.mesh_order(unwanted), None, None)
    # 5. all-gather atoms that must leave a dim, minor first
    for a, cur in enumerate(s.dims):
        leaving = cur[_common_prefix(cur, dst.dims[a]) :]
        if not leaving:
            continue
        k = 0
        while k < len(leaving) and leaving[len(leaving) - 1 - k] not in wanted:
            k += 1
        return ("all_gather", tuple(leaving[len(leaving) - max(k, 1) :]), a, None)
    # 6. local mask: become partial over free atoms
    new_partial = [a for a in dst.partial if a not in s.partial and a not in used]
    if new_partial:
        return ("mask", mesh.mesh_order(new_partial), None, None)
    # 7. partial atoms wanted by a dim that is not ready: all-reduce, slice later
    if pending:
        return ("all_reduce", mesh.mesh_order(pending), None, None)
    raise AssertionError(f"no redistribution step from {s.layout()} to {dst}")


def _run(atoms: Sequence[str], ok) -> tuple[str, ...]:
    out = []
    for a in atoms:
        if not ok(a):
            break
        out.append(a)
    return tuple(out)


def _apply(s: _State, step: tuple, mesh: Mesh, itemsize: int, src: Layout) -> Collective:
    """Apply `step` to the state (whose layout is `src`): the collective it is."""
    kind, atoms, dim, dst_dim = step
    g = mesh.group_size(atoms)
    before = math.prod(s.local)
    if kind == "reduce_scatter":
        s.partial -= set(atoms)
        s.dims[dim].extend(atoms)
        s.local[dim] //= g
        charged = before
    elif kind == "all_to_all":
        del s.dims[dim][len(s.dims[dim]) - len(atoms) :]
        s.dims[dst_dim].extend(atoms)
        s.local[dim] *= g
        s.local[dst_dim] //= g
        charged = before
    elif kind == "all_reduce":
        s.partial -= set(atoms)
        charged = before
    elif kind == "all_gather":
        del s.dims[dim][len(s.dims[dim]) - len(atoms) :]
        s.local[dim] *= g
        charged = before * g
    elif kind == "slice":
        s.dims[dim].extend(atoms)
        s.local[dim] //= g
        charged = 0
    elif kind == "mask":
        s.partial |= set(atoms)
        charged = 0
    else:  # pragma: no cover - _next_step only yields the kinds above
        raise AssertionError(kind)
    return Collective(
        kind=kind,
        atoms=tuple(atoms),
        src=src,
        dst=s.layout(),
        dim=dim,
        dst_dim=dst_dim,
        elements=charged,
        itemsize=itemsize,
        group_size=g,
        axes=mesh.axes_of(atoms),
    )


def check_layout(layout: Layout, shape: Sequence[int], mesh: Mesh, what: str) -> None:
    """Raise a LayoutError naming `what` when `layout` cannot split `shape` on `mesh`."""
    try:
        layout.check(shape, mesh)
    except LayoutError as e:
        raise LayoutError(f"{what}: {e}") from None


def dispatch(atoms: tuple[str, ...], tokens: int, top_k: int, features: int, experts: int, mesh: Mesh,
             itemsize: int) -> tuple[Collective, ...]:
    """The collectives of an all-to-all dispatch over `atoms` (the tokens split over them, each rank holding
    `tokens` of them, and the experts alike): the per-expert counts all-gathered (int64), so each rank knows
    what it sends and receives; the routed rows ([tokens·top_k, features]) to their experts' ranks; the
    results back. The all-to-alls are uneven (routing decides them): each is charged the rows its rank
    owns, tokens·top_k, whatever the routing (the paper's all-to-all accounting); the busiest rank's
    extra rows are the cost model's load imbalance, not bytes."""
    g = mesh.group_size(atoms)
    rows = Layout((tuple(atoms), ()))
    counts = Collective("all_gather", tuple(atoms), Layout((tuple(atoms),)), Layout.replicated(1), dim=0,
                        elements=g * experts, itemsize=8, group_size=g, axes=mesh.axes_of(atoms))
    move = Collective("all_to_all", tuple(atoms), rows, rows, dim=0, dst_dim=0, elements=tokens * top_k * features,
                      itemsize=itemsize, group_size=g, axes=mesh.axes_of(atoms))
    return counts, move, move
