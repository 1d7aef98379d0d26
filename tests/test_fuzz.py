"""Differential fuzzing: a sharded program equals the unsharded model, or says clearly why it cannot.

Every case draws a small decoder (the reference decoder with random shapes, or a tiny Hugging Face
model), a mesh, a layout request and a run-time call, then

    plan = shardwise.plan(model, args, kwargs, mesh=..., layouts=...)
    got  = shardwise.simulate(plan, args2, kwargs2)      vs     want = model(*args2, **kwargs2)

and allows exactly two outcomes:

- the numbers agree within the tolerance of the dtype (below), with the same shape and dtype; or
- shardwise raises a `ShardwiseError` (or a subclass), from `plan` or from `simulate`.

When the unsharded model itself raises, the sharded program must raise too: a `ShardwiseError`, or an
exception of the unsharded model's own type (ids ≥ vocab: an `IndexError`; `errors.TokenIdError` is
both). Anything else fails the case: another exception (an internal traceback), a number that differs,
an input the unsharded model rejects but the sharded one accepts, or a case running past `CASE_LIMIT_S`
(a hang; checked with SIGALRM).

Tolerances
----------
float32: atol 1e-5. Sharding only reorders sums: a contraction split over ≤ 8 ranks is added up as
≤ 8 partial sums instead of one, which moves each result by a few float32 ulps (2^-24 relative); on
logits of magnitude ~1 after ≤ 2 blocks that is ~1e-6 (measured: ≤ 6e-7), so 1e-5 leaves a 10× margin
while any real layout bug (a missing reduction, a wrong slice) is off by O(0.1–1).

bfloat16: atol = 8 · 2^-8 · max(1, max |want|). bfloat16 keeps 8 significant bits, so every rounding
moves a value by up to u = 2^-8 of its magnitude. A sharded contraction rounds each rank's partial sum
to bfloat16 before the collective adds them, and the sum is rounded again: about 2 roundings per
sharded reduction that the unsharded model does not make. A drawn model has at most 2 blocks with 2
sharded reductions each (attention output projection, FFN down projection) plus the head: ≤ 5
reductions, so ≤ ~10 u if every extra rounding pushed the same way; they mostly cancel, and the norms
rescale rather than amplify relative errors. Measured over 108 planned bf16 draws of these strategies:
median 1.2 u, maximum 3.0 u of the logits' magnitude (1.0–1.5 u on llama-tiny and gpt2-tiny). 8 u
(0.031 for logits of magnitude ≤ 1) leaves a 2.5× margin over that and stays far below a real layout
bug (O(0.1–1); `test_bf16_tolerance_sees_a_lost_shard`).

Budget
------
Each test runs a fixed, derandomized number of examples: 40 + 30 + 12 (about 35 s for the file on 2
shared cores when every case passes; a failing case adds hypothesis's shrinking, a minute or two). Set
SHARDWISE_FUZZ_EXAMPLES=500 to run more, e.g. before a release (300 each: about 15 minutes):

    SHARDWISE_FUZZ_EXAMPLES=500 python -m pytest tests/test_fuzz.py
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

import shardwise
from shardwise.models import RefConfig, RefDecoder, build_model, example_inputs

MESHES = ["1x1x2", "1x1x4", "2x2x1", "1x2x2", "2x1x2"]
LAYOUTS = [
    None,  # chosen by cost
    "ffn=ws2d,attn=batch",
    "ffn=wg_xyz",
    "ffn=ws1d,attn=heads,embed=vocab",
    "head=E",
    "ffn=ws1d_ar",
    "ffn=wg_x,attn=heads",
    "ffn=wg_xy,embed=E",
    "ffn=ws2d,attn=heads,head=vocab",
]
DTYPES = [torch.float32, torch.bfloat16]
CASE_LIMIT_S = 120  # one plan + a few simulated calls of a tiny model take ~1 s: far past that is a hang
BF16_ULPS = 8  # see the module docstring
EXAMPLES = int(os.environ.get("SHARDWISE_FUZZ_EXAMPLES", "0"))


def _settings(default: int):
    """A fixed, derandomized number of examples (SHARDWISE_FUZZ_EXAMPLES overrides), no deadline. A failure
    is shrunk to a minimal case, but not "explained": the explain phase reruns a failing case under
    coverage tracing about a hundred times (minutes for cases that plan a model)."""
    return settings(max_examples=EXAMPLES or default, derandomize=True, deadline=None, database=None,
                    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ------------------------------------------------------------------------------------------ models
@st.composite
def ref_configs(draw) -> RefConfig:
    """A small reference decoder: MHA / GQA / MQA, serial or parallel blocks, widths and vocab that do and
    do not divide the mesh sizes (2 and 4)."""
    n_heads = draw(st.sampled_from([4, 2, 8, 1, 3, 6]))
    n_kv_heads = draw(st.sampled_from(sorted({n_heads, 1} | {k for k in (2, 3) if n_heads % k == 0})))
    head_dim = draw(st.sampled_from([8, 4]))
    d_model = draw(st.sampled_from([n_heads * head_dim, 32, 24, 30]))
    return RefConfig(
        vocab=draw(st.sampled_from([64, 100, 50, 101, 96])),
        d_model=d_model,
        d_ff=draw(st.sampled_from([64, 96, 100, 102, 36])),
        n_layers=draw(st.sampled_from([1, 2])),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        parallel=draw(st.booleans()),
        activation=draw(st.sampled_from(["gelu", "swiglu"])),
        norm=draw(st.sampled_from(["layernorm", "rmsnorm"])),
        tie_embeddings=draw(st.booleans()),
    )


@lru_cache(maxsize=64)
def ref_model(cfg: RefConfig, dtype: torch.dtype) -> RefDecoder:
    """The seeded reference decoder of `cfg` in `dtype` (cached: the same object for the same draw)."""
    torch.manual_seed(0)
    return RefDecoder(cfg).to(dtype).eval()


@lru_cache(maxsize=8)
def hf_model(name: str, dtype: torch.dtype) -> torch.nn.Module:
    """A tiny Hugging Face preset (llama-tiny: GQA, RMSNorm, SwiGLU; gpt2-tiny: fused QKV, biases, tied)."""
    return build_model(name).to(dtype).eval()


def vocab_of(model: torch.nn.Module) -> int:
    return model.cfg.vocab if isinstance(model, RefDecoder) else model.config.vocab_size


# ------------------------------------------------------------------------------------------ checking
class Hang(AssertionError):
    """A case ran past CASE_LIMIT_S."""


@contextmanager
def time_limit(seconds: int, what: str):
    """Fail with Hang when the body runs longer than `seconds` (SIGALRM: pytest runs tests in the main thread)."""

    if threading.current_thread() is not threading.main_thread():  # signals reach only the main thread
        yield
        return

    def on_alarm(signum, frame):
        raise Hang(f"{what}: still running after {seconds} s (a hang)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a model's output: the tensor itself (reference decoder) or `.logits` (HF outputs)."""
    return out.logits if hasattr(out, "logits") else out


