"""Layout of a tensor over the mesh, in the paper's notation.

`Layout(dims=((), (), ("x", "y", "z")))` is `BLE_xyz`: dim 2 is split over the atoms of x, y and z
(x major). `partial` lists the atoms over which the tensor is a pending sum: `BLF_yz {Σx}`.
An atom shards at most one dim and is never both sharding and partial.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

from ..errors import LayoutError
from .mesh import Mesh

_DEFAULT_NAMES = "abcdefghijklmnop"


@dataclass(frozen=True, init=False, eq=False)
class Layout:
    """Interned: making a layout equal to one that exists returns that one, so equal layouts are one object,
    and equality and hashing are identity (object's own, in C). The planner makes, compares and hashes
    tens of thousands of layouts per plan (keys of the rules' and redistribution's caches), a few thousand
    distinct ones: looking one up costs a fifth of making and checking it, and a Python-level __eq__ or
    __hash__ call was the most frequent call of the search. Layouts no one holds are forgotten (weak
    references), and interning is atomic across threads. `used` (the atoms that shard a dim) is computed
    once, with the check."""

    dims: tuple[tuple[str, ...], ...]
    partial: frozenset[str] = frozenset()

    def __new__(cls, dims: tuple[tuple[str, ...], ...], partial: frozenset[str] = frozenset()) -> "Layout":
        key = (dims, partial)
        try:
            got = _INTERNED[key]()
            if got is not None:
                return got
        except KeyError:
            pass
        except TypeError:  # given as lists or a set: the same layout as tuples and a frozenset
            dims, partial = tuple(tuple(d) for d in dims), frozenset(partial)
            key = (dims, partial)
        self = object.__new__(cls)
        used = frozenset().union(*dims)
        state = self.__dict__  # (a frozen dataclass: its fields written straight into its dict)
        state["dims"], state["partial"], state["used"] = dims, partial, used
        if len(used) != sum(map(len, dims)):
            raise LayoutError(f"layout {self}: an atom shards two dims ({[a for d in dims for a in d]})")
        if partial and not partial.isdisjoint(used):
            raise LayoutError(f"layout {self}: atoms {sorted(partial & used)} are both sharding and partial")
        with _LOCK:  # another thread may have made it meanwhile: theirs is the one
            ref = _INTERNED.get(key)
            got = ref() if ref is not None else None
            if got is not None:
                return got
            ref = _INTERNED[key] = _Ref(self, _forget)
            ref.key = key
        return self

    def __reduce__(self):  # the fields only: unpickled or copied, it is interned again
        return type(self), (self.dims, self.partial)

    # ---------------------------------------------------------------------------- constructors
    @classmethod
    def replicated(cls, ndim: int) -> "Layout":
        return cls(((),) * ndim)

    @classmethod
    def sharded(cls, ndim: int, dim: int, atoms: Sequence[str]) -> "Layout":
        dims = [()] * ndim
        dims[dim] = tuple(atoms)
        return cls(tuple(dims))

    # ---------------------------------------------------------------------------- queries
    @property
    def ndim(self) -> int:
        return len(self.dims)

    # `used`: the atoms that shard a dim, a frozenset (an attribute __post_init__ sets; not a field)

    @property
    def is_replicated(self) -> bool:
        return not self.partial and not any(self.dims)

    def count(self, dim: int, mesh: Mesh) -> int:
        return mesh.group_size(self.dims[dim])

    def local_shape(self, shape: Sequence[int], mesh: Mesh) -> tuple[int, ...]:
        shape = tuple(shape)
        try:
            return _local_shape(self, shape, mesh)
        except TypeError:  # a size no one can hash (symbolic): worked out each time
            return _local_shape.__wrapped__(self, shape, mesh)

    def divides(self, shape: Sequence[int], mesh: Mesh) -> bool:
        return len(shape) == self.ndim and all(s % mesh.group_size(d) == 0 for s, d in zip(shape, self.dims))

    def check(self, shape: Sequence[int], mesh: Mesh) -> None:
        if len(shape) != self.ndim:
            raise LayoutError(f"layout {self} has {self.ndim} dims but the tensor has shape {tuple(shape)}")
        for i, (s, d) in enumerate(zip(shape, self.dims)):
            n = mesh.group_size(d)
            if s % n:
                raise LayoutError(
                    f"dim {i} of size {s} cannot be split {n} ways over {mesh.format_atoms(d)} "
                    f"(layout {self.notation(mesh)}, shape {tuple(shape)}); pick a mesh whose axes divide it"
                )

    # ---------------------------------------------------------------------------- edits
    def with_dim(self, dim: int, atoms: Sequence[str]) -> "Layout":
        dims = list(self.dims)
        dims[dim] = tuple(atoms)
        return Layout(tuple(dims), self.partial)

    def without_partial(self) -> "Layout":
        return Layout(self.dims) if self.partial else self

    def with_partial(self, atoms: Sequence[str] | frozenset[str]) -> "Layout":
        return Layout(self.dims, frozenset(atoms))

    # ---------------------------------------------------------------------------- printing
    def notation(self, mesh: Mesh | None = None, names: Sequence[str] | None = None) -> str:
        """Paper notation: `BLE_xyz`, `B_x L E_yz`, `BLF_yz {Σx}`. Without names, dims are a, b, c, ..."""
        names = list(names) if names is not None else list(_DEFAULT_NAMES[: self.ndim])
        if len(names) != self.ndim:
            names = list(_DEFAULT_NAMES[: self.ndim])
        fmt = (lambda atoms: mesh.format_atoms(atoms)) if mesh is not None else (lambda atoms: "".join(atoms))
        out = ""
        for name, atoms in zip(names, self.dims):
            if out and out[-1] != " " and "_" in out.split(" ")[-1]:
                out += " "
            out += name + (f"_{fmt(atoms)}" if atoms else "")
        if self.partial:
            order = mesh.mesh_order(self.partial) if mesh is not None else sorted(self.partial)
            out += " {Σ" + fmt(order) + "}"
        return out or "scalar"

    def __str__(self) -> str:
        return self.notation()


class _Ref(weakref.ref):
    """The table's reference to a layout, knowing its key (to forget it when the layout goes)."""

    __slots__ = ("key",)


_INTERNED: dict[tuple, _Ref] = {}  # (dims, partial) → the layout
_LOCK = threading.RLock()  # (reentrant: a layout may go, and be forgotten, while its thread holds it)


def _forget(ref: _Ref) -> None:
    with _LOCK:
        if _INTERNED.get(ref.key) is ref:  # (not a newer layout made under the same key)
            del _INTERNED[ref.key]


@lru_cache(maxsize=1 << 16)
def _local_shape(layout: Layout, shape: tuple[int, ...], mesh: Mesh) -> tuple[int, ...]:
    """One rank's piece of a tensor of `shape` (remembered: the cost model asks it of every matmul, weight
    and cache of every candidate); a LayoutError where the layout does not split the shape."""
    if len(shape) != len(layout.dims):
        layout.check(shape, mesh)  # raises
    out = []
    for s, d in zip(shape, layout.dims):
        n = mesh.group_size(d) if d else 1
        if s % n:
            layout.check(shape, mesh)  # raises
        out.append(s // n)
    return tuple(out)
