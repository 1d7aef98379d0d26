"""The planner's shortcuts change nothing: remembered rule decisions equal recomputed ones, the chain
over blocks with hopeless candidates left out is the full recursion's, candidates costed through the
search's shortcuts (remembered decisions, structure facts, candidates and transitions shared between
meshes) are the ones costed afresh, to the bit (no timings here)."""

from __future__ import annotations

import pytest

from shardwise.ir.hardware import get_hardware
from shardwise.ir.mesh import Mesh
from shardwise.ir.meta import IN_LAYOUTS, LAYERS, LAYOUT, STATE
from shardwise.passes.attribute import OUTPUT
from shardwise.planning.apply import apply, choices_for
from shardwise.planning.candidate import Candidate
from shardwise.planning.planner import prototype
from shardwise.planning.search import (
    _chain,
    _chain_dp,
    _transition,
    evaluate,
    meshes_for,
    plan_mesh,
    residual_itemsize,
    transition,
)
from shardwise.strategies.cost import Precision
from shardwise.strategies.family import ATTENTION_MODES, all_members


@pytest.fixture(scope="module")
def proto():
    gm, n_blocks, _, _ = prototype("palm-8b", "decode", 16, 1, 256)
    return gm, n_blocks


def _decisions(gm):
    return [(n.name, n.meta.get(LAYOUT), n.meta.get(IN_LAYOUTS)) for n in gm.graph.nodes]


@pytest.mark.parametrize("shape", ["2x2x2", "1x2x4", "4x2x1"])
def test_remembered_decisions_equal_recomputed_ones(proto, shape):
    gm, _ = proto
    mesh = Mesh.parse(shape)
    for member in all_members():
        for attention in ATTENTION_MODES:
            choices = choices_for(gm.meta[LAYERS], [Candidate(member, attention, mesh)], {})
            try:
                fast = apply(gm, mesh, choices, check=False)  # remembered decisions
            except Exception as e:  # the same refusal either way
                with pytest.raises(type(e)):
                    apply(gm, mesh, choices, check=True)
                continue
            got = _decisions(gm)
            slow = apply(gm, mesh, choices, check=True)  # every rule run again, and checked
            assert got == _decisions(gm)
            assert [(c.src.name, c.want, c.steps) for c in fast] == [(c.src.name, c.want, c.steps) for c in slow]


@pytest.mark.parametrize("shape", ["2x2x2", "1x1x8", "2x4x1"])
@pytest.mark.parametrize("n", [2, 3, 32, 118])
def test_chain_without_hopeless_candidates_is_the_full_chain(proto, shape, n):
    import numpy as np

    gm, n_blocks = proto
    mesh, hw = Mesh.parse(shape), get_hardware("tpu-v4")
    choice = plan_mesh(gm, mesh, hw=hw, precision=Precision(), n_blocks=n_blocks)
    ok = [c for c in choice.candidates if c.refused is None]
    layers = gm.meta[LAYERS]
    shape3 = (layers.dims.get("B", 1), layers.dims.get("L", 1), layers.dims.get("E", 1))
    itemsize = residual_itemsize(gm)
    # make transitions worth it: each candidate's embedding and head costs shifted apart
    for i, c in enumerate(ok):
        c.times = {**c.times, "embedding": {**c.times.get("embedding", {"time": 0.0}),
                                            "time": c.times.get("embedding", {}).get("time", 0.0) + 1e-4 * (i % 3)}}
    block = np.array([c.block_time() for c in ok])
    emb = np.array([c.times.get("embedding", {}).get("time", 0.0) for c in ok])
    tail = np.array([c.times.get("head", {}).get("time", 0.0) + c.times.get(OUTPUT, {}).get("time", 0.0)
                     for c in ok])
    fast = _chain(ok, n, mesh, shape3, hw, Precision(), itemsize)
    full = _chain_dp(ok, n, mesh, shape3, hw, Precision(), itemsize, block, emb, tail)
    uniform = emb + n * block + tail
    if uniform.min() <= n * block.min() + emb.min() + tail.min() + 1e-12:
        assert fast[1] == float(uniform.min())  # the uniform shortcut, as before
        return
    assert [id(c) for c in fast[0]] == [id(c) for c in full[0]]
    assert fast[1] == full[1] and fast[2] == full[2]


