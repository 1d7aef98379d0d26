"""The logical mesh: named axes x, y, z, each factored into prime-sized *atoms*.

A layout shards a tensor dim over a sequence of atoms, major to minor. Whole axes are the common case
(`E_yz` is E split over the atoms of y then of z); atoms let a layout use part of an axis, which is how
heads that do not divide an axis are sharded as far as they go and replicated over the rest:
with z = 4 = z0·z1, two KV heads are `K_{z0}` and each is replicated over z1.

Ranks are numbered row-major over (x, y, z), which is also row-major over the atoms in mesh order.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable, Sequence

from ..errors import MeshError

AXES = ("x", "y", "z")


def _prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


@dataclass(frozen=True)
class Atom:
    name: str  # "x" when the axis is a single atom, else "x0", "x1", ... (x0 is the major part)
    axis: str
    size: int


@dataclass(frozen=True)
class Mesh:
    """A 3D logical mesh `X×Y×Z` (an axis of size 1 is allowed).

    >>> Mesh.parse("2x2x1").size
    4
    >>> [a.name for a in Mesh.parse("1x1x4").atoms]
    ['z0', 'z1']
    """

    shape: tuple[int, int, int]
    _atoms: tuple[Atom, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or any(not isinstance(s, int) or s < 1 for s in self.shape):
            raise MeshError(f"mesh shape {self.shape!r}: expected three positive integers (X, Y, Z)")
        atoms: list[Atom] = []
        for axis, size in zip(AXES, self.shape):
            primes = _prime_factors(size)
            for i, p in enumerate(primes):
                atoms.append(Atom(axis if len(primes) == 1 else f"{axis}{i}", axis, p))
        object.__setattr__(self, "_atoms", tuple(atoms))
        # a mesh is a key of every cache the planner keeps (rules, redistribution): its hash (the value a
        # frozen dataclass's hash gives) made once
        object.__setattr__(self, "_hash", hash((self.shape,)))

    def __hash__(self) -> int:
        return self._hash

    # ----------------------------------------------------------------------------------- parsing
    @classmethod
    def parse(cls, text: "str | Mesh | Sequence[int]") -> "Mesh":
        """`"2x2x2"`, `"4x4"` (trailing axes are 1) or `"8"` (all on x)."""
        if isinstance(text, Mesh):
            return text
        if not isinstance(text, str):
            if not isinstance(text, (tuple, list)) or not 1 <= len(text) <= 3 or not all(
                    isinstance(d, int) and not isinstance(d, bool) for d in text):
                raise MeshError(
                    f"mesh={text!r}: expected a string 'XxYxZ' (e.g. '1x1x4'), a Mesh, or up to three axis "
                    f"sizes such as (1, 1, 4); to let shardwise pick the mesh for N chips, pass chips=N instead"
                )
            text = "x".join(str(d) for d in text)
        spec = text.strip().lower()
        if not re.fullmatch(r"\d+(x\d+){0,2}", spec):
            raise MeshError(
                f"mesh {text!r} is not of the form XxYxZ: expected one to three positive integers "
                f"joined by 'x', e.g. '2x2x1', '1x1x4' or '4x4x4'"
            )
        dims = [int(p) for p in spec.split("x")]
        if any(d < 1 for d in dims):
            raise MeshError(f"mesh {text!r} has an axis of size 0: every axis needs at least one chip")
        return cls(tuple(dims + [1] * (3 - len(dims))))  # type: ignore[arg-type]

    def __str__(self) -> str:
        return "x".join(str(s) for s in self.shape)

    # ----------------------------------------------------------------------------------- atoms
    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def atoms(self) -> tuple[Atom, ...]:
        return self._atoms

    @cached_property
    def _by_name(self) -> dict[str, tuple[int, Atom]]:
        return {a.name: (i, a) for i, a in enumerate(self._atoms)}

    def atom(self, name: str) -> Atom:
        try:
            return self._by_name[name][1]
        except KeyError:
            known = ", ".join(a.name for a in self._atoms) or "(none: the mesh has one chip)"
            raise MeshError(f"mesh {self} has no atom {name!r}; its atoms are {known}") from None

    def axis_atoms(self, axis: str) -> tuple[str, ...]:
        return tuple(a.name for a in self._atoms if a.axis == axis)

    def atoms_of(self, axes: Iterable[str]) -> tuple[str, ...]:
        """The atoms of some whole axes, in mesh order: `atoms_of("yz")`."""
        key = axes if isinstance(axes, str) else tuple(axes)
        got = self._of_axes.get(key)
        if got is None:
            wanted = set(key)
            bad = wanted - set(AXES)
            if bad:
                raise MeshError(f"unknown mesh axes {sorted(bad)}: the axes are x, y, z")
            got = self._of_axes[key] = tuple(a.name for a in self._atoms if a.axis in wanted)
        return got

    @cached_property
    def _of_axes(self) -> dict:
        return {}

    @cached_property
    def _sizes(self) -> dict[tuple[str, ...], int]:
        return {}

    def group_size(self, atoms: Iterable[str]) -> int:
        key = tuple(atoms)
        size = self._sizes.get(key)
        if size is None:
            size = self._sizes[key] = math.prod(self.atom(a).size for a in key)
        return size

    def mesh_order(self, atoms: Iterable[str]) -> tuple[str, ...]:
        key = tuple(atoms)
        got = self._orders.get(key)
        if got is None:
            got = self._orders[key] = tuple(sorted(key, key=lambda a: self._by_name[a][0]))
        return got

    @cached_property
    def _orders(self) -> dict[tuple[str, ...], tuple[str, ...]]:
        return {}

    def axes_of(self, atoms: Iterable[str]) -> tuple[str, ...]:
        """The axes an atom set touches, in mesh order (its collectives use those axes' links)."""
        key = tuple(atoms)
        got = self._axes.get(key)
        if got is None:
            touched = {self.atom(a).axis for a in key}
            got = self._axes[key] = tuple(ax for ax in AXES if ax in touched)
        return got

    @cached_property
    def _axes(self) -> dict[tuple[str, ...], tuple[str, ...]]:
        return {}

    # ----------------------------------------------------------------------------------- ranks
    def coords(self, rank: int) -> dict[str, int]:
        """Coordinate of `rank` along every atom."""
        if not 0 <= rank < self.size:
            raise MeshError(f"rank {rank} is outside mesh {self} of {self.size} ranks")
        out: dict[str, int] = {}
        for a in reversed(self._atoms):
            out[a.name] = rank % a.size
            rank //= a.size
        return out

    def rank_of(self, coords: dict[str, int]) -> int:
        rank = 0
        for a in self._atoms:
            rank = rank * a.size + coords[a.name]
        return rank

    def index_in(self, atoms: Sequence[str], rank: int) -> int:
        """Mixed-radix index of `rank` over `atoms` (major first): its chunk number."""
        c = self.coords(rank)
        idx = 0
        for a in atoms:
            idx = idx * self.atom(a).size + c[a]
        return idx

    def group(self, atoms: Sequence[str], rank: int) -> list[int]:
        """The ranks that differ from `rank` only along `atoms`, ordered by their index over `atoms`."""
        base = self.coords(rank)
        members = []
        for i in range(self.group_size(atoms)):
            c = dict(base)
            for a in reversed(atoms):
                size = self.atom(a).size
                c[a] = i % size
                i //= size
            members.append(self.rank_of(c))
        return members

    def groups(self, atoms: Sequence[str]) -> list[list[int]]:
        """All groups over `atoms` (each ordered by index over `atoms`), one per coordinate of the rest."""
        seen: set[int] = set()
        out = []
        for r in range(self.size):
            if r not in seen:
                g = self.group(atoms, r)
                seen.update(g)
                out.append(g)
        return out

    # ----------------------------------------------------------------------------------- printing
    def format_atoms(self, atoms: Sequence[str]) -> str:
        """`('x','y0','y1')` → `'xy'`; a part of an axis keeps its atom name: `('z0',)` → `'{z0}'`."""
        parts: list[str] = []
        whole = True
        i = 0
        atoms = list(atoms)
        while i < len(atoms):
            axis = self.atom(atoms[i]).axis
            run = self.axis_atoms(axis)
            if tuple(atoms[i : i + len(run)]) == run:
                parts.append(axis)
                i += len(run)
            else:
                parts.append(atoms[i])
                whole = False
                i += 1
        return "".join(parts) if whole else "{" + ",".join(parts) + "}"
