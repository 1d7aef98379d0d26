"""The floors are a checked contract (pyproject.toml's import-linter contracts, ARCHITECTURE.md), and the
meta keys the passes share are declared once (ir/meta.py) and checked by the pipeline for every pass."""

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx

import shardwise
from shardwise.ir.meta import KEYS, LAYERS
from shardwise.passes.find_layers import find_layers
from shardwise.passes.pipeline import Pass, graph_pass, run_pipeline

ROOT = Path(shardwise.__file__).parent
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"]


def _lint(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(LINT + ["--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _package_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "shardwise"
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(".venv", ".git", "tests", "__pycache__", "*.egg-info"))
    return dst


def test_the_floors_hold():
    run = _lint(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


def test_a_backwards_import_fails_and_is_named(tmp_path):
    """A strategies/ module importing from passes/ (a floor above it) breaks the layers contract."""
    copy = _package_copy(tmp_path)
    family = copy / "strategies" / "family.py"
    family.write_text(family.read_text() + "\nfrom ..passes import capture  # a floor above\n")
    run = _lint(copy, pythonpath=tmp_path)
    assert run.returncode != 0, run.stdout
    assert "BROKEN" in run.stdout
    assert "shardwise.strategies.family -> shardwise.passes.capture" in run.stdout, run.stdout


def _package_sources():
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] not in (".venv", "tests") and "__pycache__" not in rel.parts:
            yield rel, path.read_text()


def test_every_meta_key_is_declared_once():
    """No module spells a meta key itself: every "sw_*" string lives in ir/meta.py, and names a key there."""
    for rel, text in _package_sources():
        literals = {n.value for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        keys = {s for s in literals if re.fullmatch(r"sw_[a-z_]+", s)}
        if rel == Path("ir/meta.py"):
            assert keys == set(KEYS)
        else:
            assert not keys, f"{rel} spells meta keys {sorted(keys)}: import them from shardwise.ir.meta"


def test_every_pass_runs_through_the_pipeline():
    """A function decorated as a pass is only ever called through the pipeline (Pass / run), never directly."""
    passes = set()
    for _, text in _package_sources():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef) and any(
                    isinstance(d, ast.Call) and getattr(d.func, "id", "") == "graph_pass" for d in node.decorator_list):
                passes.add(node.name)
    assert {"canonicalize", "find_layers", "assign_layouts", "propagate", "insert_collectives", "emit",
            "summarize"} <= passes
    for rel, text in _package_sources():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in passes:
                pytest.fail(f"{rel}:{node.lineno} calls the pass {node.func.id}() directly: use run_pipeline")


def test_the_pipeline_checks_what_a_pass_needs_and_makes():
    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(2)
    g.output(x)
    gm = fx.GraphModule(torch.nn.Module(), g)
    with pytest.raises(RuntimeError, match=r"pass find_layers needs gm.meta\['sw_signature'\]"):
        run_pipeline(gm, [Pass(find_layers)])

    @graph_pass(makes=(LAYERS,))
    def forgets(gm):
        return gm

    with pytest.raises(RuntimeError, match=r"pass forgets did not write gm.meta\['sw_layers'\]"):
        run_pipeline(gm, [Pass(forgets)])

    @graph_pass(makes=(LAYERS,))
    def wrong_type(gm):
        gm.meta[LAYERS] = {"layers": []}
        return gm

    with pytest.raises(RuntimeError, match=r"sw_layers'\] as shardwise.passes.find_layers.Layers \(found dict\)"):
        run_pipeline(gm, [Pass(wrong_type)])
    with pytest.raises(KeyError, match="not declared"):
        graph_pass(needs=("sw_nonsense",))(lambda gm: gm)