@pytest.mark.parametrize("hardware, axis_bandwidth", [("tpu-v4", None), ("tpu-v4", 20e9), ("h100", None)])
def test_transitions_shared_between_meshes_are_the_recomputed_ones(proto, hardware, axis_bandwidth):
    """A transition the search remembers under its two members' canonical keys, from whichever mesh met
    them first, is the one computed on the mesh that asks (links per axis limiting bandwidth or not)."""
    from dataclasses import replace

    gm, _ = proto
    hw = get_hardware(hardware)
    if axis_bandwidth:
        hw = replace(hw, axis_bandwidth=axis_bandwidth)
    layers = gm.meta[LAYERS]
    shape = (layers.dims.get("B", 1), layers.dims.get("L", 1), layers.dims.get("E", 1))
    itemsize, cache, members = residual_itemsize(gm), {}, all_members()
    for mesh in meshes_for(8):
        for a in members:
            for b in members:
                shared = _transition(a, b, mesh, shape, hw, Precision(), itemsize, cache)
                assert shared == transition(a, b, mesh, shape, hw, Precision(), itemsize), (str(mesh), a, b)


@pytest.mark.parametrize("shape", ["2x2x2", "1x2x4", "4x2x1", "8x1x1"])
def test_searched_candidates_are_the_recomputed_ones(proto, shape):
    """Every candidate of a mesh searched after the others (rule decisions remembered, the graph's
    structure facts made once, candidates and transitions shared between meshes) is the candidate costed
    afresh (every rule decided again, every fact read again); its chain is the one found sharing nothing."""
    from shardwise.passes.propagate import _MEMO

    gm, n_blocks = proto
    hw, precision = get_hardware("tpu-v4"), Precision(weights="int8")
    cache: dict = {}
    searched = {m: plan_mesh(gm, m, hw=hw, precision=precision, n_blocks=n_blocks, cache=cache) for m in meshes_for(8)}
    mesh = Mesh.parse(shape)
    choice = searched[mesh]
    for c in choice.candidates:
        gm.__dict__.pop(_MEMO, None)
        fresh = evaluate(gm, mesh, c.member, c.attention, hw=hw, precision=precision, n_blocks=n_blocks,
                         overlap=False, forced={}, experts=c.experts, latent=c.latent)
        # (a candidate shared from another mesh names that mesh's atoms in its collectives: its numbers agree)
        assert (fresh.refused, fresh.core, _numbers(fresh.parts), fresh.times, fresh.memory) == (
            c.refused, c.core, _numbers(c.parts), c.times, c.memory), c.name
    gm.__dict__.pop(_MEMO, None)
    alone = plan_mesh(gm, mesh, hw=hw, precision=precision, n_blocks=n_blocks)
    assert [b.name for b in alone.blocks] == [b.name for b in choice.blocks]
    assert alone.total == choice.total and alone.transitions == choice.transitions


def _numbers(parts):
    return {k: (p.flops, p.weight_bytes, p.kv_bytes, p.calls, p.copy_bytes, p.comm_bytes(),
                [(c.step.kind, c.step.group_size, c.step.elements, c.itemsize, c.weight, c.fused, c.load, c.looped,
                  c.sized)
                 for c in p.comm], [len(b.comm) for b in p.branches]) for k, p in parts.items()}


