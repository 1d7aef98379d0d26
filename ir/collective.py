"""One step of a redistribution: a collective over a group of mesh atoms, or a free local step.

Bytes follow the paper's accounting, per chip: an all-gather is charged its output, a reduce-scatter
its input, an all-to-all its input, an all-reduce twice its input (reduce-scatter + all-gather).
`wire_bytes` adds the (g−1)/g factor the paper drops: what a chip really sends in a ring of g.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .layout import Layout
from .mesh import Mesh

Kind = Literal["all_gather", "reduce_scatter", "all_reduce", "all_to_all", "slice", "mask"]
COMMUNICATING = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all")
# a merging all-gather whose output exceeds this is run in pieces (`Collective.pieces`, passes/gather_pieces.py)
PIECE_BYTES = 16 * 2**20

_SYMBOL = {
    "all_gather": "all-gather",
    "reduce_scatter": "reduce-scatter",
    "all_reduce": "all-reduce",
    "all_to_all": "all-to-all",
    "slice": "slice",
    "mask": "mask",
}


@dataclass(frozen=True, init=False)
class Collective:
    kind: Kind
    atoms: tuple[str, ...]  # the group, in chunk order (major first)
    src: Layout
    dst: Layout
    dim: int | None = None  # dim gathered / scattered / sliced; all-to-all: the dim the atoms leave
    dst_dim: int | None = None  # all-to-all: the dim the atoms join
    elements: int = 0  # per chip, the element count the paper's accounting charges (see module doc)
    itemsize: int = 4
    group_size: int = 1
    axes: tuple[str, ...] = ()  # mesh axes whose links it uses

    def __init__(self, kind: Kind, atoms: tuple[str, ...], src: Layout, dst: Layout, dim: int | None = None,
                 dst_dim: int | None = None, elements: int = 0, itemsize: int = 4, group_size: int = 1,
                 axes: tuple[str, ...] = ()) -> None:
        # the fields written straight into the dict (a frozen dataclass's own __init__ sets each through
        # object.__setattr__): the planner makes thousands per plan
        d = self.__dict__
        d["kind"], d["atoms"], d["src"], d["dst"], d["dim"], d["dst_dim"] = kind, atoms, src, dst, dim, dst_dim
        d["elements"], d["itemsize"], d["group_size"], d["axes"] = elements, itemsize, group_size, axes

    def __hash__(self) -> int:  # the frozen dataclass's value, made once (fusion groups are keyed by steps)
        try:
            return self.__dict__["_hash"]
        except KeyError:
            h = hash((self.kind, self.atoms, self.src, self.dst, self.dim, self.dst_dim, self.elements, self.itemsize,
                      self.group_size, self.axes))
            object.__setattr__(self, "_hash", h)
            return h

    def __reduce__(self):  # the fields only: hashes (of strings, of layouts) differ between processes
        return type(self), (self.kind, self.atoms, self.src, self.dst, self.dim, self.dst_dim, self.elements,
                            self.itemsize, self.group_size, self.axes)

    @property
    def communicates(self) -> bool:
        return self.kind in COMMUNICATING

    @property
    def bytes(self) -> int:
        if not self.communicates:
            return 0
        factor = 2 if self.kind == "all_reduce" else 1
        return factor * self.elements * self.itemsize

    @property
    def wire_bytes(self) -> float:
        return self.bytes * (self.group_size - 1) / self.group_size if self.group_size > 1 else 0.0

    def local_copies(self, reorder: bool = False) -> int:
        """How many local copies of its charged tensor its lowering makes (runtime/lower.py): one over the
        first dim, its group in mesh order (`reorder` False), needs none; an all-gather over another dim
        merges its blocks (one copy), a reduce-scatter moves them to the front first (one); an all-to-all
        moves the leaving blocks to the front (one, unless they are there) and merges the arriving ones
        (one, and one more to move them back to a dim other than the first)."""
        if self.kind in ("all_gather", "reduce_scatter"):
            return int(bool(self.dim) or reorder)
        if self.kind == "all_to_all":
            return int(bool(self.dst_dim) or reorder) + 1 + int(bool(self.dst_dim))
        return 0

    def pieces(self, rows: int) -> int:
        """How many collectives its rank program runs it as (passes/gather_pieces.py): an all-gather that
        merges its blocks into a dim other than the first, with an output above PIECE_BYTES, is gathered in
        pieces along the first dim (`rows` per chip), the fewest that divide the rows and keep each within
        PIECE_BYTES (at most one per row); anything else is one."""
        if self.kind != "all_gather" or not self.dim or self.bytes <= PIECE_BYTES or rows < 2:
            return 1
        k = min(-(-self.bytes // PIECE_BYTES), rows)
        while rows % k:
            k += 1
        return k

    def with_itemsize(self, itemsize: int) -> "Collective":
        from dataclasses import replace

        return replace(self, itemsize=itemsize)

    def describe(self, mesh: Mesh, names: str | None = None) -> str:
        """`all-gather(yz) BLE_xyz → BLE_x  [1.5 MiB/chip]`."""
        group = mesh.format_atoms(self.atoms)
        arrow = f"{self.src.notation(mesh, names)} → {self.dst.notation(mesh, names)}"
        size = f"  [{format_bytes(self.bytes)}/chip]" if self.communicates else ""
        return f"{_SYMBOL[self.kind]}({group}) {arrow}{size}"


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
