"""Where a rank's weight shards come from: the full tensors in memory, or a safetensors file read
slice by slice (so a rank never materializes a weight it does not hold).

A state key may be derived from another by a slice (canonicalize unfuses GPT-2's [E, 3E] c_attn into
three [E, E] pieces: `...c_attn.weight[1:64+64]` is columns 64..127); sources resolve those too.
"""

from __future__ import annotations

import re
from typing import Protocol

import torch

from ..ir.layout import Layout
from ..ir.mesh import Mesh

_DERIVED = re.compile(r"^(?P<base>.*)\[(?P<dim>\d+):(?P<start>\d+)\+(?P<length>\d+)\]$")


class WeightSource(Protocol):
    def check(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """Raise a ShardwiseError unless `key` holds a tensor of `shape` and `dtype` (what the graph expects)."""

    def read(self, key: str, index: tuple[slice, ...]) -> torch.Tensor: ...


def shard_index(shape, layout: Layout, mesh: Mesh, rank: int) -> tuple[slice, ...]:
    """The slices of a global tensor that rank `rank` holds under `layout` (partials: all of it)."""
    out = []
    for size, atoms in zip(shape, layout.dims):
        if atoms:
            n = size // mesh.group_size(atoms)
            i = mesh.index_in(atoms, rank)
            out.append(slice(i * n, (i + 1) * n))
        else:
            out.append(slice(0, size))
    return tuple(out)


def _resolve(key: str, index: tuple[slice, ...]) -> tuple[str, tuple[slice, ...]]:
    """Map a slice of a derived key onto its base key."""
    m = _DERIVED.match(key)
    if not m:
        return key, index
    dim, start = int(m["dim"]), int(m["start"])
    index = list(index)
    s = index[dim]
    index[dim] = slice(start + s.start, start + s.stop)
    return _resolve(m["base"], tuple(index))


class StateSource:
    """Full tensors already in memory (e.g. the model's own parameters)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state

    def check(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        pass  # the captured model's own tensors: the graph was made from them

    def read(self, key: str, index: tuple[slice, ...]) -> torch.Tensor:
        if key in self.state:
            return self.state[key][index]
        base, idx = _resolve(key, index)
        return self.state[base][idx]


class SafetensorsSource:
    """Tensors in a safetensors file, read one slice at a time."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self._file = safe_open(path, framework="pt")

    def check(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        pass  # not checked yet: the next commit checks key, shape and dtype against the file's header

    def read(self, key: str, index: tuple[slice, ...]) -> torch.Tensor:
        base, idx = _resolve(key, index)
        sl = self._file.get_slice(base)
        return sl[idx] if idx else sl[:]


def save_state(state: dict[str, torch.Tensor], path: str) -> None:
    """Save the base (non-derived) tensors of a captured state for SafetensorsSource."""
    from safetensors.torch import save_file

    base = {k: v.detach().contiguous().clone() for k, v in state.items() if not _DERIVED.match(k)}
    save_file(base, path)
