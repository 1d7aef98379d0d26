"""Hugging Face checkpoint directories (what `save_pretrained` writes), read without loading the weights.

    ckpt = Checkpoint.open("path/to/dir")      # config.json + model.safetensors (or shards + index)
    model = ckpt.build_meta()                  # parameters on the meta device, buffers real, ckpt dtype
    ckpt.tokenizer()                           # its tokenizer, or None when the directory has none

A directory is a checkpoint when it holds `config.json` and either `model.safetensors` or
`model.safetensors.index.json` (whose `weight_map` names the file of every tensor). Only headers are
read here: the tensors' names, shapes and dtypes, never their data (runtime/weights.CheckpointSource
reads a rank's slices).

The model is built with `AutoModelForCausalLM.from_config` under `meta_parameters()`: every parameter
is moved to the meta device as it is registered, so no weight is ever allocated, while buffers stay
real. Non-persistent buffers (Llama's `rotary_emb.inv_freq`) are not in the files `save_pretrained`
writes: the module computes them in its `__init__`, on the CPU, and they are read from the built model.
The model's dtype is the checkpoint's (`dtype` / `torch_dtype` in config.json, else the first floating
tensor in the files), so a bf16 checkpoint is planned and run in bf16.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ShardwiseError

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")

# safetensors' names for dtypes in a file's header, and their sizes in bytes
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "C64": torch.complex64,
}


def _as_path(path) -> Path | None:
    return Path(path) if isinstance(path, (str, os.PathLike)) else None


def is_checkpoint(path) -> bool:
    """Whether `path` is a directory with config.json and safetensors weights (one file, or an index).

    A preset's name is never taken for a directory of that name (write ./NAME for the directory)."""
    from .presets import PRESETS

    p = _as_path(path)
    if p is None or (isinstance(path, str) and path in PRESETS):
        return False
    return p.is_dir() and (p / CONFIG).is_file() and ((p / SINGLE).is_file() or (p / INDEX).is_file())


def missing(path) -> str | None:
    """What keeps `path` from being a checkpoint directory, in words (None: nothing, it is one)."""
    p = _as_path(path)
    if p is None:
        return f"{path!r} is not a path"
    if not p.exists():
        return f"there is no file or directory {str(p)!r}"
    if not p.is_dir():
        return f"{str(p)!r} is a file, not a directory"
    lacks = []
    if not (p / CONFIG).is_file():
        lacks.append(f"no {CONFIG}")
    if not ((p / SINGLE).is_file() or (p / INDEX).is_file()):
        others = sorted(f.name for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".pt", ".pth"))
        lacks.append(f"no safetensors weights ({SINGLE}, or shards with {INDEX})"
                     + (f"; it holds {', '.join(others[:4])}" if others else ""))
    return f"the directory {str(p)!r} has {' and '.join(lacks)}" if lacks else None