def tolerance(want: torch.Tensor) -> float:
    """atol for comparing a sharded result with `want` (module docstring: float32 1e-5, bf16 8 ulps)."""
    if want.dtype == torch.bfloat16:
        return BF16_ULPS * 2.0**-8 * max(1.0, float(want.float().abs().max()))
    return 1e-5


@dataclass
class Case:
    """One differential case: plan with (args, kwargs), run with (args2, kwargs2)."""

    model: torch.nn.Module
    args: tuple
    kwargs: dict
    mesh: str
    layouts: str | None
    args2: tuple
    kwargs2: dict
    note: str = "same call"

    def describe(self) -> str:
        m = self.model
        name = repr(m.cfg) if isinstance(m, RefDecoder) else type(m).__name__
        dtype = next(m.parameters()).dtype

        def shapes(a):
            return [tuple(x.shape) if isinstance(x, torch.Tensor) else x for x in a]

        return (f"{name} {dtype} mesh={self.mesh} layouts={self.layouts!r} planned with {shapes(self.args)} "
                f"{sorted(self.kwargs)}; run: {self.note} {shapes(self.args2)} {sorted(self.kwargs2)}")


def check(case: Case) -> str:
    """Run `case`; return its outcome ("equal", "refused at plan", ...), also recorded as a hypothesis event
    (`pytest --hypothesis-show-statistics` counts them), or fail with what went wrong."""
    outcome = _outcome(case)
    event(f"{case.note}: {outcome}")
    return outcome


def _outcome(case: Case) -> str:
    with time_limit(CASE_LIMIT_S, case.describe()):
        try:
            plan = shardwise.plan(case.model, case.args, case.kwargs, mesh=case.mesh, layouts=case.layouts)
        except shardwise.ShardwiseError:
            return "refused at plan"
        except Exception as e:
            raise AssertionError(f"plan raised {type(e).__name__} (not a ShardwiseError): {e}\n"
                                 f"case: {case.describe()}") from e
        want_error = None
        with torch.no_grad():
            try:
                want = case.model(*case.args2, **case.kwargs2)
            except Exception as e:  # noqa: BLE001 - whatever the unsharded model raises, the sharded must too
                want_error = e
        try:
            got = shardwise.simulate(plan, case.args2, case.kwargs2)
        except shardwise.ShardwiseError:
            return "refused at run"
        except Exception as e:
            if want_error is not None and isinstance(e, type(want_error)):
                return f"raised {type(e).__name__} as the unsharded model does"
            also = f"; the unsharded model raised {type(want_error).__name__}" if want_error else ""
            raise AssertionError(f"simulate raised {type(e).__name__} (not a ShardwiseError{also}): {e}\n"
                                 f"case: {case.describe()}") from e
    if want_error is not None:
        raise AssertionError(f"the sharded program accepted an input the unsharded model rejects "
                             f"({type(want_error).__name__}: {want_error})\ncase: {case.describe()}")
    got, want = logits_of(got), logits_of(want)
    assert got.shape == want.shape and got.dtype == want.dtype, (
        f"output {tuple(got.shape)} {got.dtype}, unsharded {tuple(want.shape)} {want.dtype}\ncase: {case.describe()}")
    atol = tolerance(want)
    diff = float((got.float() - want.float()).abs().max()) if want.numel() else 0.0
    assert diff <= atol, f"max |sharded − unsharded| = {diff:.3g} > atol {atol:.3g}\ncase: {case.describe()}"
    return "equal"


