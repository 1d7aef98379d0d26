"""Where a rank's weight shards come from: the full tensors in memory, a safetensors file, or a Hugging
Face checkpoint directory (one file or shards with an index), read slice by slice (so a rank never
materializes a weight it does not hold; file sources count the bytes they read, `bytes_read`).

A state key may be derived from another by a slice (canonicalize unfuses GPT-2's [E, 3E] c_attn into
three [E, E] pieces: `...c_attn.weight[1:64+64]` is columns 64..127); sources resolve those too.

Every weight is checked before it is read (`WeightSource.check`, called by emit with the shape and
dtype the captured graph expects): a missing key, another dtype, or another shape raises a
ShardwiseError. Reading a slice of a tensor of the wrong size would otherwise succeed quietly (a wider
tensor or extra leading rows are simply cut) and give wrong numbers.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from ..errors import ShardwiseError
from ..ir.layout import Layout
from ..ir.mesh import Mesh
from ..models.checkpoint import SAFETENSORS_DTYPES as _SAFETENSORS_DTYPES
from ..models.checkpoint import Checkpoint, aliases

_DERIVED = re.compile(r"^(?P<base>.*)\[(?P<dim>\d+):(?P<start>\d+)\+(?P<length>\d+)\]$")

Shape = tuple[int, ...]
Header = Callable[[str], "tuple[Shape, torch.dtype | str] | None"]  # key → (shape, dtype); None if absent


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


def resolve(key: str, index: tuple[slice, ...]) -> tuple[str, tuple[slice, ...]]:
    """Map a slice of a (possibly derived) key onto its base key: (base key, slices of the base)."""
    m = _DERIVED.match(key)
    if not m:
        return key, index
    dim, start = int(m["dim"]), int(m["start"])
    index = list(index)
    s = index[dim]
    index[dim] = slice(start + s.start, start + s.stop)
    return resolve(m["base"], tuple(index))


def _derivation(key: str) -> tuple[str, list[tuple[int, int, int]]]:
    """The base key of `key` and the slices (dim, start, length) that make `key` from it, in the order
    they apply (`w[1:0+128][1:64+64]`: columns 0..127 of w, then columns 64..127 of those)."""
    steps = []
    while m := _DERIVED.match(key):
        steps.append((int(m["dim"]), int(m["start"]), int(m["length"])))
        key = m["base"]
    return key, steps[::-1]


def check_weight(key: str, shape: Shape, dtype: torch.dtype, header: Header, names: Iterable[str], *,
                 origin: str, fix: str) -> None:
    """Raise a ShardwiseError unless `key` (a stored tensor, or a slice of one) has `shape` and `dtype`.

    `header(name)` gives a stored tensor's (shape, dtype), or None; `names` are the stored keys; `origin`
    names where they are (a file, a state dict) and `fix` says how to get the right ones.
    """
    shape = tuple(shape)
    expected = f"a {_shape(shape)} {_dtype(dtype)} tensor"
    base, steps = (key, []) if header(key) is not None else _derivation(key)
    found = header(base)
    what = f"weight {key!r}" if not steps else f"weight {base!r} (sliced into {key!r} by canonicalize)"
    if found is None:
        raise ShardwiseError(f"{what} is missing from {origin}{_closest(base, names)}; the graph expects {expected} "
                             f"there. {fix}")
    have_shape, have_dtype = tuple(found[0]), found[1]
    if have_dtype != dtype:
        raise ShardwiseError(
            f"{what} in {origin} is {_dtype(have_dtype)}, but the graph expects {_dtype(dtype)} (a "
            f"{_shape(have_shape)} tensor was found). Convert the checkpoint to {_dtype(dtype)} (e.g. "
            f"{{k: t.to({dtype}) for k, t in state.items()}}, then save_state), or capture and plan the model in "
            f"{_dtype(have_dtype)} so the graph expects what the file holds."
        )
    sliced = list(have_shape)
    for dim, start, length in steps:
        if dim >= len(sliced) or start + length > sliced[dim]:
            raise ShardwiseError(
                f"{key!r} is elements {start}..{start + length - 1} along dim {dim} of {base!r}, but {base!r} in "
                f"{origin} has shape {_shape(have_shape)}, which does not reach that far: the graph expects "
                f"{expected} for this slice, cut from the fused tensor of the captured model. {fix}"
            )
        sliced[dim] = length
    if tuple(sliced) != shape:
        found_as = f"{_shape(have_shape)}" + (f", whose slice {key!r} is {_shape(tuple(sliced))}" if steps else "")
        raise ShardwiseError(f"{what} in {origin} has shape {found_as}, but the graph expects "
                             f"{expected}{_shape_hint(tuple(sliced), shape)}. {fix}")


def _shape(shape: Shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _dtype(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else f"safetensors dtype {dtype}"


def _closest(key: str, names: Iterable[str]) -> str:
    near = difflib.get_close_matches(key, list(names), n=3)
    return f" (closest names there: {', '.join(near)})" if near else ""


def _shape_hint(found: Shape, expected: Shape) -> str:
    """What the difference looks like: a transposed tensor, extra or missing rows, another width."""
    if len(found) != len(expected):
        return f" ({len(found)} dims instead of {len(expected)})"
    if len(found) == 2 and found == expected[::-1]:
        return " (it looks transposed: nn.Linear stores [out, in], GPT-2's Conv1D [in, out]; transpose it when converting)"
    differ = [d for d in range(len(found)) if found[d] != expected[d]]
    if len(differ) == 1:
        d = differ[0]
        more = found[d] - expected[d]
        if d == 0 and more > 0:
            return f" ({more} extra leading rows: a padded vocabulary, or another model's table?)"
        return f" ({abs(more)} {'more' if more > 0 else 'fewer'} elements along dim {d}: another model size?)"
    return ""


class StateSource:
    """Full tensors already in memory (e.g. the model's own parameters).

    The default source of emit is the state captured with the model, which matches the graph by
    construction; a state dict passed by the user (another checkpoint, a model changed since capture)
    need not, so every key is checked like a file's.
    """

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state

    def check(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        check_weight(key, shape, dtype, self._header, self.state, origin="the state dict",
                     fix="Pass the state of the model the plan was made from (same configuration and dtype).")

    def _header(self, key: str) -> tuple[Shape, torch.dtype] | None:
        t = self.state.get(key)
        return None if t is None else (tuple(t.shape), t.dtype)

    def read(self, key: str, index: tuple[slice, ...]) -> torch.Tensor:
        if key in self.state:
            return self.state[key][index]
        base, idx = resolve(key, index)
        return self.state[base][idx]


class SafetensorsSource:
    """Tensors in a safetensors file, read one slice at a time.

    Opening checks the file's header (a missing, truncated or foreign file raises a ShardwiseError);
    `check` compares a key's shape and dtype in the header with the graph's before any data is read.
    """

    def __init__(self, path: str):
        from safetensors import SafetensorError, safe_open

        self.path = str(path)
        make = "Write one with shardwise.runtime.weights.save_state or safetensors.torch.save_file."
        if not os.path.isfile(self.path):
            raise ShardwiseError(f"no weights file at {self.path}: expected a safetensors checkpoint there. {make}")
        try:
            self._file = safe_open(self.path, framework="pt")
        except (SafetensorError, OSError) as e:
            raise ShardwiseError(
                f"{self.path} is not a readable safetensors file ({e}): expected a complete safetensors checkpoint. "
                f"It may be truncated (an interrupted download or copy) or another format (torch.save's .pt/.bin); "
                f"download or save it again. {make}"
            ) from None
        self._keys = set(self._file.keys())
        self.bytes_read = 0  # bytes of tensor data read so far

    def _header(self, key: str) -> tuple[Shape, torch.dtype | str] | None:
        if key not in self._keys:
            return None
        sl = self._file.get_slice(key)
        code = sl.get_dtype()
        return tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(code, code)

    def check(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        check_weight(key, shape, dtype, self._header, self._keys, origin=f"the safetensors file {self.path}",
                     fix="Use the checkpoint of the model the plan was made from (same configuration and dtype), "
                         "e.g. one written by shardwise.runtime.weights.save_state.")

    def read(self, key: str, index: tuple[slice, ...]) -> torch.Tensor:
        base, idx = resolve(key, index)
        if base not in self._keys:
            raise ShardwiseError(f"weight {base!r} (read for {key!r}) is missing from the safetensors file "
                                 f"{self.path}, which holds {len(self._keys)} other tensors: use the checkpoint of "
                                 f"the model the plan was made from (check(key, shape, dtype) says what is expected)")
        sl = self._file.get_slice(base)
        out = sl[idx] if idx else sl[:]
        self.bytes_read += out.numel() * out.element_size()
        return out


def save_state(state: dict[str, torch.Tensor], path: str) -> None:
    """Save the base (non-derived) tensors of a captured state for SafetensorsSource."""
    from safetensors.torch import save_file

    base = {k: v.detach().contiguous().clone() for k, v in state.items() if not _DERIVED.match(k)}
    save_file(base, path)


class CheckpointSource:
    """The tensors of a Hugging Face checkpoint directory (`save_pretrained`), read one slice at a time.

    One `model.safetensors`, or shards named by `model.safetensors.index.json`; only the slices asked
    for are read (`safe_open(...).get_slice(name)[index]`), and `bytes_read` counts them, so a rank
    can show what it read beside the checkpoint's size (`nbytes`).

    A state key of the captured graph is the model's own state-dict name (`model.layers.0.mlp.up_proj.
    weight`, `lm_head.weight`), found in the files under that name; else, for tied weights, under the
    name of the tensor it is tied to (save_pretrained writes one of `lm_head.weight` and
    `model.embed_tokens.weight`); else under the name with or without the model's base prefix (a base
    model's checkpoint); else, for a buffer the files do not hold (Llama's non-persistent
    `rotary_emb.inv_freq`), the buffer the model computed when it was built (`model`, built with
    models.checkpoint.Checkpoint.build_meta; built here when not given). Derived keys (canonicalize's
    slices, `key[dim:start+length]`) are read as slices of their base.
    """

    def __init__(self, path, model=None):
        self.checkpoint = path if isinstance(path, Checkpoint) else Checkpoint.open(path)
        self.path = self.checkpoint.path
        self._model = model
        self._aliases: dict[str, list[str]] | None = None
        self._handles: dict = {}
        self._found: dict[str, tuple[str, object] | None] = {}
        self.bytes_read = 0  # bytes of tensor data read from the files so far (every read)
        self._regions: set[tuple] = set()  # (stored name, slices) read so far
        self.bytes_distinct = 0  # the same, each region counted once (a slice read again is not counted again)

    def fresh(self) -> CheckpointSource:
        """A source over the same checkpoint and model with its own counts (one per rank emitted here)."""
        return CheckpointSource(self.checkpoint, model=self._model)

    @property
    def nbytes(self) -> int:
        """The bytes of every tensor in the checkpoint: what a rank reading all of it would read."""
        return self.checkpoint.nbytes

    @property
    def model(self):
        if self._model is None:
            self._model = self.checkpoint.build_meta()
        return self._model

    def _locate(self, key: str) -> tuple[str, object] | None:
        """("file", stored name), ("stacked", its `Stacked` pieces) or ("buffer", the model's tensor) for a
        base key; None if none holds it."""
        if key in self._found:
            return self._found[key]
        stored = self.checkpoint.shapes
        found = ("file", key) if key in stored else None
        if found is None and not _DERIVED.match(key):  # a derived key is found through its base (resolve)
            model = self.model
            if self._aliases is None:
                self._aliases = aliases(model)
            names = list(self._aliases.get(key, []))
            prefix = getattr(model, "base_model_prefix", "") or ""
            if prefix:
                names += [key.removeprefix(prefix + ".")] if key.startswith(prefix + ".") else [f"{prefix}.{key}"]
            names += [n for n in [stored_name(model, key)] if n != key]
            found = next((("file", n) for n in names if n in stored), None)
            if found is None and (pieces := stacked_pieces(model, key, stored)) is not None:
                found = ("stacked", pieces)
            if found is None:
                buffers = dict(model.named_buffers(remove_duplicate=False))
                b = buffers.get(key)
                if b is not None and b.device.type != "meta":
                    found = ("buffer", b)
        self._found[key] = found
        return found

    def _header(self, key: str) -> tuple[Shape, torch.dtype | str] | None:
        found = self._locate(key)
        if found is None:
            return None
        kind, what = found
        if kind == "file":
            return self.checkpoint.shapes[what]
        if kind == "stacked":
            return what.shape, what.dtype
        return tuple(what.shape), what.dtype

    def check(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        check_weight(key, shape, dtype, self._header, self.checkpoint.shapes,
                     origin=f"the checkpoint {self.path}",
                     fix="Plan the model from this checkpoint directory (shardwise.plan(path, ...)), or use the "
                         "checkpoint of the model the plan was made from (same configuration and dtype).")

    def read(self, key: str, index: tuple[slice, ...]) -> torch.Tensor:
        base, idx = resolve(key, index)
        found = self._locate(base)
        if found is None:
            raise ShardwiseError(f"weight {base!r} (read for {key!r}) is in neither the checkpoint {self.path} nor the "
                                 f"model's buffers: use the checkpoint of the model the plan was made from "
                                 f"(check(key, shape, dtype) says what is expected)")
        kind, what = found
        if kind == "buffer":
            return what[idx] if idx else what
        if kind == "stacked":
            return what.read(self._read_stored, idx)
        return self._read_stored(what, idx)

    def _read_stored(self, what: str, idx: tuple[slice, ...]) -> torch.Tensor:
        """Slices `idx` of the tensor stored under `what`, counted."""
        file = self.checkpoint.files[what]
        if file not in self._handles:
            from safetensors import safe_open

            self._handles[file] = safe_open(str(file), framework="pt")
        sl = self._handles[file].get_slice(what)
        out = sl[idx] if idx else sl[:]
        n = out.numel() * out.element_size()
        self.bytes_read += n
        region = (what, tuple((s.start, s.stop, s.step) for s in idx))
        if region not in self._regions:
            self._regions.add(region)
            self.bytes_distinct += n
        return out


# ------------------------------------------------------------------------------------ experts stored one by one
@dataclass(frozen=True)
class Stacked:
    """A model tensor a checkpoint stores in pieces, as published mixture-of-experts checkpoints store their
    experts: expert i of `[X, rows, cols]` is the concatenation over j, along rows, of the stored tensors
    `names[i][j]` (`rows[j]` rows each). transformers stacks them when it loads (its conversion mapping:
    MergeModulelist over the experts, then Concatenate of the sources, gate then up); a rank reads only
    its experts and, of each, only its rows and columns."""

    names: tuple[tuple[str, ...], ...]  # [expert][source]
    rows: tuple[int, ...]
    cols: int
    dtype: object

    @property
    def shape(self) -> Shape:
        return (len(self.names), sum(self.rows), self.cols)

    def read(self, stored: Callable[[str, tuple[slice, ...]], torch.Tensor], idx: tuple[slice, ...]) -> torch.Tensor:
        experts, rows, cols = (tuple(idx) + (slice(None),) * 3)[:3]
        out = []
        for i in range(*experts.indices(len(self.names))):
            parts, at = [], 0
            lo, hi, _ = rows.indices(sum(self.rows))
            for name, n in zip(self.names[i], self.rows):
                a, b = max(lo, at), min(hi, at + n)  # this source's rows that fall in the slice
                if a < b:
                    parts.append(stored(name, (slice(a - at, b - at), cols)))
                at += n
            out.append(torch.cat(parts) if len(parts) > 1 else parts[0])
        return torch.stack(out)


def _mapping(model) -> tuple:
    """transformers' conversion mapping of the model's type (how its checkpoints name and store weights
    that the model names or stacks otherwise); () when it has none."""
    return _mapping_of(getattr(getattr(model, "config", None), "model_type", ""))


@functools.cache
def _mapping_of(model_type: str) -> tuple:
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return ()
    return tuple(get_checkpoint_conversion_mapping(model_type) or ())


def _renames(model) -> list[tuple[str, str]]:
    """(model's name part, checkpoint's name part) of the mapping's renamings (Mixtral: .mlp. ← .block_sparse_moe.)."""
    return [(t, src) for w in _mapping(model) if type(w).__name__ == "WeightRenaming"
            for src, t in zip(w.source_patterns, w.target_patterns)]


def stored_name(model, key: str) -> str:
    """`key` as the checkpoint names it: the mapping's renamings undone."""
    for target, source in _renames(model):
        key = key.replace(target, source)
    return key


def stacked_pieces(model, key: str, stored: dict) -> Stacked | None:
    """Where `key` is a stacked expert tensor of `model` (transformers 5's `[X, ·, ·]` experts) that the
    checkpoint holds one expert at a time, its pieces: found by the model type's conversion mapping in
    transformers (its WeightConverter with MergeModulelist(dim=0), then, for several sources,
    Concatenate(dim=1); its renamings undone). None for any other key or mapping."""
    mapping = _mapping(model)
    try:
        param = model.get_parameter(key)
    except AttributeError:
        return None
    if param.ndim != 3:
        return None
    for w in mapping:
        if type(w).__name__ != "WeightConverter" or len(w.target_patterns) != 1 or not key.endswith(w.target_patterns[0]):
            continue
        ops = [(type(op).__name__, getattr(op, "dim", None)) for op in w.operations]
        if ops not in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)]):
            return None
        prefix = key[: -len(w.target_patterns[0])]
        names = []
        for i in range(param.shape[0]):
            row = []
            for src in w.source_patterns:
                name = prefix + src.replace("*", str(i))
                if name not in stored:
                    name = stored_name(model, name)
                if name not in stored:
                    return None
                row.append(name)
            names.append(tuple(row))
        shapes = [stored[n][0] for n in names[0]]
        if any(len(sh) != 2 or sh[1] != shapes[0][1] for sh in shapes) or \
                any(stored[n][0] != sh for row in names for n, sh in zip(row, shapes)):
            return None
        return Stacked(tuple(names), tuple(sh[0] for sh in shapes), shapes[0][1], stored[names[0][0]][1])
    return None
