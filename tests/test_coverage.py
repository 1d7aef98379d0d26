"""Coverage of every causal-LM architecture of the installed transformers (experiments/coverage.py).

Every architecture of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` is built tiny with random weights and checked
on simulated ranks (meshes 1x1x4 and 2x2x1; layouts by cost and ffn=ws2d): prefill logits and 8 greedy
tokens equal to the unsharded model's, and every rank within 1/n of the weights plus the pieces the
plan names as replicated, those under 10% of the model. Each test checks one architecture again and
fails when it gives wrong numbers, crashes, or gets another verdict than the README's coverage table
records (the table is written by `python -m shardwise.experiments.coverage --readme README.md`, so it
cannot drift from what shardwise does). Each architecture is captured once per call shape, so it costs a
few seconds; `BUDGET_S` turns a runaway into a crash verdict, which fails. The run ends with the table of
every verdict (tests/conftest.py prints it).
"""

from pathlib import Path

import pytest

from shardwise.experiments import coverage
from shardwise.experiments.coverage import Result, Status

README = Path(__file__).resolve().parent.parent / "README.md"
ARCHS = coverage.architectures()
RECORDED = coverage.recorded(str(README))
BUDGET_S = 240  # per architecture: 2 meshes × 2 layouts, prefill and 8 tokens each (about 5 s alone)
REASONS = {  # what some refusals must say, one per way of being refused
    "mamba": "not a decoder-only attention transformer: block backbone.layers.0",
    "qwen3_next": "not a decoder-only attention transformer",
    "bart": "not a decoder-only model: the captured call reads none of",
}
GOAL = 0.90  # of the dense decoder-only attention architectures: fully sharded and correct
# replicated matmuls are what the verdicts measure (the table's columns), not a surprise to be warned of
pytestmark = pytest.mark.filterwarnings("ignore::shardwise.ir.plan.NotShardedWarning")


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    coverage._quiet()


@pytest.mark.parametrize("arch", ARCHS)
def test_architecture(arch, record_property):
    r = coverage.check(arch, timeout_s=BUDGET_S)
    record_property("coverage", (r.arch, r.status.value, r.detail, r.seconds, r.replicated, r.model, r.flops))
    assert r.status not in (Status.WRONG, Status.CRASH), f"{arch}: {r.status.value}: {r.detail}"
    assert arch in RECORDED, (f"{arch} is not in README.md's coverage table: regenerate it with python -m "
                              f"shardwise.experiments.coverage --readme README.md")
    assert r.status == RECORDED[arch], (f"{arch}: {r.status.value} ({r.detail}), but README.md records "
                                        f"{RECORDED[arch].value}: regenerate the table, or fix the regression")
    if r.status == Status.SHARDED:
        assert r.replicated is not None and r.replicated < coverage.MAX_REPLICATED
    if r.status == Status.EXPERTS:
        assert "experts run replicated" in r.detail
    if r.status == Status.REFUSED:
        assert len(r.detail) > 40, f"{arch}: a refusal must say why: {r.detail!r}"
    if arch in REASONS:
        assert REASONS[arch] in r.detail, r.detail


def test_the_sweep_lists_the_installed_mapping():
    assert len(ARCHS) > 50 and {"llama", "falcon", "gpt2", "mamba", "mixtral"} <= set(ARCHS)
    assert not set(RECORDED) - set(ARCHS), "the README's table lists architectures transformers no longer has"


def test_the_recorded_table_reaches_the_goal():
    """None wrong, none crashing; ≥ 90% of the dense decoder-only attention architectures (those neither refused
    nor mixtures of experts) fully sharded and correct — read from the table the tests above keep honest."""
    statuses = list(RECORDED.values())
    assert Status.WRONG not in statuses and Status.CRASH not in statuses
    sharded = statuses.count(Status.SHARDED)
    assert sharded / (sharded + statuses.count(Status.WRONG) + statuses.count(Status.CRASH)) >= GOAL
    assert statuses.count(Status.REFUSED) > 0  # (no mixture of experts runs replicated any more: EXPERTS may be 0)


def test_table_and_markdown_count_every_status(tmp_path):
    results = [Result("a", Status.SHARDED, "ws2d+heads", 1.0, 0.05), Result("b", Status.EXPERTS, "experts run "
               "replicated: layers.0.mlp", 2.0, 0.6), Result("c", Status.REFUSED, "not a | decoder", 0.5),
               Result("d", Status.CRASH, "KeyError", 0.1)]
    counts = coverage.counts(results)
    assert counts[Status.SHARDED] == counts[Status.EXPERTS] == counts[Status.REFUSED] == counts[Status.CRASH] == 1
    text = coverage.table(results)
    assert "4 architectures: 1 fully sharded and correct, 1 experts replicated, 1 refused, 0 wrong, 1 crash" in text
    assert "slowest: b 2 s" in text
    md = coverage.markdown(results)
    assert "| `c` | refused |  |  | not a \\| decoder |" in md and "**1** fully sharded and correct" in md
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{coverage.README_START}\nold\n{coverage.README_END}\n\nafter\n")
    coverage.write_readme(results, str(readme))
    assert coverage.recorded(str(readme)) == {"a": Status.SHARDED, "b": Status.EXPERTS, "c": Status.REFUSED,
                                              "d": Status.CRASH}
    assert "old" not in readme.read_text() and readme.read_text().endswith("after\n")