def random_ids(vocab: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ the tests
@_settings(default=40)
@given(cfg=ref_configs(), dtype=st.sampled_from(DTYPES), mesh=st.sampled_from(MESHES),
       layouts=st.sampled_from(LAYOUTS), batch=st.integers(1, 4), seq=st.integers(1, 8))
def test_reference_decoder_same_call(cfg, dtype, mesh, layouts, batch, seq):
    """Random reference decoders × meshes × layouts, run with the call they were planned with."""
    model = ref_model(cfg, dtype)
    args = (random_ids(cfg.vocab, batch, seq, seed=batch * 10 + seq),)
    check(Case(model, args, {}, mesh, layouts, args, {}))


# run-time calls that differ from the planned one: (name, ids of the planned call, vocab) → ids
VARIANTS = {
    "another batch": lambda ids, v: random_ids(v, ids.shape[0] + 1, ids.shape[1], seed=1),
    "smaller batch": lambda ids, v: ids[:1],
    "another sequence length": lambda ids, v: random_ids(v, ids.shape[0], ids.shape[1] + 3, seed=2),
    "shorter sequence": lambda ids, v: ids[:, :1],
    "id = vocab": lambda ids, v: ids.clone().index_fill_(1, torch.tensor([0]), v),
    "id = vocab + 1000": lambda ids, v: torch.full_like(ids, v + 1000),
    "negative id": lambda ids, v: ids.clone().index_fill_(1, torch.tensor([0]), -1),
    "float ids": lambda ids, v: ids.float(),
    "1-D ids": lambda ids, v: ids[0],
    "int32 ids": lambda ids, v: ids.int(),
}


@_settings(default=30)
@given(cfg=ref_configs(), mesh=st.sampled_from(MESHES), layouts=st.sampled_from(LAYOUTS),
       variant=st.sampled_from(sorted(VARIANTS)), batch=st.integers(2, 4), seq=st.integers(2, 8))
def test_reference_decoder_other_calls(cfg, mesh, layouts, variant, batch, seq):
    """A plan called with another batch, another length, ids outside the vocabulary, float or 1-D ids:
    equal to the unsharded model, or a ShardwiseError (or the unsharded model's own exception)."""
    model = ref_model(cfg, torch.float32)
    ids = random_ids(cfg.vocab, batch, seq, seed=0)
    check(Case(model, (ids,), {}, mesh, layouts, (VARIANTS[variant](ids, cfg.vocab),), {}, note=variant))


def padding_mask(batch: int, seq: int) -> torch.Tensor:
    """An attention mask with left padding on the first sequence (HF convention: 1 = attend, 0 = padding)."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, : max(1, seq // 2)] = 0
    return mask


HF_CALLS = ["same call", "mask added at run time", "mask planned and run", "another batch", "id = vocab"]


@_settings(default=12)
@given(name=st.sampled_from(["llama-tiny", "gpt2-tiny"]), dtype=st.sampled_from(DTYPES),
       mesh=st.sampled_from(MESHES), layouts=st.sampled_from(LAYOUTS), call=st.sampled_from(HF_CALLS),
       batch=st.integers(2, 4), seq=st.integers(2, 8))
def test_hf_tiny_models(name, dtype, mesh, layouts, call, batch, seq):
    """llama-tiny and gpt2-tiny (their example inputs carry use_cache=False), with the planned call, an
    attention mask with padding (planned with it, or only passed at run time), another batch, an id ≥ vocab."""
    model = hf_model(name, dtype)
    args, kwargs = example_inputs(model, batch, seq)
    (ids,), vocab = args, vocab_of(model)
    masked = dict(kwargs, attention_mask=padding_mask(batch, seq))
    plan_kwargs, args2, kwargs2 = kwargs, args, kwargs
    if call == "mask added at run time":
        kwargs2 = masked
    elif call == "mask planned and run":
        plan_kwargs = kwargs2 = masked
    elif call == "another batch":
        args2 = (random_ids(vocab, batch + 1, seq, seed=1),)
    elif call == "id = vocab":
        args2 = (ids.clone().index_fill_(1, torch.tensor([0]), vocab),)
    check(Case(model, args, plan_kwargs, mesh, layouts, args2, kwargs2, note=call))


@pytest.mark.parametrize("name", ["ref-tiny-gqa", "ref-tiny-parallel"])
def test_bf16_tolerance_sees_a_lost_shard(name):
    """The bf16 tolerance is not vacuous: logits with one shard of four lost (zeros) are far outside it."""
    model = build_model(name).to(torch.bfloat16)
    args, _ = example_inputs(model, 2, 4)
    with torch.no_grad():
        want = model(*args)
        wrong = want.clone()
        wrong[..., : want.shape[-1] // 4] = 0  # a quarter of the vocab's logits lost, as a missing shard would
    assert float((wrong.float() - want.float()).abs().max()) > tolerance(want)