@contextmanager
def meta_parameters():
    """Within the block, every parameter a module registers is moved to the meta device (buffers are not).

    Modules still allocate their weight on the CPU before registering it (`nn.Linear` calls
    torch.empty), one at a time, and free it at once; the initializers then run on meta tensors, which
    costs nothing.
    """
    original = nn.Module.register_parameter

    def register_parameter(self, name, param):
        if param is not None and param.device.type != "meta":
            param = type(param)(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = original


@dataclass
class Checkpoint:
    """A checkpoint directory's configuration and the headers of its weight files."""

    path: Path
    config: object  # a transformers PretrainedConfig
    files: dict[str, Path]  # tensor name → the safetensors file that holds it
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype | str]] = field(repr=False)  # name → (shape, dtype)

    @classmethod
    def open(cls, path) -> Checkpoint:
        why = missing(path)
        if why is not None:
            raise ShardwiseError(f"not a Hugging Face checkpoint directory: {why}. Expected a directory written by "
                                 f"save_pretrained: {CONFIG} and {SINGLE} (or model-0000X-of-0000N.safetensors with "
                                 f"{INDEX})")
        path = Path(path)
        files = weight_files(path)
        return cls(path=path, config=load_config(path), files=files, shapes=read_headers(files))

    @property
    def name(self) -> str:
        return self.path.name or str(self.path)

    @property
    def nbytes(self) -> int:
        """The bytes of all the tensors stored (headers excluded): what reading every weight would read."""
        return sum(_numel(shape) * _itemsize(dtype) for shape, dtype in self.shapes.values())

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model is built in: the configuration's, else that of the first floating tensor stored."""
        for attr in ("dtype", "torch_dtype"):
            d = getattr(self.config, attr, None)
            if isinstance(d, str) and d != "auto":
                d = getattr(torch, d, None)
            if isinstance(d, torch.dtype):
                return d
        for _, dtype in self.shapes.values():
            if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
                return dtype
        return torch.float32

    def build_meta(self) -> nn.Module:
        """The model, parameters on the meta device and buffers real (computed on the CPU), in eval mode; a
        buffer the checkpoint's files hold (DeepSeek's router score bias) is a weight like the parameters:
        on the meta device, read from the files."""
        from transformers import AutoModelForCausalLM

        try:
            with meta_parameters():
                model = AutoModelForCausalLM.from_config(self.config, **_dtype_kwarg(self.dtype))
        except ValueError as e:  # an architecture with no causal-LM class
            raise ShardwiseError(f"{self.path}: transformers has no causal language model for this configuration "
                                 f"({type(self.config).__name__}): {str(e).splitlines()[0][:200]}") from None
        for name, buf in list(model.named_buffers()):
            if name in self.shapes:
                owner, _, attr = name.rpartition(".")
                module = model.get_submodule(owner)
                module.register_buffer(attr, buf.to("meta"), persistent=attr not in module._non_persistent_buffers_set)
        return model.eval()

    def load(self) -> nn.Module:
        """The model with all its weights, as transformers loads it (the unsharded reference)."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(self.path), **_dtype_kwarg(self.dtype)).eval()

    def has_tokenizer(self) -> bool:
        return any((self.path / f).is_file() for f in TOKENIZER_FILES)

    def tokenizer(self):
        """The directory's tokenizer (transformers AutoTokenizer), or None when it holds none."""
        if not self.has_tokenizer():
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.path))


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """transformers ≥ 4.56 takes `dtype=`; earlier versions `torch_dtype=`."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def load_config(path: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path))
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as e:
        raise ShardwiseError(f"{path / CONFIG} is not a configuration transformers can read "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); expected the config.json "
                             f"save_pretrained writes (with its model_type)") from None


def weight_files(path: Path) -> dict[str, Path]:
    """Tensor name → the file holding it: the single file's names, or the index's weight_map."""
    if (path / INDEX).is_file():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ShardwiseError(f"{path / INDEX} is not a safetensors index ({type(e).__name__}: {e}); expected "
                                 f'JSON with a "weight_map" of tensor name → file, as save_pretrained writes') from None
        files = {k: path / f for k, f in weight_map.items()}
        absent = sorted({str(f.name) for f in files.values() if not f.is_file()})
        if absent:
            raise ShardwiseError(f"{path / INDEX} names weight files that are not in {path}: {', '.join(absent[:4])}"
                                 f"{' ...' if len(absent) > 4 else ''}; download or copy every shard")
        return files
    return {k: path / SINGLE for k in _open(path / SINGLE).keys()}  # noqa: SIM118 (a safe_open handle)


def read_headers(files: dict[str, Path]) -> dict[str, tuple[tuple[int, ...], torch.dtype | str]]:
    """Name → (shape, dtype) of every stored tensor, from the files' headers (no data is read)."""
    out = {}
    handles = {f: _open(f) for f in set(files.values())}
    for f, h in handles.items():
        names = set(h.keys())
        for k in [k for k, g in files.items() if g == f]:
            if k not in names:
                raise ShardwiseError(f"the index names {f.name} as the file of {k!r}, but {f} does not hold it: "
                                     f"the index and the shards do not match; download or save the checkpoint again")
            sl = h.get_slice(k)
            code = sl.get_dtype()
            out[k] = (tuple(sl.get_shape()), SAFETENSORS_DTYPES.get(code, code))
    return out


def _open(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise ShardwiseError(f"{path} is not a readable safetensors file ({e}); it may be truncated (an interrupted "
                             f"download or copy): download or save the checkpoint again") from None


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype) -> int:
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    return 1


def aliases(model: nn.Module) -> dict[str, list[str]]:
    """Parameter name → the other names of the same tensor (tied weights: `lm_head.weight` and
    `model.embed_tokens.weight` when the embeddings are tied), from the built model itself and from its
    declared ties (`get_expanded_tied_weights_keys` / `_tied_weights_keys`)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    out: dict[str, list[str]] = {}
    for names in groups.values():
        for n in names:
            out.setdefault(n, []).extend(m for m in names if m != n)
    declared = {}
    if hasattr(model, "get_expanded_tied_weights_keys"):
        try:
            declared = dict(model.get_expanded_tied_weights_keys(all_submodels=True) or {})
        except (TypeError, AttributeError, ValueError):
            declared = {}
    elif isinstance(getattr(model, "_tied_weights_keys", None), dict):
        declared = dict(model._tied_weights_keys)
    if getattr(getattr(model, "config", None), "tie_word_embeddings", True) is False:
        declared = {}
    for a, b in declared.items():
        if isinstance(a, str) and isinstance(b, str):
            out.setdefault(a, []).append(b)
            out.setdefault(b, []).append(a)
    return {k: list(dict.fromkeys(v)) for k, v in out.items() if v}