# ------------------------------------------------------------------------------------ the prototype cache
def _graph(gm):
    """Everything of a graph the passes can read: nodes, targets, arguments, meta (values by shape,
    stride, dtype, device), and the graph's records."""
    import torch

    def val(v):
        if isinstance(v, torch.Tensor):
            return ("tensor", tuple(v.shape), v.stride(), v.dtype, v.device.type, v.requires_grad)
        if isinstance(v, (list, tuple)):
            return type(v).__name__, tuple(val(x) for x in v)
        return v

    nodes = [(n.op, n.name, str(n.target), str(n.args), str(n.kwargs),
              {k: val(v) for k, v in n.meta.items()}) for n in gm.graph.nodes]
    return nodes, {k: ({key: val(t) for key, t in v.items()} if k == STATE else v) for k, v in gm.meta.items()}


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_cached_prototype_is_the_captured_one(phase, tmp_path, monkeypatch):
    """A preset's prototype read back from the cache is the graph capture made (every node, argument and
    meta entry, the signature, the state and the layers), and plans to the same Plan, to the byte."""
    import shardwise
    from shardwise.planning import prototype_cache

    monkeypatch.setenv("SHARDWISE_CACHE", str(tmp_path))
    args = ("palm-8b", phase, 8, 16 if phase == "prefill" else 1, 64)
    monkeypatch.setenv("SHARDWISE_PROTOTYPE_CACHE", "0")
    fresh = prototype(*args)[0]
    monkeypatch.setenv("SHARDWISE_PROTOTYPE_CACHE", "1")
    stored = prototype(*args)[0]  # captured and stored
    assert len(list((tmp_path / "prototypes").iterdir())) == 1
    cached = prototype(*args)[0]  # read back
    assert cached is not stored and _graph(cached) == _graph(fresh) == _graph(stored)
    assert not any(type(n.meta.get("val")).__name__ == "FakeTensor" for n in cached.graph.nodes)
    kw = dict(chips=8, phase=phase, batch=8, seq=args[3], context=64, weight_dtype="int8")
    monkeypatch.setenv("SHARDWISE_PROTOTYPE_CACHE", "0")
    want = shardwise.plan("palm-8b", **kw).to_json()
    monkeypatch.setenv("SHARDWISE_PROTOTYPE_CACHE", "1")
    assert shardwise.plan("palm-8b", **kw).to_json() == want
    assert prototype_cache.load(prototype_cache.dump(fresh)).graph.python_code("self").src == \
        fresh.graph.python_code("self").src


def test_cache_key_holds_what_makes_the_graph(monkeypatch):
    from dataclasses import replace

    from shardwise.models import presets
    from shardwise.planning import prototype_cache as pc

    p = presets.get("palm-8b")
    shapes = dict(phase="decode", batch=8, seq=1, context=64)
    k = pc.key(p, **shapes)
    assert k == pc.key(p, **shapes)
    assert k != pc.key(p, **{**shapes, "context": 128}) and k != pc.key(p, **{**shapes, "phase": "prefill"})
    assert k != pc.key(replace(p, config={**p.config, "n_heads": p.config["n_heads"] * 2}), **shapes)
    monkeypatch.setattr(pc, "_SOURCE_HASH", "another shardwise")
    assert pc.key(p, **shapes) != k
    monkeypatch.setattr(pc, "_SOURCE_HASH", None)
    assert pc.key(p, **shapes) == k  # the source hash recomputed: the same files
    monkeypatch.setattr(pc.torch, "__version__", "0.0.0")
    assert pc.key(p, **shapes) != k


def test_symbolic_graphs_are_not_cached_and_bad_files_are_replaced(tmp_path, monkeypatch):
    """A Hugging Face preset's step reads its cache position with .item() (an unbacked symbol): not
    stored. An unreadable file is captured again and overwritten."""
    from shardwise.planning import prototype_cache as pc

    monkeypatch.setenv("SHARDWISE_CACHE", str(tmp_path))
    gm = prototype("mixtral-tiny", "decode", 2, 1, 16)[0]
    with pytest.raises(pc.NotCacheable):
        pc.dump(gm)
    assert not (tmp_path / "prototypes").exists()
    prototype("palm-8b", "decode", 8, 1, 64)
    (path,) = (tmp_path / "prototypes").iterdir()
    path.write_bytes(b"not a pickle")
    gm = prototype("palm-8b", "decode", 8, 1, 64)[0]
    assert _graph(pc.load(path.read_bytes())) == _graph(gm)


def test_a_cached_inspect_does_not_import_dynamo(tmp_path):
    """The second `shardwise inspect` of a preset reads its prototype from the cache: torch.export, and so
    torch._dynamo, is never imported, and the output is the first run's (json: every field of the Plan)."""
    import os
    import subprocess
    import sys

    code = ("import sys, io, contextlib; from shardwise.cli import main\n"
            "out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out): main(sys.argv[1:])\n"
            "print(out.getvalue()); print('torch._dynamo' in sys.modules)")
    argv = ["inspect", "palm-8b", "--chips", "8", "--phase", "decode", "--batch", "8", "--context", "64",
            "--format", "json"]
    env = {**os.environ, "SHARDWISE_CACHE": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True,
                           timeout=300, check=True).stdout.rsplit("\n", 2) for _ in range(2)]
    (cold, cold_dynamo, _), (warm, warm_dynamo, _) = runs
    assert cold_dynamo == "True" and warm_dynamo == "False"
    assert warm == cold
