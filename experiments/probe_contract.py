"""Probe the user-facing contract the way a demanding user would, and classify every outcome.

    python -m shardwise.experiments.probe_contract                  # every probe, a few minutes
    python -m shardwise.experiments.probe_contract --only cli,json  # some categories
    python -m shardwise.experiments.probe_contract --json out.json  # also write every result

A fixed list of a few hundred probes: sharded numerics against the unsharded model (reference decoders
and tiny Hugging Face models × meshes × layouts), run-time calls that differ from the planned one, bad
plan JSON through `Plan.from_json`, bad arguments to `shardwise.plan`, layouts forced on a chip count,
decode plans of presets without a context, `verify` / `generate` with bad values, and the command line
through `shardwise.cli.main([...])`. Each outcome is one of

    works           equal to the unsharded model (max |diff| within atol), or a valid result; an input
                    the unsharded model rejects may also raise the unsharded model's own exception type
    clear error     a ShardwiseError with a message (the CLI: exit status 2 with a message)
    silently wrong  a number that differs, or a bad input accepted
    crash           any other exception: an internal traceback (its innermost shardwise frame is shown)
    hang            still running after --timeout seconds

Every probe runs in a forked child process (its own process group, address space capped at
--memory-gib above the parent's; --jobs at a time), so a hang or a runaway allocation is killed without
harming the run or the machine. The script uses only the public faces (shardwise.plan / simulate / verify / generate,
Plan.from_json, shardwise.cli.main), so it also runs against older revisions of the package.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import resource
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

import shardwise
from shardwise.errors import ShardwiseError
from shardwise.models import RefConfig, RefDecoder, build_model, example_inputs

OUTCOMES = ("works", "clear error", "silently wrong", "crash", "hang")
MESHES = ["1x1x2", "1x1x4", "2x2x1", "1x2x2", "2x1x2"]
LAYOUTS = [None, "ffn=ws2d,attn=batch", "ffn=wg_xyz", "ffn=ws1d,attn=heads,embed=vocab", "head=E"]
PACKAGE_DIR = os.path.dirname(os.path.abspath(shardwise.__file__))


class Wrong(Exception):
    """Raised by a probe that saw a wrong number or a bad input accepted: the outcome 'silently wrong'."""


class Refused(Exception):
    """Raised by a CLI probe when the command refused with a message: the outcome 'clear error'."""


@dataclass
class Probe:
    category: str
    name: str
    run: Callable[[], str | None]  # returns a note when it works; raises otherwise


@dataclass
class Result:
    category: str
    name: str
    outcome: str
    message: str = ""
    where: str = ""  # crashes: the innermost frame inside the shardwise package
    seconds: float = 0.0


# ============================================================================== models (built once)
REF_CONFIGS = {
    "ref-mha": RefConfig(vocab=64, d_model=32, d_ff=64, n_layers=2, n_heads=4, n_kv_heads=4),
    "ref-gqa-parallel": RefConfig(vocab=100, d_model=32, d_ff=96, n_layers=2, n_heads=4, n_kv_heads=2, parallel=True,
                                  activation="swiglu", norm="rmsnorm"),
    "ref-mqa-odd": RefConfig(vocab=101, d_model=24, d_ff=102, n_layers=1, n_heads=3, n_kv_heads=1, head_dim=8,
                             tie_embeddings=True),
}
HF_NAMES = ("llama-tiny", "gpt2-tiny")


@cache
def model(name: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A seeded model by name: a REF_CONFIGS entry or an HF tiny preset, in `dtype`, in eval mode."""
    if name in REF_CONFIGS:
        torch.manual_seed(0)
        return RefDecoder(REF_CONFIGS[name]).to(dtype).eval()
    return build_model(name).to(dtype).eval()


def vocab_of(m: torch.nn.Module) -> int:
    return m.cfg.vocab if isinstance(m, RefDecoder) else m.config.vocab_size


def inputs(m: torch.nn.Module, batch: int = 4, seq: int = 6) -> tuple[tuple, dict]:
    return example_inputs(m, batch, seq)


def atol_for(want: torch.Tensor) -> float:
    """float32: 1e-5 (sums reordered over ≤ 8 ranks); bfloat16: 8 ulps (2^-8) of the logits' magnitude
    (the justification is in tests/test_fuzz.py)."""
    if want.dtype == torch.bfloat16:
        return 8 * 2.0**-8 * max(1.0, float(want.float().abs().max()))
    return 1e-5


