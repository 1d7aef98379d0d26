"""An on-disk cache of preset prototypes: the one-block step graph a preset is planned on, as capture,
canonicalize and find_layers leave it (`planner.prototype`).

Capturing the prototype is most of what planning a large preset costs that is not the search itself:
torch.export imports torch._dynamo (about 0.8 s on the machine this was written on) and traces the step
(0.2–0.3 s). A prototype is a pure function of what the key holds, so a second plan of the same preset
and shapes reads it back instead (a few milliseconds, and torch._dynamo is never imported):

    the preset's whole record (family, configuration, extra), the phase, batch, seq and context;
    torch's version and default dtype, Python's version, transformers' version (presets built by it);
    the contents of every source file of shardwise (tests, benchmarks and experiments aside): any edit
    to the code that builds, captures, canonicalizes or finds layers (or to anything else) is a new key.

What is stored: each node (op, name, target, arguments, meta) with its fake values as shape, stride,
dtype, device and requires_grad (made fake tensors again on load, all in one FakeTensorMode, as a
capture's are), and the graph's records (signature, state on the meta device, layers). What cannot be
stored faithfully is not cached, and such a prototype is captured every time: graphs with symbolic
values (a Hugging Face preset's step reads its cache position with .item(): an unbacked symbol of a
ShapeEnv this file does not keep), get_attr nodes, targets that are neither operator overloads nor
importable functions, meta values pickle cannot write.

SHARDWISE_PROTOTYPE_CACHE=0 turns the cache off; it lives in $SHARDWISE_CACHE/prototypes (default
~/.cache/shardwise/prototypes), one file per key, written atomically. The files are pickles: like any
pickle, read only a cache directory you own.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.utils._pytree import treespec_dumps, treespec_loads

from ..ir.meta import SIGNATURE

FORMAT = 1  # of the stored file; part of the key
_SKIP_DIRS = ("tests", "benchmarks", "experiments")
_ROOT = Path(__file__).resolve().parent.parent  # the shardwise package


class NotCacheable(Exception):
    """The graph holds something this cache cannot store faithfully."""


@dataclass(frozen=True)
class _Ref:  # an argument that is another node
    name: str


@dataclass(frozen=True)
class _Op:  # an operator overload, by its qualified name (torch.ops.<ns>.<op>.<overload>)
    ns: str
    op: str
    overload: str


@dataclass(frozen=True)
class _Spec:  # a pytree spec, as treespec_dumps writes it
    text: str


@dataclass(frozen=True)
class _Fake:  # a fake tensor, by what it holds
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool


def enabled() -> bool:
    return os.environ.get("SHARDWISE_PROTOTYPE_CACHE", "1").strip().lower() not in ("0", "off", "no", "false")


def cache_dir() -> Path:
    base = Path(os.environ.get("SHARDWISE_CACHE", Path.home() / ".cache" / "shardwise"))
    return base / "prototypes"


_SOURCE_HASH: str | None = None


def _sources() -> list[Path]:
    """The package's own .py files: its subpackages (directories with an __init__.py), walked from the root,
    tests, benchmarks and experiments aside. Not a glob of the root: a checkout keeps its virtual
    environment (.venv, thousands of files) inside the package directory."""
    out, stack = [], [_ROOT]
    while stack:
        d = stack.pop()
        for p in d.iterdir():
            if p.name.startswith(".") or (d == _ROOT and p.name in _SKIP_DIRS):
                continue
            if p.is_dir() and (p / "__init__.py").is_file():
                stack.append(p)
            elif p.suffix == ".py" and p.is_file():
                out.append(p)
    return sorted(out)


def source_hash() -> str:
    """sha256 of every source file of the package (path and contents), tests, benchmarks and experiments aside."""
    global _SOURCE_HASH
    if _SOURCE_HASH is None:
        h = hashlib.sha256()
        for p in _sources():
            rel = p.relative_to(_ROOT)
            h.update(str(rel).encode() + b"\0")
            h.update(p.read_bytes() + b"\0")
        _SOURCE_HASH = h.hexdigest()
    return _SOURCE_HASH


def key(preset, **shapes) -> str:
    """The key of a preset's prototype for these shapes (see the module's docstring for what it holds)."""
    parts = [f"format={FORMAT}", f"preset={preset!r}", *(f"{k}={v!r}" for k, v in sorted(shapes.items())),
             f"torch={torch.__version__}", f"default_dtype={torch.get_default_dtype()}",
             f"python={sys.version}", f"shardwise={source_hash()}"]
    if preset.family != "ref":  # built by transformers
        from importlib.metadata import PackageNotFoundError, version

        try:
            parts.append(f"transformers={version('transformers')}")
        except PackageNotFoundError:
            parts.append("transformers=none")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def cached(preset, capture: Callable[[], fx.GraphModule], **shapes) -> fx.GraphModule:
    """The prototype `capture()` makes, read from the cache when it holds it (else captured and stored)."""
    if not enabled():
        return capture()
    path = cache_dir() / f"{key(preset, **shapes)}.pkl"
    try:
        data = path.read_bytes()
    except OSError:
        data = None
    if data is not None:
        try:
            return load(data)
        except Exception:  # unreadable (truncated, written by other code): captured again, overwritten
            pass
    gm = capture()
    try:
        data = dump(gm)
    except NotCacheable:
        return gm
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
    except OSError:  # a read-only or full disk: planning goes on uncached
        pass
    return gm


# ---------------------------------------------------------------------------------------- writing
def _encode(x: Any) -> Any:
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(x, fx.Node):
        return _Ref(x.name)
    if isinstance(x, FakeTensor):
        if any(not isinstance(s, int) for s in (*x.shape, *x.stride())):
            raise NotCacheable("a symbolic shape")
        if x.device.type != "meta":  # stored as meta tensors: a value on another device would change device
            raise NotCacheable(f"a value on {x.device}")
        return _Fake(tuple(x.shape), tuple(x.stride()), x.dtype, x.requires_grad)
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        raise NotCacheable("a symbolic value")
    if isinstance(x, torch.Tensor):
        raise NotCacheable("a real tensor in the graph")
    if type(x) is tuple:
        return tuple(_encode(v) for v in x)
    if type(x) in (list, fx.immutable_collections.immutable_list):  # fx keeps a node's arguments immutable
        return [_encode(v) for v in x]
    if type(x) in (dict, fx.immutable_collections.immutable_dict):
        return {k: _encode(v) for k, v in x.items()}
    if isinstance(x, (slice,)):
        return slice(_encode(x.start), _encode(x.stop), _encode(x.step))
    return x


def _target(t: Any) -> Any:
    if isinstance(t, torch._ops.OpOverload):
        ns, rest = t.name().split("::")
        op, _, overload = rest.partition(".")
        return _Op(ns, op, overload or "default")
    if isinstance(t, str):
        return t
    if callable(t) and getattr(t, "__module__", None) and getattr(t, "__qualname__", None):
        return t  # a function pickle stores by reference (operator.getitem)
    raise NotCacheable(f"target {t!r}")


def dump(gm: fx.GraphModule) -> bytes:
    """The prototype as bytes; NotCacheable where it holds what this file cannot store faithfully."""
    nodes = []
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            raise NotCacheable("a get_attr node")
        if "unbacked_bindings" in n.meta:
            raise NotCacheable("an unbacked symbol")
        nodes.append((n.op, n.name, _target(n.target), _encode(n.args), _encode(n.kwargs), n.type,
                      {k: _encode(v) for k, v in n.meta.items()}))
    meta = dict(gm.meta)
    if SIGNATURE in meta:  # its pytree specs as treespec_dumps writes them (pickling a TreeSpec is deprecated)
        sig = meta[SIGNATURE]
        try:
            meta[SIGNATURE] = replace(sig, in_spec=_Spec(treespec_dumps(sig.in_spec)),
                                      out_spec=_Spec(treespec_dumps(sig.out_spec)))
        except Exception as e:  # a pytree node treespec_dumps does not know
            raise NotCacheable(str(e)) from e
    try:
        return pickle.dumps({"nodes": nodes, "meta": meta}, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:  # a meta value pickle cannot write
        raise NotCacheable(str(e)) from e


# ---------------------------------------------------------------------------------------- reading
def load(data: bytes) -> fx.GraphModule:
    stored = pickle.loads(data)

    def fake(f: _Fake) -> torch.Tensor:  # a meta tensor: FakeTensorMode() would import torch._dynamo
        return torch.empty_strided(f.shape, f.stride, dtype=f.dtype, device="meta").requires_grad_(f.requires_grad)

    def decode(x: Any, env: dict[str, fx.Node]) -> Any:
        if isinstance(x, _Ref):
            return env[x.name]
        if isinstance(x, _Fake):
            return fake(x)
        if type(x) in (list, tuple):
            return type(x)(decode(v, env) for v in x)
        if type(x) is dict:
            return {k: decode(v, env) for k, v in x.items()}
        if isinstance(x, slice):
            return slice(decode(x.start, env), decode(x.stop, env), decode(x.step, env))
        return x

    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for op, name, target, args, kwargs, type_expr, meta in stored["nodes"]:
        if isinstance(target, _Op):
            target = getattr(getattr(getattr(torch.ops, target.ns), target.op), target.overload)
        if op == "output":
            node = graph.output(decode(args, env)[0], type_expr=type_expr)
        else:
            node = graph.create_node(op, target, decode(args, env), decode(kwargs, env), name=name,
                                     type_expr=type_expr)
        if node.name != name:
            raise ValueError(f"node {name} came back as {node.name}")
        node.meta = decode(meta, env)
        env[name] = node
    gm = fx.GraphModule(torch.nn.Module(), graph)
    meta = stored["meta"]
    if SIGNATURE in meta:
        sig = meta[SIGNATURE]
        meta[SIGNATURE] = replace(sig, in_spec=treespec_loads(sig.in_spec.text),
                                  out_spec=treespec_loads(sig.out_spec.text))
    gm.meta.update(meta)
    return gm
