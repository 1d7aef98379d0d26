"""Shared fixtures: seeded tiny models, kept per session (building HF models takes a moment)."""

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny():
    """build_model for tiny presets, cached: the same seeded weights for every test that asks."""
    from shardwise.models import build_model

    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = build_model(name)
        return cache[name]

    return get
