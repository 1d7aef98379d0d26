"""Bad input: each gets a ShardwiseError that says what was found, what was expected and what to do."""

import pytest
import torch
import torch.nn as nn

import shardwise
from shardwise import CaptureError, LayoutError, MeshError
from shardwise.runtime.distributed import free_port


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor's value: torch.export cannot capture it
            return self.lin(x)
        return x


class WithUnknownOp(nn.Module):
    """Two projections around an op no rule knows (flip): it must run replicated, and be reported."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)

    def forward(self, x):
        return self.down(torch.flip(self.up(x), dims=[-1]).relu())


def test_uncapturable_model_says_why_and_what_to_try():
    """A model export cannot capture: a CaptureError naming the model, the cause and a remedy."""
    with pytest.raises(CaptureError, match="could not capture DataDependent.*\n.*What to try"):
        shardwise.plan(DataDependent(), (torch.randn(2, 8),), mesh="1x1x2")


def test_op_without_rule_runs_replicated_and_is_reported():
    """Unknown op: replicated inputs, listed in the plan, and the numbers still equal the unsharded model."""
    torch.manual_seed(0)
    m = WithUnknownOp().eval()
    x = torch.randn(4, 16)
    plan = shardwise.plan(m, (x,), mesh="1x1x4")
    assert [u.target for u in plan.unknown_ops] == ["aten.flip.default"]
    assert "aten.flip.default" in plan.summary()
    with torch.no_grad():
        torch.testing.assert_close(shardwise.simulate(plan, (x,)), m(x), atol=1e-5, rtol=0)


def test_mesh_size_must_equal_world_size():
    """Emitting for real ranks with a mesh of 2 chips in a world of 1: a MeshError saying how to launch."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        plan = shardwise.plan(WithUnknownOp(), (torch.randn(4, 16),), mesh="1x1x2")
        with pytest.raises(MeshError, match="mesh 1x1x2 has 2 chips but torch.distributed has world size 1"):
            plan.emit(0)
    finally:
        dist.destroy_process_group()


def test_emit_without_distributed_is_a_clear_error():
    """No process group at all: say to launch with torchrun or simulate."""
    plan = shardwise.plan(WithUnknownOp(), (torch.randn(4, 16),), mesh="1x1x2")
    with pytest.raises(MeshError, match="torchrun"):
        plan.emit(0)


def test_nproc_must_match_mesh():
    with pytest.raises(MeshError, match="--nproc is 2"):
        shardwise.verify("ref-tiny", mesh="1x1x4", nproc=2)


@pytest.mark.parametrize("bad", ["ffn", "ffn=ws9d", "attn=rows", "mlp=ws1d"])
def test_malformed_layouts(bad):
    """--layouts entries must be KIND=LAYOUT with known names; the message lists what is allowed."""
    with pytest.raises(LayoutError, match="expected|unknown|use one of"):
        shardwise.plan("ref-tiny", mesh="1x1x2", layouts=bad)


def test_batch_not_divisible_by_batch_axes():
    """wg_xyz splits batch 4 over 8 chips: refused with the sizes, not a reshape error inside torch."""
    with pytest.raises((LayoutError, shardwise.PlanError), match="batch = 4 over xyz = 8"):
        shardwise.plan("ref-tiny", mesh="2x2x2", layouts="ffn=wg_xyz", batch=4)
