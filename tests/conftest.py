"""Shared fixtures: seeded tiny models, and captures cached for the session.

Capturing a model (torch.export, canonicalize, find_layers) is most of what planning a tiny model
costs, and the suite plans the same few models with the same shapes hundreds of times (every layout ×
mesh × phase). `_cached_captures` keeps one capture per (module, call signature) and hands each plan a
copy (`copy_program`): the plan annotates and rewrites its copy exactly as it would a fresh capture.
Set SHARDWISE_TEST_FRESH_CAPTURES=1 to capture every time instead. Presets' prototypes also go through
the on-disk prototype cache, in a directory of this run (SHARDWISE_CACHE), so later plans of a preset
read the graph back as `shardwise inspect` does.
"""

import atexit
import os
import shutil
import tempfile

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
# the prototype cache (planning/prototype_cache.py) of this run, not the user's: emptied when it ends
if "SHARDWISE_CACHE" not in os.environ:
    os.environ["SHARDWISE_CACHE"] = tempfile.mkdtemp(prefix="shardwise-tests-")
    atexit.register(shutil.rmtree, os.environ["SHARDWISE_CACHE"], True)
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


def _call_key(module: torch.nn.Module, args: tuple, kwargs: dict):
    """What a capture depends on: the module's code and weights (by identity) and the call's structure:
    tensor shapes and dtypes, every other value as is."""
    from torch.utils._pytree import tree_flatten

    leaves, spec = tree_flatten((tuple(args), dict(kwargs or {})))
    call = tuple((tuple(x.shape), x.dtype, x.device.type) if isinstance(x, torch.Tensor) else ("value", repr(x))
                 for x in leaves)
    flags = tuple(sorted((k, repr(v)) for k, v in vars(module).items()
                         if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))))
    weights = tuple((k, id(t)) for k, t in module.state_dict(keep_vars=True).items())
    return type(module).__qualname__, flags, weights, str(spec), call


@pytest.fixture(scope="session", autouse=True)
def _cached_captures():
    if os.environ.get("SHARDWISE_TEST_FRESH_CAPTURES"):
        yield
        return
    from shardwise.passes.graph_utils import copy_program
    from shardwise.planning import planner

    original = planner.capture_program
    cache: dict = {}

    def capture_program(module, args, kwargs):
        key = _call_key(module, args, kwargs)
        if key not in cache:
            cache[key] = (module, original(module, args, kwargs))  # the module kept: its ids stay unique
        return copy_program(cache[key][1])

    planner.capture_program = capture_program
    yield
    planner.capture_program = original


# ------------------------------------------------------------------------------------ the coverage table
# tests/test_coverage.py records each architecture's verdict as a user property (it crosses from xdist's
# workers with the report); the table of every verdict is printed at the end of the run.
_COVERAGE: list[tuple] = []


def pytest_runtest_logreport(report):
    if report.when == "call":
        _COVERAGE.extend(value for name, value in report.user_properties if name == "coverage")


def pytest_terminal_summary(terminalreporter):
    if not _COVERAGE:
        return
    from shardwise.experiments.coverage import Result, Status, table

    results = sorted((Result(arch, Status(status), detail, seconds, replicated, model, flops)
                      for arch, status, detail, seconds, replicated, model, flops in _COVERAGE), key=lambda r: r.arch)
    terminalreporter.section("coverage of Hugging Face causal-LM architectures")
    for line in table(results).splitlines():
        terminalreporter.write_line(line)
