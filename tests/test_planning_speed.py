"""The planner's shortcuts change nothing: remembered rule decisions equal recomputed ones, and the chain
over blocks with hopeless candidates left out is the full recursion's, to the bit (no timings here)."""

from __future__ import annotations

import pytest

from shardwise.ir.hardware import get_hardware
from shardwise.ir.meta import IN_LAYOUTS, LAYERS, LAYOUT
from shardwise.ir.mesh import Mesh
from shardwise.passes.attribute import OUTPUT
from shardwise.planning.apply import apply, choices_for
from shardwise.planning.candidate import Candidate
from shardwise.planning.planner import prototype
from shardwise.planning.search import _chain, _chain_dp, plan_mesh, residual_itemsize
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
