"""Unit tests of the mesh (atoms, ranks, groups) and of layouts (notation, checks, DTensor interop)."""

import pytest

from shardwise import Layout, Mesh, MeshError
from shardwise.errors import LayoutError
from shardwise.runtime.placements import from_placements, to_placements


@pytest.mark.parametrize("text, shape", [("2x2x1", (2, 2, 1)), ("1x1x4", (1, 1, 4)), ("4x4", (4, 4, 1)), ("8", (8, 1, 1))])
def test_parse(text, shape):
    """Catches a parser that drops or reorders axes."""
    assert Mesh.parse(text).shape == shape


@pytest.mark.parametrize("text", ["3x", "0x2x2", "2x2x2x2", "x4", "", "2*2", "-1x2"])
def test_parse_rejects_malformed(text):
    """A malformed mesh string must fail with a message naming the expected form, not a ValueError deep inside."""
    with pytest.raises(MeshError, match="XxYxZ|size 0"):
        Mesh.parse(text)


def test_atoms_factor_axes():
    """Axes split into prime atoms (z = 4 → z0·z1), so heads can use part of an axis."""
    m = Mesh.parse("2x1x4")
    assert [(a.name, a.size) for a in m.atoms] == [("x", 2), ("z0", 2), ("z1", 2)]
    assert m.atoms_of("z") == ("z0", "z1") and m.format_atoms(("x", "z0", "z1")) == "xz"
    assert m.format_atoms(("z0",)) == "{z0}"


def test_rank_coords_and_groups():
    """Ranks are row-major over (x, y, z); a group lists ranks by their index over its atoms."""
    m = Mesh.parse("2x2x2")
    assert m.coords(5) == {"x": 1, "y": 0, "z": 1}
    assert [m.rank_of(m.coords(r)) for r in range(8)] == list(range(8))
    assert m.group(("y", "z"), 4) == [4, 5, 6, 7]
    assert m.group(("z", "y"), 4) == [4, 6, 5, 7]  # chunk order z-major
    assert sorted(map(sorted, m.groups(("x",)))) == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_notation():
    """Layouts print in the paper's notation, with whole axes merged and partial sums as {Σ..}."""
    m = Mesh.parse("4x4x4")
    x, yz = m.atoms_of("x"), m.atoms_of("yz")
    assert Layout(((), (), x + yz)).notation(m, "BLE") == "BLE_xyz"
    assert Layout(((), (), yz), frozenset(x)).notation(m, "BLF") == "BLF_yz {Σx}"
    assert Layout((x, (), yz)).notation(m, "BLE") == "B_x LE_yz"


def test_invalid_layouts_rejected():
    """An atom may shard one dim only, and never be sharded and partial at once."""
    with pytest.raises(LayoutError):
        Layout((("x",), ("x",)))
    with pytest.raises(LayoutError):
        Layout((("x",),), frozenset({"x"}))


def test_equal_layouts_are_one_object():
    """Layouts are interned: equal ones are the same object (made from lists and sets too, pickled or copied,
    or by threads at once), so identity is equality; one no one holds is forgotten, and made again."""
    import copy
    import gc
    import pickle
    import threading

    from shardwise.ir import layout as module

    a = Layout(((), ("x", "y")), frozenset({"z"}))
    assert Layout([(), ["x", "y"]], {"z"}) is a and pickle.loads(pickle.dumps(a)) is a and copy.deepcopy(a) is a
    assert a.with_dim(1, ("x", "y")) is a and a.without_partial() is Layout(((), ("x", "y")))
    assert a != Layout(((), ("y", "x")), frozenset({"z"}))
    assert hash(a) == hash(Layout(((), ("x", "y")), frozenset({"z"})))
    made: list[Layout] = []
    threads = [threading.Thread(target=lambda: made.extend(Layout(((f"t{i % 7}",), ())) for i in range(500)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(x) for x in made}) == 7
    key = (((), ("w",)), frozenset())
    Layout(*key)
    gc.collect()
    assert key not in module._INTERNED
    assert Layout(*key).dims == ((), ("w",))


def test_check_names_the_dim():
    """A dim a layout cannot split gives a message with sizes, not a crash inside torch."""
    m = Mesh.parse("1x1x8")
    with pytest.raises(LayoutError, match="dim 1 of size 12 cannot be split 8 ways"):
        Layout(((), m.atoms_of("z"))).check((4, 12), m)


def test_dtensor_placements_round_trip():
    """Layout ↔ DTensor placements (one mesh dim per atom) keeps shards and partials."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    m = Mesh.parse("2x2x1")
    lay = Layout(((), ("y",)), frozenset({"x"}))
    pl = to_placements(lay, m)
    assert pl == (Partial(), Shard(1))
    assert from_placements(pl, m, 2) == lay
    assert from_placements((Replicate(), Replicate()), m, 3) == Layout.replicated(3)


def test_layout_hash_is_remembered_but_never_pickled():
    """Layout keeps its hash after the first use (the planner hashes layouts hundreds of thousands of times);
    a pickle holds only the fields, since a string's hash differs between processes."""
    import pickle
    import subprocess
    import sys

    a = Layout(((), ("x", "y")), frozenset({"z"}))
    assert hash(a) == hash(Layout(((), ("x", "y")), frozenset({"z"}))) and a.used == frozenset({"x", "y"})
    b = pickle.loads(pickle.dumps(a))
    assert b == a and "_hash" not in b.__dict__ and a.__reduce__() == (Layout, (a.dims, a.partial))
    code = ("import pickle, sys; from shardwise import Layout; b = pickle.loads(sys.stdin.buffer.read()); "
            "assert hash(b) == hash(Layout(b.dims, b.partial)); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(a), capture_output=True, check=True)
    assert out.stdout.strip() == b"ok"
    assert a.without_partial() == Layout(((), ("x", "y"))) and a.with_partial(["w"]).partial == frozenset({"w"})
    assert Layout(((), ("x",))).with_dim(0, ("y",)) == Layout((("y",), ("x",)))


def test_atoms_of_remembered_per_mesh():
    m = Mesh.parse("2x4x2")
    assert m.atoms_of("yz") == m.atoms_of(["y", "z"]) == ("y0", "y1", "z")
    with pytest.raises(MeshError):
        m.atoms_of("w")
