"""Redistribution: the steps between two layouts, their bytes, and that executing them is correct.

The property test builds a one-node global-view graph, emits every rank's program (the real lowering
to _c10d_functional ops) and runs them in the lockstep simulator: so it checks redistribute, the
lowering (including the block reordering for non-mesh-order atoms) and the simulator together.
"""


import pytest
import torch
import torch.fx as fx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardwise import Layout, Mesh
from shardwise.ir.meta import IN_LAYOUTS, LAYOUT, SIGNATURE, STATE
from shardwise.passes.emit import emit
from shardwise.passes.graph_utils import Signature
from shardwise.passes.insert_collectives import insert_collectives
from shardwise.runtime.lower import shard_tensor
from shardwise.runtime.simulate import run_lockstep, sim_group_name
from shardwise.strategies.redistribute import redistribute


def test_paper_2d_weight_stationary_chain():
    """The 2D WS feed-forward of PAPER.md: four collectives with the paper's volumes."""
    m = Mesh.parse("4x4x4")
    x, yz = m.atoms_of("x"), m.atoms_of("yz")
    B, L, E, F = 8, 16, 1024, 4096
    steps = redistribute(Layout(((), (), x + yz)), Layout(((), (), x)), (B, L, E), m, itemsize=2)
    steps += redistribute(Layout(((), (), yz), frozenset(x)), Layout(((), (), yz + x)), (B, L, F), m, itemsize=2)
    steps += redistribute(Layout(((), (), yz + x)), Layout(((), (), yz)), (B, L, F), m, itemsize=2)
    steps += redistribute(Layout(((), (), x), frozenset(yz)), Layout(((), (), x + yz)), (B, L, E), m, itemsize=2)
    assert [(s.kind, m.format_atoms(s.atoms)) for s in steps] == [
        ("all_gather", "yz"), ("reduce_scatter", "x"), ("all_gather", "x"), ("reduce_scatter", "yz")]
    # paper: volume 2·B·L·(E/X + F/YZ) elements
    assert sum(s.bytes for s in steps) == 2 * B * L * (E // 4 + F // 16) * 2


def test_heads_to_batch_is_all_to_all():
    """Batch-sharded attention: Q moves from heads to batch by all-to-all, not gather + slice."""
    m = Mesh.parse("4x4x4")
    x, yz = m.atoms_of("x"), m.atoms_of("yz")
    steps = redistribute(Layout(((), yz, (), ()), frozenset(x)), Layout((x + yz, (), (), ())), (64, 64, 1, 256), m)
    assert [s.kind for s in steps] == ["reduce_scatter", "all_to_all"]


def test_all_gather_charged_by_output_with_ring_factor():
    """An all-gather over g chips is charged its output; wire bytes carry the (g−1)/g factor."""
    m = Mesh.parse("1x1x4")
    (s,) = redistribute(Layout(((m.atoms_of("z")),)), Layout(((),)), (64,), m, itemsize=2)
    assert s.bytes == 64 * 2 and s.wire_bytes == pytest.approx(64 * 2 * 3 / 4)


# ------------------------------------------------------------------------------------ property test
def _random_layout(draw, mesh: Mesh, shape, partial_ok=True) -> Layout:
    atoms = [a.name for a in mesh.atoms]
    order = draw(st.permutations(atoms))
    dims = [[] for _ in shape]
    partial = []
    for a in order:
        choice = draw(st.integers(-2 if partial_ok else -1, len(shape) - 1))
        if choice == -2:
            partial.append(a)
        elif choice >= 0:
            dims[choice].append(a)
    lay = Layout(tuple(tuple(d) for d in dims), frozenset(partial))
    return lay if lay.divides(shape, mesh) else Layout.replicated(len(shape))


@st.composite
def cases(draw):
    mesh = Mesh.parse(draw(st.sampled_from(["2x2x1", "1x1x4", "2x1x2", "2x2x2", "1x2x4"])))
    shape = tuple(draw(st.sampled_from([4, 8])) for _ in range(draw(st.integers(1, 3))))
    return mesh, shape, _random_layout(draw, mesh, shape), _random_layout(draw, mesh, shape)


def _program(src: Layout, dst: Layout, shape, mesh: Mesh) -> fx.GraphModule:
    g = fx.Graph()
    x = g.placeholder("x")
    x.meta.update(val=torch.empty(shape), **{LAYOUT: src})
    out = g.output((x,))
    out.meta[IN_LAYOUTS] = {"outputs": [dst]}
    gm = fx.GraphModule(torch.nn.Module(), g)
    gm.meta[SIGNATURE] = Signature(params={}, inputs=["x"], in_spec=None, out_spec=None)
    gm.meta[STATE] = {}
    return insert_collectives(gm, mesh)


def _local_inputs(t: torch.Tensor, layout: Layout, mesh: Mesh) -> list[torch.Tensor]:
    """Per-rank pieces of `t` in `layout`; a partial is split into random addends that sum to t."""
    pieces = [shard_tensor(t, layout.without_partial(), mesh, r) for r in range(mesh.size)]
    if not layout.partial:
        return pieces
    atoms = mesh.mesh_order(layout.partial)
    g = torch.Generator().manual_seed(1)
    for group in mesh.groups(atoms):
        noise = [torch.randn(pieces[group[0]].shape, generator=g) for _ in group[1:]]
        pieces[group[0]] = pieces[group[0]] - sum(noise)
        for r, n in zip(group[1:], noise):
            pieces[r] = n
    return pieces


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_redistribution_executes_correctly(case):
    """Any src → dst: running the emitted steps on every rank yields each rank's piece of dst.

    Would catch: a wrong greedy choice, a chunk-order bug in all-gather / reduce-scatter / all-to-all
    lowering, a wrong group, a partial summed twice or dropped.
    """
    mesh, shape, src, dst = case
    t = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    gm = _program(src, dst, shape, mesh)
    programs = [emit(gm, mesh, r, group_name=sim_group_name) for r in range(mesh.size)]
    outs = run_lockstep(programs, [[p] for p in _local_inputs(t, src, mesh)], mesh)
    want = [shard_tensor(t, dst.without_partial(), mesh, r) for r in range(mesh.size)]
    if dst.partial:  # compare sums over the partial atoms' groups
        for group in mesh.groups(mesh.mesh_order(dst.partial)):
            total = sum(outs[r][0] for r in group)
            torch.testing.assert_close(total, want[group[0]], atol=1e-5, rtol=1e-5)
    else:
        for r in range(mesh.size):
            torch.testing.assert_close(outs[r][0], want[r], atol=1e-5, rtol=1e-5)