def logits_of(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


# ============================================================================== probe helpers
def differential(m: torch.nn.Module, args: tuple, kwargs: dict, mesh: str, layouts: str | None,
                 run_args: tuple | None = None, run_kwargs: dict | None = None) -> str:
    """Plan with (args, kwargs), simulate (run_args, run_kwargs) (default: the same call), compare with the
    unsharded model. Raises Wrong for a differing number or an input accepted that the model rejects."""
    run_args = args if run_args is None else run_args
    run_kwargs = kwargs if run_kwargs is None else run_kwargs
    plan = shardwise.plan(m, args, kwargs, mesh=mesh, layouts=layouts)
    want_error = None
    with torch.no_grad():
        try:
            want = m(*run_args, **run_kwargs)
        except Exception as e:  # noqa: BLE001 - whatever the unsharded model raises, the sharded must too
            want_error = e
    try:
        got = shardwise.simulate(plan, run_args, run_kwargs)
    except ShardwiseError:
        raise
    except Exception as e:
        if want_error is not None and isinstance(e, type(want_error)):
            return f"raises {type(e).__name__} as the unsharded model does"
        raise
    if want_error is not None:
        raise Wrong(f"accepted an input the unsharded model rejects ({type(want_error).__name__}: "
                    f"{str(want_error).splitlines()[0][:100]})")
    got, want = logits_of(got), logits_of(want)
    if got.shape != want.shape or got.dtype != want.dtype:
        raise Wrong(f"output {tuple(got.shape)} {got.dtype}, unsharded {tuple(want.shape)} {want.dtype}")
    diff = float((got.float() - want.float()).abs().max()) if want.numel() else 0.0
    if not diff <= atol_for(want):
        raise Wrong(f"max |sharded - unsharded| = {diff:.3g} > atol {atol_for(want):.3g} ({plan.chosen})")
    return f"max diff {diff:.1e} ({plan.chosen})"


def accepted(what: str, result: Any) -> None:
    """A bad input went through: the outcome is 'silently wrong'."""
    raise Wrong(f"accepted {what}: returned {_short(result)}")


def _short(x: Any) -> str:
    if isinstance(x, shardwise.Plan):
        return f"a Plan (mesh {x.mesh}, {x.chosen or 'no runs'})"
    if isinstance(x, torch.Tensor):
        return f"a tensor {tuple(x.shape)} {x.dtype}"
    return type(x).__name__


def cli(argv: list[str], *, bad: bool) -> str:
    """Run `shardwise.cli.main(argv)`. Exit 0 works (a bad input: silently wrong); exit 2 with a message is a
    clear error (argparse's or shardwise's); exit 1 (verify FAILED, tokens differ) is silently wrong."""
    from shardwise.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    code = 0 if code is None else code
    message = (err.getvalue().strip().splitlines() or out.getvalue().strip().splitlines() or [""])[-1]
    if code == 0:
        if bad:
            raise Wrong(f"exit 0 for a bad input; printed: {(out.getvalue().strip().splitlines() or [''])[0][:100]}")
        return (out.getvalue().strip().splitlines() or [""])[0][:100]
    if code == 2 and message:
        raise Refused(message)
    first = (out.getvalue().strip().splitlines() or [""])[0]
    raise Wrong(f"exit {code}: {first[:120] or message}")


# ============================================================================== the probes
def numerics_probes() -> list[Probe]:
    """The planned call, equal to the unsharded model: models × meshes × layouts (float32, and bf16)."""
    probes = []
    for name in (*REF_CONFIGS, *HF_NAMES):
        for mesh in MESHES:
            for layouts in LAYOUTS:
                probes.append(Probe("numerics", f"{name} mesh={mesh} layouts={layouts}",
                                    lambda n=name, me=mesh, la=layouts: differential(model(n), *inputs(model(n)), me, la)))
    for name in ("ref-gqa-parallel", "llama-tiny"):
        for mesh in ("1x1x4", "2x1x2"):
            for layouts in LAYOUTS:
                probes.append(Probe("numerics", f"{name} bf16 mesh={mesh} layouts={layouts}",
                                    lambda n=name, me=mesh, la=layouts: differential(
                                        model(n, torch.bfloat16), *inputs(model(n, torch.bfloat16)), me, la)))
    return probes


def _variant_ids(ids: torch.Tensor, vocab: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    B, L = ids.shape
    return {
        "another batch": torch.randint(0, vocab, (B + 2, L), generator=g),
        "smaller batch": ids[:1],
        "another sequence length": torch.randint(0, vocab, (B, L + 3), generator=g),
        "shorter sequence": ids[:, :2],
        "id = vocab": ids.clone().index_fill_(1, torch.tensor([0]), vocab),
        "id = vocab + 1000": torch.full_like(ids, vocab + 1000),
        "negative id": ids.clone().index_fill_(1, torch.tensor([0]), -1),
        "float ids": ids.float(),
        "1-D ids": ids[0],
        "int32 ids": ids.int(),
        "ids as a list": ids.tolist(),
    }


def runtime_probes() -> list[Probe]:
    """Calls after planning that differ from the planned one: equal to the unsharded model or refused."""
    probes = []
    for name, mesh, layouts in [("ref-mha", "2x2x1", "ffn=ws2d,attn=batch"), ("ref-gqa-parallel", "1x1x4", None),
                                ("ref-mqa-odd", "1x1x2", None),
                                ("llama-tiny", "1x1x4", None), ("gpt2-tiny", "2x2x1", "ffn=ws2d,attn=batch")]:
        m = model(name)
        args, kwargs = inputs(m)
        for variant, ids in _variant_ids(args[0], vocab_of(m)).items():
            probes.append(Probe("run-time input", f"{name} {mesh} {layouts}: {variant}",
                                lambda m=m, a=args, k=kwargs, me=mesh, la=layouts, i=ids:
                                differential(m, a, k, me, la, (i,), k)))
        probes.append(Probe("run-time input", f"{name} {mesh} {layouts}: the same call twice",
                            lambda m=m, a=args, k=kwargs, me=mesh, la=layouts: _twice(m, a, k, me, la)))
    for name in HF_NAMES:
        m = model(name)
        args, kwargs = inputs(m)
        B, L = args[0].shape
        pad = torch.ones(B, L, dtype=torch.long)
        pad[0, :3] = 0
        masked = dict(kwargs, attention_mask=pad)
        for mesh, layouts in (("1x1x2", None), ("2x2x1", "ffn=ws2d,attn=batch")):
            cases = {
                "padding mask only at run time": (kwargs, masked),
                "padding mask planned and run": (masked, masked),
                "planned with a mask, run without": (masked, kwargs),
                "all-ones mask only at run time": (kwargs, dict(kwargs, attention_mask=torch.ones(B, L, dtype=torch.long))),
                "use_cache=True at run time": (kwargs, dict(kwargs, use_cache=True)),
                "use_cache omitted at run time": (kwargs, {}),
                "position_ids shifted at run time": (kwargs, dict(kwargs, position_ids=torch.arange(L).expand(B, L) + 5)),
            }
            for what, (plan_kw, run_kw) in cases.items():
                probes.append(Probe("run-time input", f"{name} {mesh} {layouts}: {what}",
                                    lambda m=m, a=args, pk=plan_kw, rk=run_kw, me=mesh, la=layouts:
                                    differential(m, a, pk, me, la, a, rk)))
    return probes


def _twice(m, args, kwargs, mesh, layouts) -> str:
    """simulate twice on one plan: the same numbers both times (no state carried between calls)."""
    plan = shardwise.plan(m, args, kwargs, mesh=mesh, layouts=layouts)
    a = logits_of(shardwise.simulate(plan, args, kwargs))
    b = logits_of(shardwise.simulate(plan, args, kwargs))
    if not torch.equal(a, b):
        raise Wrong(f"two calls differ by {float((a - b).abs().max()):.3g}")
    return "identical"


@cache
def _plan_json() -> dict:
    m = model("ref-mha")
    return json.loads(shardwise.plan(m, *inputs(m), mesh="1x1x2", layouts="ffn=ws2d").to_json())


def _tampered(edit: Callable[[dict], Any]) -> str:
    d = json.loads(json.dumps(_plan_json()))
    edit(d)
    return json.dumps(d)


def _set(path: str, value: Any) -> Callable[[dict], None]:
    """An edit setting d[a][b]... (integers index lists) to `value`."""

    def edit(d: dict) -> None:
        *head, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        for p in head:
            d = d[p]
        d[last] = value

    return edit


def _delete(path: str) -> Callable[[dict], None]:
    def edit(d: dict) -> None:
        *head, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        for p in head:
            d = d[p]
        del d[last]

    return edit


def _first_collective(d: dict) -> tuple[int, int]:
    return next((i, j) for i, layer in enumerate(d["layers"]) for j, _ in enumerate(layer["collectives"]))


def _collective_edit(field: str, value: Any) -> Callable[[dict], None]:
    def edit(d: dict) -> None:
        i, j = _first_collective(d)
        d["layers"][i]["collectives"][j][field] = value

    return edit


def json_probes() -> list[Probe]:
    """Plan.from_json on valid, malformed and tampered text: valid loads, anything else is a ShardwiseError."""
    def load(text_fn: Callable[[], Any], *, bad: bool = True) -> Callable[[], str]:
        def run() -> str:
            plan = shardwise.Plan.from_json(text_fn())
            if bad:
                accepted("a bad plan", plan)
            again = shardwise.Plan.from_json(plan.to_json())
            if again.to_json() != plan.to_json():
                raise Wrong("the round trip changes the plan")
            return f"loaded: mesh {plan.mesh}, {len(plan.layers)} layers"
        return run

    def full() -> str:
        return json.dumps(_plan_json())

    bad_texts: dict[str, Callable[[], Any]] = {
        "truncated to half": lambda: full()[: len(full()) // 2],
        "truncated by one character": lambda: full()[:-1],
        "empty string": lambda: "",
        "whitespace": lambda: "   \n",
        "null": lambda: "null",
        "a list": lambda: "[1, 2]",
        "an empty object": lambda: "{}",
        "None": lambda: None,
        "not JSON": lambda: "mesh=1x1x2",
        "format missing": lambda: _tampered(_delete("format")),
        "format 99": lambda: _tampered(_set("format", 99)),
        "format '2' (a string)": lambda: _tampered(_set("format", str(_plan_json()["format"]))),
        "mesh 'banana'": lambda: _tampered(_set("mesh", "banana")),
        "mesh 4 (an int)": lambda: _tampered(_set("mesh", 4)),
        "mesh '0x1x2'": lambda: _tampered(_set("mesh", "0x1x2")),
        "mesh '1x1x1' (its collectives over z)": lambda: _tampered(_set("mesh", "1x1x1")),
        "mesh '1x1x3' (collectives sized for 2)": lambda: _tampered(_set("mesh", "1x1x3")),
        "mesh missing": lambda: _tampered(_delete("mesh")),
        "layer choice 'ws9'": lambda: _tampered(lambda d: next(layer for layer in d["layers"] if layer["kind"] == "ffn")
                                                .__setitem__("choice", "ws9")),
        "run member 'ws9'": lambda: _tampered(_set("runs.0.member", "ws9")),
        "run first > last": lambda: _tampered(lambda d: d["runs"][0].update(first=5, last=1)),
        "run attention 'rows'": lambda: _tampered(_set("runs.0.attention", "rows")),
        "collective kind 'teleport'": lambda: _tampered(_collective_edit("kind", "teleport")),
        "collective bytes -1": lambda: _tampered(_collective_edit("bytes", -1)),
        "collective bytes 'many'": lambda: _tampered(_collective_edit("bytes", "many")),
        "collective bytes 1.5": lambda: _tampered(_collective_edit("bytes", 1.5)),
        "collective wire_bytes -3.0": lambda: _tampered(_collective_edit("wire_bytes", -3.0)),
        "collective group 'w' (no such axis)": lambda: _tampered(_collective_edit("group", "w")),
        "collective group 'x' (size 1 on this mesh)": lambda: _tampered(_collective_edit("group", "x")),
        "collective unknown field": lambda: _tampered(_collective_edit("speed", 3)),
        "layer kind 'mlp'": lambda: _tampered(_set("layers.1.kind", "mlp")),
        "layer count -1": lambda: _tampered(_set("layers.1.count", -1)),
        "layer dims E = -64": lambda: _tampered(lambda d: d["layers"][0]["dims"].update(E=-64)),
        "layers is a dict": lambda: _tampered(_set("layers", {})),
        "layers missing": lambda: _tampered(_delete("layers")),
        "batch -1": lambda: _tampered(_set("batch", -1)),
        "batch 'eight'": lambda: _tampered(_set("batch", "eight")),
        "seq 2.5": lambda: _tampered(_set("seq", 2.5)),
        "phase 'train'": lambda: _tampered(_set("phase", "train")),
        "hardware 42": lambda: _tampered(_set("hardware", 42)),
        "totals.latency -1": lambda: _tampered(_set("totals.latency", -1.0)),
        "totals.latency 'fast'": lambda: _tampered(_set("totals.latency", "fast")),
        "memory.weights_total -5": lambda: _tampered(_set("memory.weights_total", -5)),
        "settings.objective 'speed'": lambda: _tampered(_set("settings.objective", "speed")),
        "settings.requested ffn=ws9": lambda: _tampered(_set("settings.requested", {"ffn": "ws9"})),
        "an extra top-level field": lambda: _tampered(_set("surprise", 1)),
        "a 'program' field": lambda: _tampered(_set("program", "import os")),
        "totals.latency NaN": lambda: _tampered(_set("totals.latency", float("nan"))),
        "Infinity bytes": lambda: _tampered(_collective_edit("wire_bytes", float("inf"))),
    }
    probes = [Probe("plan JSON", "a valid plan's round trip", load(full, bad=False)),
              Probe("plan JSON", "a valid plan as UTF-8 bytes", load(lambda: full().encode(), bad=False))]
    probes += [Probe("plan JSON", what, load(fn)) for what, fn in bad_texts.items()]
    return probes


def plan_argument_probes() -> list[Probe]:
    """shardwise.plan with bad (and a few unusual but valid) arguments."""
    m = model("ref-mha")
    args, _ = inputs(m)

    def bad(**kw) -> Callable[[], str]:
        def run() -> str:
            target = kw.pop("model", "ref-tiny")
            accepted(", ".join(f"{k}={v!r}" for k, v in kw.items()), shardwise.plan(target, **kw))
            return ""
        return run

    def good(check: Callable[[shardwise.Plan], str | None] = lambda p: None, **kw) -> Callable[[], str]:
        def run() -> str:
            target = kw.pop("model", "ref-tiny")
            p = shardwise.plan(target, **kw)
            problem = check(p)
            if problem:
                raise Wrong(problem)
            return f"mesh {p.mesh}, {p.chosen}"
        return run

    cases: dict[str, Callable[[], str]] = {
        "mesh=4 (an int)": bad(mesh=4),
        "mesh=0": bad(mesh=0),
        "mesh=''": bad(mesh=""),
        "mesh='banana'": bad(mesh="banana"),
        "mesh='0x1x2'": bad(mesh="0x1x2"),
        "mesh='-1x2x1'": bad(mesh="-1x2x1"),
        "mesh='2x2x2x2'": bad(mesh="2x2x2x2"),
        "mesh=(2, 0, 1)": bad(mesh=(2, 0, 1)),
        "mesh=(2.5, 1, 1)": bad(mesh=(2.5, 1, 1)),
        "mesh=None, chips=None": bad(),
        "chips=0": bad(chips=0),
        "chips=-4": bad(chips=-4),
        "chips=2.5": bad(chips=2.5),
        "chips='8'": bad(chips="8"),
        "chips=True": bad(chips=True),
        "mesh='1x1x2' and chips=8 (conflict)": bad(mesh="1x1x2", chips=8),
        "batch=-1": bad(mesh="1x1x2", batch=-1),
        "batch=0": bad(mesh="1x1x2", batch=0),
        "batch=2.5": bad(mesh="1x1x2", batch=2.5),
        "seq=0": bad(mesh="1x1x2", seq=0),
        "seq=-3": bad(mesh="1x1x2", seq=-3),
        "context=-1 (decode)": bad(mesh="1x1x2", phase="decode", seq=1, context=-1),
        "context=4 < seq=16 (prefill)": bad(mesh="1x1x2", seq=16, context=4),
        "phase='train'": bad(mesh="1x1x2", phase="train"),
        "phase=''": bad(mesh="1x1x2", phase=""),
        "weight_dtype='fp7'": bad(mesh="1x1x2", weight_dtype="fp7"),
        "kv_dtype='fp7'": bad(mesh="1x1x2", kv_dtype="fp7"),
        "objective='speed'": bad(chips=4, objective="speed"),
        "hardware='tpu-v9'": bad(mesh="1x1x2", hardware="tpu-v9"),
        "layouts=5": bad(mesh="1x1x2", layouts=5),
        "layouts='ffn=ws9'": bad(mesh="1x1x2", layouts="ffn=ws9"),
        "layouts={'ffn': 3}": bad(mesh="1x1x2", layouts={"ffn": 3}),
        "layouts='ffn=ws2d,ffn=ws1d' (twice)": bad(mesh="1x1x2", layouts="ffn=ws2d,ffn=ws1d"),
        "layouts='ffn=bx.ex.fz' (x twice)": bad(mesh="2x1x2", layouts="ffn=bx.ex.fz"),
        "layouts='embed=rows'": bad(mesh="1x1x2", layouts="embed=rows"),
        "model='no-such-model'": bad(model="no-such-model", mesh="1x1x2"),
        "model=None": bad(model=None, mesh="1x1x2"),
        "model=42": bad(model=42, mesh="1x1x2"),

        "args=('hello',)": lambda: accepted("args=('hello',)", shardwise.plan(m, ("hello",), {}, mesh="1x1x2")),
        "args=()": lambda: accepted("args=()", shardwise.plan(m, (), {}, mesh="1x1x2")),
        "kwargs with an unknown name": lambda: accepted("kwargs={'nope': 1}",
                                                        shardwise.plan(m, args, {"nope": 1}, mesh="1x1x2")),
        "mesh=' 1x1x2 ' (spaces)": good(mesh=" 1x1x2 "),
        "mesh=(1, 1, 2)": good(mesh=(1, 1, 2), check=lambda p: None if p.mesh.size == 2 else f"mesh {p.mesh}"),
        "mesh='4' (all on x)": good(mesh="4", check=lambda p: None if p.mesh.size == 4 else f"mesh {p.mesh}"),
        "layouts={'ffn': 'ws2d'} (a dict)": good(mesh="2x2x1", layouts={"ffn": "ws2d"}),
        "chips=8, objective='cost'": good(chips=8, objective="cost",
                                          check=lambda p: None if 8 % p.mesh.size == 0 else f"mesh {p.mesh}"),
        "a model object without args (its step)": good(model=m, mesh="1x1x2"),
        "weight_dtype='int8', decode": good(mesh="1x1x4", phase="decode", seq=1, context=32, weight_dtype="int8"),
    }
    return [Probe("plan arguments", what, fn) for what, fn in cases.items()]


# What a forced member must be on the mesh the planner picks, in the paper's family names (BlockRun.family,
# read off the member's effective roles there): ws2d must stay 2D (E and F both split), not collapse to 1D
# on a mesh whose x is 1. The names of WG-X and WG-XY depend on how many axes the mesh gives batch, so
# either is accepted for wg_x and wg_xy: both split batch and F.
FAMILY = {"ws2d": {"2D WS"}, "ws1d": {"1D WS"}, "wg_x": {"WG-X", "WG-XY"}, "wg_xy": {"WG-X", "WG-XY"},
          "wg_xyz": {"WG-XYZ"}, "ws1d_ar": {"1D WS (all-reduce)"}}


def forced_layout_probes() -> list[Probe]:
    """layouts forced with a chip count: the plan must use what was forced on a mesh where it means what it
    says (ws2d: a 2D plan), or say why it cannot."""
    def run(name: str, chips: int, layouts: str, phase: str) -> str:
        extra = {"seq": 1, "context": 64} if phase == "decode" else {}
        p = shardwise.plan(name, chips=chips, layouts=layouts, phase=phase, batch=8, **extra)
        forced = dict(part.split("=") for part in layouts.split(","))
        problems = []
        if p.mesh.size != chips:
            problems.append(f"mesh {p.mesh} has {p.mesh.size} chips, not {chips}")
        if not p.runs:
            problems.append("no block runs in the plan")
        for r in p.runs:
            if "ffn" in forced and r.family not in FAMILY[forced["ffn"]]:
                problems.append(f"blocks {r.first}-{r.last}: {r.member} ({r.family}), not "
                                f"{' or '.join(sorted(FAMILY[forced['ffn']]))}")
            if "attn" in forced and forced["attn"] not in r.attention:
                problems.append(f"blocks {r.first}-{r.last}: attention by {r.attention}, not {forced['attn']}")
        if problems:
            raise Wrong(f"forced {layouts} on {chips} chips, got mesh {p.mesh} {p.chosen}: " + "; ".join(problems))
        return f"mesh {p.mesh}: {p.chosen}"

    probes = []
    for name in ("ref-tiny", "palm-8b"):
        for chips in (4, 8):
            for layouts in ("ffn=ws2d", "ffn=ws1d", "ffn=wg_x", "ffn=wg_xy", "ffn=wg_xyz", "ffn=ws1d_ar",
                            "attn=batch", "ffn=ws2d,attn=batch"):
                phase = "decode" if name == "palm-8b" and "batch" in layouts else "prefill"
                probes.append(Probe("forced layouts", f"{name} chips={chips} layouts={layouts} {phase}",
                                    lambda n=name, c=chips, la=layouts, ph=phase: run(n, c, la, ph)))
    return probes


def decode_probes() -> list[Probe]:
    """shardwise.plan(preset, phase='decode') with and without a context."""
    def run(name: str, **kw) -> str:
        p = shardwise.plan(name, phase="decode", **kw)
        context = getattr(p.settings, "context", None)
        if str(p.phase) != "decode" or p.seq != 1 or not context or context < 1:
            raise Wrong(f"decode plan with seq {p.seq}, context {context}, phase {p.phase}")
        return f"mesh {p.mesh}: {p.chosen}, seq {p.seq}, context {context}"

    probes = []
    for name in ("ref-tiny", "ref-tiny-parallel", "gpt2-tiny", "llama-tiny", "palm-8b", "llama2-7b"):
        probes.append(Probe("decode", f"{name} phase=decode chips=4, no context",
                            lambda n=name: run(n, chips=4)))
    probes += [
        Probe("decode", "ref-tiny decode seq=1 context=0", lambda: accepted("context=0", shardwise.plan(
            "ref-tiny", phase="decode", mesh="1x1x2", seq=1, context=0))),
        Probe("decode", "gpt2-tiny decode context=1000 > n_positions 128", lambda: accepted(
            "context=1000", shardwise.plan("gpt2-tiny", phase="decode", mesh="1x1x2", seq=1, context=1000))),
        Probe("decode", "palm-8b decode seq=1 context=2048 mesh 2x2x2", lambda: run(
            "palm-8b", mesh="2x2x2", seq=1, context=2048)),
        Probe("decode", "ref-tiny decode emits a rank program", lambda: _decode_program()),
    ]
    return probes


def _decode_program() -> str:
    p = shardwise.plan("ref-tiny", phase="decode", mesh="1x1x2", seq=1, context=8)
    n = len(list(p.program.gm.graph.nodes))
    return f"global program of {n} nodes"


def driver_probes() -> list[Probe]:
    """shardwise.verify and shardwise.generate with valid and bad values."""
    from shardwise.drivers.generate import reference_generate

    def gen(tokens: int, *, ids=None, mesh: str = "1x1x2", bad: bool) -> str:
        """generate vs reference_generate; where the model itself rejects the prompt, generate must raise a
        ShardwiseError or the model's own exception type."""
        m = model("ref-mha")
        ids = inputs(m, 2, 4)[0][0] if ids is None else ids
        model_error = None
        with torch.no_grad():
            try:
                m(ids)
            except Exception as e:  # noqa: BLE001 - whatever the unsharded model raises, the sharded may too
                model_error = e
        try:
            out = shardwise.generate(m, ids, tokens, mesh=mesh, simulate=True)
        except ShardwiseError:
            raise
        except Exception as e:
            if model_error is not None and isinstance(e, type(model_error)):
                return f"raises {type(e).__name__} as the unsharded model does"
            raise
        if bad or model_error is not None:
            accepted(f"max_new_tokens={tokens}, ids {_short(ids)}", out)
        want = reference_generate(m, ids, tokens)
        if not torch.equal(out, want):
            raise Wrong("greedy tokens differ from the unsharded model's")
        return f"{tokens} tokens, identical"

    def ver(bad: bool, **kw) -> str:
        report = shardwise.verify("ref-tiny", mesh=kw.pop("mesh", "1x1x2"), **kw)
        if bad:
            accepted(", ".join(f"{k}={v!r}" for k, v in kw.items()), report)
        if not report.ok:
            raise Wrong(str(report).splitlines()[0])
        return str(report).splitlines()[0][:100]

    m = model("ref-mha")
    return [
        Probe("drivers", "generate 4 tokens", lambda: gen(4, bad=False)),
        Probe("drivers", "generate 0 tokens", lambda: gen(0, bad=False)),
        Probe("drivers", "generate -1 tokens", lambda: gen(-1, bad=True)),
        Probe("drivers", "generate with 1-D ids", lambda: gen(2, ids=inputs(m, 2, 4)[0][0][0], bad=True)),
        Probe("drivers", "generate with float ids", lambda: gen(2, ids=inputs(m, 2, 4)[0][0].float(), bad=True)),
        Probe("drivers", "generate with ids >= vocab", lambda: gen(
            2, ids=torch.full((2, 4), vocab_of(m) + 5), bad=True)),
        Probe("drivers", "generate past max_seq (200 tokens)", lambda: gen(200, bad=False)),
        Probe("drivers", "generate on mesh 'banana'", lambda: gen(2, mesh="banana", bad=True)),
        Probe("drivers", "verify ref-tiny 1x1x2", lambda: ver(False)),
        Probe("drivers", "verify atol=nan", lambda: ver(True, atol=float("nan"))),
        Probe("drivers", "verify atol=-1", lambda: ver(True, atol=-1.0)),
        Probe("drivers", "verify atol=inf", lambda: ver(True, atol=float("inf"))),
        Probe("drivers", "verify tokens=-1 decode", lambda: ver(True, phase="decode", tokens=-1)),
        Probe("drivers", "verify batch=-1", lambda: ver(True, batch=-1)),
        Probe("drivers", "verify nproc=0", lambda: ver(True, nproc=0)),
        Probe("drivers", "verify palm-8b (shapes only)", lambda: accepted(
            "a shape-only preset", shardwise.verify("palm-8b", mesh="1x1x2"))),
    ]


def cli_probes() -> list[Probe]:
    """The command line through shardwise.cli.main([...]), exit statuses and messages."""
    good = [
        "inspect ref-tiny --mesh 1x1x2",
        "inspect ref-tiny --chips 4 --phase decode",
        "inspect palm-8b --chips 8 --phase decode --batch 8 --seq 128 --weights int8",
        "inspect ref-tiny --mesh 2x2x1 --layouts ffn=ws2d,attn=batch --format json",
        "verify ref-tiny --mesh 1x1x2",
        "verify ref-tiny-gqa --mesh 1x1x4 --layouts ffn=ws1d,attn=heads",
        "verify ref-tiny --mesh 1x1x2 --phase decode --tokens 2",
        "generate ref-tiny --mesh 1x1x2 --tokens 2",
    ]
    bad = [
        "inspect ref-tiny --mesh 1x1x2 --batch -1",
        "inspect ref-tiny --mesh 1x1x2 --batch 0",
        "inspect ref-tiny --mesh 1x1x2 --seq -1",
        "inspect ref-tiny --mesh 1x1x2 --phase decode --context -1",
        "inspect ref-tiny --chips 0",
        "inspect ref-tiny --chips -4",
        "inspect ref-tiny --mesh banana",
        "inspect ref-tiny --mesh 0x1x2",
        "inspect ref-tiny --mesh 1x1x2 --layouts ffn=ws9",
        "inspect ref-tiny --mesh 1x1x2 --layouts ffn",
        "inspect ref-tiny --mesh 1x1x2 --layouts attn=rows",
        "inspect ref-tiny --mesh 1x1x2 --hardware tpu-v9",
        "inspect no-such-model --mesh 1x1x2",
        "inspect ref-tiny",
        "verify ref-tiny --mesh 1x1x2 --batch -1",
        "verify ref-tiny --mesh 1x1x2 --seq 0",
        "verify ref-tiny --mesh 1x1x2 --atol nan",
        "verify ref-tiny --mesh 1x1x2 --atol -1",
        "verify ref-tiny --mesh 1x1x2 --atol inf",
        "verify ref-tiny --mesh 1x1x2 --phase decode --tokens -1",
        "verify ref-tiny --mesh 1x1x2 --phase decode --tokens 0",
        "verify ref-tiny --mesh 1x1x2 --nproc 0",
        "verify ref-tiny --mesh 1x1x4 --nproc 3",
        "verify ref-tiny --mesh 1x1x2 --layouts ffn=ws9d",
        "verify ref-tiny --mesh 1x1x2 --layouts mlp=ws1d",
        "verify palm-8b --mesh 1x1x2",
        "verify ref-tiny --chips 4",
        "generate ref-tiny --mesh 1x1x2 --tokens -1",
        "generate ref-tiny --mesh 1x1x2 --batch -1",
        "generate ref-tiny --mesh 1x1x2 --tokens 2 --prefill-layouts ffn=ws9",
        "generate palm-8b --mesh 1x1x2 --tokens 2",
        "frobnicate ref-tiny",
    ]
    probes = [Probe("cli", f"shardwise {line}", lambda line=line: cli(line.split(), bad=False)) for line in good]
    probes += [Probe("cli", f"shardwise {line}", lambda line=line: cli(line.split(), bad=True)) for line in bad]
    return probes


CATEGORIES = {"numerics": numerics_probes, "runtime": runtime_probes, "json": json_probes,
              "args": plan_argument_probes, "forced": forced_layout_probes, "decode": decode_probes,
              "drivers": driver_probes, "cli": cli_probes}


# ============================================================================== running and classifying
def classify(probe: Probe) -> Result:
    """Run one probe in this process and classify what happened."""
    t0 = time.perf_counter()
    r = Result(probe.category, probe.name, "works")
    try:
        r.message = probe.run() or ""
    except Wrong as e:
        r.outcome, r.message = "silently wrong", str(e)
    except Refused as e:
        r.outcome, r.message = "clear error", str(e)
    except ShardwiseError as e:
        text = str(e).strip()
        if text:
            r.outcome, r.message = "clear error", f"{type(e).__name__}: {text}"
        else:
            r.outcome, r.message = "crash", f"{type(e).__name__} without a message"
            r.where = _where(e)
    except BaseException as e:  # noqa: BLE001 - SystemExit and KeyboardInterrupt inside a probe are crashes too
        r.outcome, r.message, r.where = "crash", f"{type(e).__name__}: {e}", _where(e)
    r.seconds = time.perf_counter() - t0
    return r


def _where(e: BaseException) -> str:
    """The innermost traceback frame inside the shardwise package (not this script), else the innermost."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if os.path.abspath(f.filename).startswith(PACKAGE_DIR + os.sep)
            and "site-packages" not in f.filename and not f.filename.endswith("probe_contract.py")]
    f = (ours or frames or [None])[-1]
    if f is None:
        return ""
    path = os.path.relpath(f.filename, PACKAGE_DIR) if ours else f.filename
    return f"{path}:{f.lineno} in {f.name}"


def warm_up() -> None:
    """Build the models and plan once here, before forking: every child then starts with torch.export's
    lazy imports and caches loaded (a cold first plan costs seconds), and shares the models."""
    for name in (*REF_CONFIGS, *HF_NAMES):
        model(name)
    m = model("ref-mha")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        shardwise.simulate(shardwise.plan(m, *inputs(m), mesh="1x1x2"), *inputs(m))
        shardwise.plan("ref-tiny", chips=2)
        _plan_json()
    importlib.import_module("shardwise.cli")


class Running:
    """A probe running in a forked child: its own process group, the address space capped."""

    def __init__(self, probe: Probe, memory_gib: float):
        ctx = multiprocessing.get_context("fork")
        self.probe, self.started = probe, time.perf_counter()
        self.receive, send = ctx.Pipe(duplex=False)
        self.child = ctx.Process(target=_child, args=(probe, send, memory_gib))
        self.child.start()
        send.close()  # the child holds the only writing end: its death reads as EOF here

    def collect(self) -> Result:
        """The child's result (the pipe is readable: a result was sent, or the child died)."""
        try:
            result = Result(**self.receive.recv())
        except EOFError:
            result = None
        self.child.join(10)
        self._kill()
        if result is None:
            code = self.child.exitcode
            how = f"killed by signal {-code}" if code and code < 0 else f"exited with status {code}"
            result = Result(self.probe.category, self.probe.name, "crash",
                            f"the probe's process {how} without a result", seconds=self.elapsed)
        return result

    def hang(self, timeout: float) -> Result:
        self._kill()
        return Result(self.probe.category, self.probe.name, "hang", f"still running after {timeout:.0f} s",
                      seconds=self.elapsed)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def _kill(self) -> None:
        """Kill the child and whatever it launched (its process group), if still there."""
        if self.child.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.child.pid, signal.SIGKILL)
            self.child.join()
        self.receive.close()


def run_all(probes: list[Probe], *, jobs: int, timeout: float, memory_gib: float,
            progress: Callable[[int, Result], None]) -> list[Result]:
    """Run every probe in its own forked child, `jobs` at a time; a child past `timeout` is killed (a hang)."""
    results: list[Result | None] = [None] * len(probes)
    running: dict[int, Running] = {}
    queue = list(enumerate(probes))
    done = 0
    while queue or running:
        while queue and len(running) < jobs:
            i, probe = queue.pop(0)
            running[i] = Running(probe, memory_gib)
        ready = multiprocessing.connection.wait([r.receive for r in running.values()], timeout=0.5)
        for i, r in list(running.items()):
            if r.receive in ready:
                results[i] = r.collect()
            elif r.elapsed > timeout:
                results[i] = r.hang(timeout)
            else:
                continue
            del running[i]
            done += 1
            progress(done, results[i])
    return results  # type: ignore[return-value]


def _child(probe: Probe, send, memory_gib: float) -> None:
    os.setpgid(0, 0)
    if memory_gib > 0:
        used = _vm_size()
        limit = int(used + memory_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    warnings.simplefilter("ignore")
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        result = classify(probe)
    send.send(vars(result))
    send.close()
    os._exit(0)  # skip atexit handlers and flushing the parent's buffers twice


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def first_line(text: str, width: int = 110) -> str:
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    return line if len(line) <= width else line[: width - 1] + "…"


def report(results: list[Result]) -> str:
    counts = {o: sum(r.outcome == o for r in results) for o in OUTCOMES}
    totals = (f"tried {len(results)} / works {counts['works']} / clear error {counts['clear error']} / "
              f"silently wrong {counts['silently wrong']} / crash {counts['crash']} / hang {counts['hang']}")
    lines = [totals, ""]
    by_category: dict[str, dict[str, int]] = {}
    for r in results:
        by_category.setdefault(r.category, dict.fromkeys(OUTCOMES, 0))[r.outcome] += 1
    lines.append(f"{'category':<16} " + " ".join(f"{o:>14}" for o in OUTCOMES))
    for cat, c in by_category.items():
        lines.append(f"{cat:<16} " + " ".join(f"{c[o]:>14}" for o in OUTCOMES))
    bad = [r for r in results if r.outcome != "works"]
    order = {o: i for i, o in enumerate(("hang", "crash", "silently wrong", "clear error"))}
    bad.sort(key=lambda r: (order[r.outcome], r.category))
    if bad:
        lines += ["", "Every probe that did not work:", ""]
        w_cat, w_name = max(len(r.category) for r in bad), min(70, max(len(r.name) for r in bad))
        lines.append(f"{'category':<{w_cat}}  {'probe':<{w_name}}  {'outcome':<14}  message")
        for r in bad:
            where = f"  [{r.where}]" if r.where else ""
            lines.append(f"{r.category:<{w_cat}}  {r.name[:w_name]:<{w_name}}  {r.outcome:<14}  "
                         f"{first_line(r.message)}{where}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shardwise.experiments.probe_contract", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help=f"comma-separated categories: {', '.join(CATEGORIES)}")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a probe counts as a hang")
    parser.add_argument("--memory-gib", type=float, default=6.0,
                        help="address space a probe may add to the parent's before allocations fail (0: no cap)")
    parser.add_argument("--jobs", type=int, default=2, help="probes run at once, each in its own process")
    parser.add_argument("--json", default=None, help="also write every result to this file")
    parser.add_argument("--verbose", action="store_true", help="print each probe as it finishes")
    a = parser.parse_args(argv)
    if not (a.timeout > 0 and math.isfinite(a.timeout)):
        parser.error(f"--timeout {a.timeout}: expected a positive number of seconds")
    if a.jobs < 1:
        parser.error(f"--jobs {a.jobs}: expected at least 1")

    torch.set_num_threads(1)  # before any op: the forked children then inherit no thread pool
    warnings.simplefilter("ignore")
    names = a.only.split(",") if a.only else list(CATEGORIES)
    unknown = [n for n in names if n not in CATEGORIES]
    if unknown:
        parser.error(f"unknown categories {unknown}: use {', '.join(CATEGORIES)}")
    t0 = time.perf_counter()
    warm_up()
    probes = [p for n in names for p in CATEGORIES[n]()]
    print(f"shardwise from {PACKAGE_DIR}: {len(probes)} probes in {', '.join(names)}", flush=True)

    def progress(i: int, r: Result) -> None:
        if a.verbose:
            print(f"[{i}/{len(probes)}] {r.outcome:<14} {r.seconds:5.1f}s {r.category}: {r.name}: "
                  f"{first_line(r.message, 80)}", flush=True)
        elif i % 50 == 0:
            print(f"  {i}/{len(probes)} probes, {time.perf_counter() - t0:.0f} s", flush=True)

    results = run_all(probes, jobs=a.jobs, timeout=a.timeout, memory_gib=a.memory_gib, progress=progress)
    print()
    print(report(results))
    print(f"\n{len(results)} probes in {time.perf_counter() - t0:.0f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([vars(r) for r in results], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
