"""The torch.compile backend in one process (its real-rank runs are in test_real_ranks.py): backends are
made as often as wanted, and an error of the backend reaches the caller as a ShardwiseError."""

import pytest
import torch

import shardwise
from shardwise.models import example_inputs


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_backend_can_be_made_any_number_of_times(tiny, fresh_dynamo):
    """Each shardwise.backend(...) is a new, independent backend; without a process group, calling the
    compiled model raises shardwise's MeshError itself (planning happens at the call, not inside dynamo,
    which would wrap it in a BackendCompilerFailed)."""
    backends = [shardwise.backend(mesh="1x1x2"), shardwise.backend(mesh="1x1x2", layouts="ffn=ws1d"),
                shardwise.backend(mesh="2x1x1")]
    assert len({id(b) for b in backends}) == 3
    model = tiny("llama-tiny")
    args, kwargs = example_inputs(model, 2, 8)
    for be in backends:
        compiled = torch.compile(model, backend=be)
        with pytest.raises(shardwise.MeshError, match=r"torch.distributed is not initialized"):
            compiled(*args, **kwargs)
