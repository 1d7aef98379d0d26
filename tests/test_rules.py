"""Propagation rules in isolation: views, partial sums through pointwise ops, the registry."""

import pytest
import torch

from shardwise import Layout, Mesh
from shardwise.strategies.rules import register
from shardwise.strategies.rules.shape_rules import view_layout

M = Mesh.parse("2x2x2")


@pytest.mark.parametrize(
    "src, a, b, want_in, want_out",
    [
        # split (H·D) over heads: H takes the atoms
        ((((), (), ("x", "y"))), (2, 3, 32), (2, 3, 8, 4), ((), (), ("x", "y")), ((), (), ("x", "y"), ())),
        # two heads on four chips: heads take x, the head dim takes y
        ((((), (), ("x", "y"))), (2, 3, 16), (2, 3, 2, 8), ((), (), ("x", "y")), ((), (), ("x",), ("y",))),
        # merge (B, L) with B split: the merged dim keeps the split
        (((("x",), (), ())), (4, 3, 8), (12, 8), (("x",), (), ()), (("x",), ())),
        # merge (B, L) with L split: not a contiguous chunk → L is gathered first
        ((((), ("x",), ())), (4, 2, 8), (8, 8), ((), (), ()), ((), ())),
    ],
)
def test_view_layouts(src, a, b, want_in, want_out):
    """Splits and merges keep a split only when each rank's piece stays one contiguous chunk."""
    req, out = view_layout(Layout(src), a, b, M)
    assert req == Layout(want_in) and out == Layout(want_out)


def test_registry_refuses_duplicates():
    """Two rules for one op would silently shadow each other: registration must fail loudly."""
    with pytest.raises(KeyError, match="already registered"):
        register(torch.ops.aten.view.default)(lambda c: None)
