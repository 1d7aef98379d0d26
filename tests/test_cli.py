"""The command line, as a user runs it."""

import json
import subprocess
import sys

import pytest


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "shardwise", *args], capture_output=True, text=True, timeout=timeout)


def test_inspect_palm_540b_on_meta():
    """Issue 2 acceptance: PaLM 540B (118 layers) plans on the meta device, no weights, no process group."""
    p = run("inspect", "palm-540b", "--mesh", "4x4x4", "--batch", "512", "--seq", "2048", "--format", "json")
    assert p.returncode == 0, p.stderr[-2000:]
    plan = json.loads(p.stdout)
    assert plan["mesh"] == "4x4x4" and plan["batch"] == 512 and plan["seq"] == 2048
    assert sum(l["count"] for l in plan["layers"] if l["kind"] == "ffn") == 118  # planned once, counted ×118


def test_inspect_table_and_graph():
    p = run("inspect", "llama-tiny", "--mesh", "2x2x1", "--layouts", "ffn=ws2d,attn=batch", "--graph")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "ws2d" in p.stdout and "all-to-all" in p.stdout and "▶ all_gather" in p.stdout


def test_verify_simulated():
    p = run("verify", "gpt2-tiny", "--mesh", "1x1x4")
    assert p.returncode == 0 and p.stdout.startswith("OK"), p.stdout + p.stderr[-2000:]


def test_bad_mesh_exits_2_with_message():
    p = run("verify", "llama-tiny", "--mesh", "0x2x2")
    assert p.returncode == 2 and "size 0" in p.stderr and "Traceback" not in p.stderr


def test_demo_runs_real_ranks():
    """The README's main job: plan, 4 real gloo ranks reading their shards, numerics OK, bytes per rank."""
    p = run("demo", timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "OK, bound 1e-5" in p.stdout and "rank 3:" in p.stdout


@pytest.mark.parametrize("argv, said", [
    ("verify llama-tiny --mesh 1x1x2 --atol nan", "--atol: nan must be a finite number"),
    ("verify llama-tiny --mesh 1x1x2 --atol -1", "--atol: -1 must be a finite number"),
    ("verify llama-tiny --mesh 1x1x2 --batch -1", "--batch: -1 must be at least 1"),
    ("verify llama-tiny --mesh 1x1x2 --seq 0", "--seq: 0 must be at least 1"),
    ("generate llama-tiny --mesh 1x1x2 --tokens -1", "--tokens: -1 must be at least 1"),
    ("inspect llama-tiny --chips 0", "--chips: 0 must be at least 1"),
    ("verify llama-tiny --mesh 1x1x2 --nproc 2 --timeout inf", "--timeout: inf must be a finite number"),
    ("verify palm-8b --mesh 1x1x2", "palm-8b is a shapes-only preset"),
    ("verify llama-tiny --mesh 1x1x2 --layouts ffn", "malformed --layouts entry 'ffn'"),
])
def test_bad_numbers_and_names_exit_2_with_a_message(argv, said, capsys):
    from shardwise.cli import main

    try:
        code = main(argv.split())
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    assert code == 2
    assert said in capsys.readouterr().err
