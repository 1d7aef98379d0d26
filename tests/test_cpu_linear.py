"""A rank program's linears multiply with runtime/kernels.py's CPU kernel (passes/cpu_linear.py).

`kernels.linear` is oneDNN's inner product on float32 CPU tensors (products of at least
`kernels.ONEDNN_MIN_MACS` multiply-adds) and `F.linear` anywhere else. The tiny models' products are
below that threshold, so the tests that need oneDNN on them lower it (read at each call). Checked:
  * where oneDNN applies, it is the exact product (float64) to float32 rounding, as F.linear is: within
    the classical bound of a K-term float32 dot product in any summation order, K · 2⁻²⁴ · Σ|xᵢ·wᵢ| (+ the
    bias's rounding), elementwise; and F.linear meets the same bound (the test would notice a bound too
    tight for torch's own GEMM). A wrong product — a missing term, a transposed weight — is off by a whole
    term, |xᵢ·wᵢ| ≈ Σ|xᵢ·wᵢ| / K, which is above the bound for K ≤ 1024 (K² · 2⁻²⁴ < 1/16);
  * where it does not (a product below the threshold, bfloat16, a weight with an empty dim, autograd
    recording), the result is F.linear's, bit for bit, and gradients flow;
  * a rank program emitted with `cpu_kernels` has no `aten.linear` left, calls oneDNN when it runs (the
    profiler sees `mkldnn::_linear_pointwise`), and every rank's output is the unsharded model's within the
    same rounding as the program with `aten.linear` (atol = rtol = 1e-4, bench_layouts' check: two orders
    above the ~1e-6 the sharded float32 sums differ by).
"""

import pytest
import torch
import torch.nn.functional as F

import shardwise
from shardwise.models import build_model, example_inputs
from shardwise.runtime import kernels
from shardwise.runtime.simulate import sim_group_name

aten = torch.ops.aten
pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def _exact(x, w, b=None) -> tuple[torch.Tensor, torch.Tensor]:
    """x·wᵀ (+ b) in float64 and its float32 rounding bound: K · 2⁻²⁴ · Σ|xᵢ·wᵢ| (+ |b| · 2⁻²⁴)."""
    k = w.shape[1]
    y = F.linear(x.double(), w.double(), None if b is None else b.double())
    bound = k * 2.0**-24 * F.linear(x.double().abs(), w.double().abs())
    if b is not None:
        bound = bound + 2.0**-24 * b.double().abs()
    return y, bound + 1e-30


def _close(x, w, b=None) -> None:
    want, bound = _exact(x, w, b)
    got = kernels.linear(x, w, b)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert ((got.double() - want).abs() <= bound).all(), ((got.double() - want).abs() / bound).max()
    assert ((F.linear(x, w, b).double() - want).abs() <= bound).all()


@pytest.mark.parametrize("x_shape,bias", [((7, 64), False), ((3, 5, 64), True), ((64,), True), ((0, 64), False)])
def test_onednn_linear_agrees_with_f_linear(monkeypatch, x_shape, bias):
    monkeypatch.setattr(kernels, "ONEDNN_MIN_MACS", 0)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(*x_shape, generator=g), torch.randn(48, 64, generator=g)
    b = torch.randn(48, generator=g) if bias else None
    assert kernels.onednn_applies(x, w)
    _close(x, w, b)
    # a transposed (non-contiguous) input, as a program's permuted activations are
    _close(torch.randn(64, 9, generator=g).t(), w)
    # large K: the blocked sums of a program's projection
    _close(torch.randn(32, 1024, generator=g), torch.randn(96, 1024, generator=g))
    # a wrong product is outside the bound: one term of the sum dropped
    x, w = torch.randn(4, 1024, generator=g), torch.randn(8, 1024, generator=g)
    want, bound = _exact(x, w)
    dropped = kernels.linear(x[:, 1:], w[:, 1:]).double()
    assert ((dropped - want).abs() > bound).any()


def test_elsewhere_it_is_f_linear_bit_for_bit(monkeypatch):
    g = torch.Generator().manual_seed(1)
    small, w_small = torch.randn(8, 256, generator=g), torch.randn(1024, 256, generator=g)  # 2²¹ multiply-adds
    assert not kernels.onednn_applies(small, w_small)
    assert torch.equal(kernels.linear(small, w_small), F.linear(small, w_small))
    big, w_big = torch.randn(8, 1024, generator=g), torch.randn(1024, 1024, generator=g)  # 2²³: at the threshold
    assert kernels.onednn_applies(big, w_big)
    # a weight that is a slice of another's columns (a looped collective matmul's partial weight): oneDNN took
    # ~750× F.linear's time on it here, so F.linear multiplies it, bit for bit
    sliced = w_big[:, :256]
    x_part = torch.randn(4, 8, 256, generator=g)
    assert x_part.numel() * sliced.shape[0] >= kernels.ONEDNN_MIN_MACS and not sliced.is_contiguous()
    assert not kernels.onednn_applies(x_part, sliced)
    assert torch.equal(kernels.linear(x_part, sliced), F.linear(x_part, sliced))
    assert kernels.onednn_applies(x_part, sliced.contiguous())
    monkeypatch.setattr(kernels, "ONEDNN_MIN_MACS", 0)
    x, w = torch.randn(4, 32, generator=g), torch.randn(8, 32, generator=g)
    xb, wb = x.bfloat16(), w.bfloat16()
    assert not kernels.onednn_applies(xb, wb)
    assert torch.equal(kernels.linear(xb, wb), F.linear(xb, wb))
    empty_k = torch.randn(8, 0)
    assert not kernels.onednn_applies(torch.randn(4, 0), empty_k)
    assert torch.equal(kernels.linear(torch.randn(4, 0), empty_k), torch.zeros(4, 8))
    # a float64 bias with float32 tensors is F.linear's business (it refuses, as aten.linear does)
    with pytest.raises(RuntimeError):
        kernels.linear(x, w, torch.zeros(8, dtype=torch.float64))
    xg = x.clone().requires_grad_()
    assert not kernels.onednn_applies(xg, w)
    y = kernels.linear(xg, w)
    assert torch.equal(y, F.linear(x, w))
    y.sum().backward()
    assert torch.allclose(xg.grad, w.sum(0).expand(4, 32))


def test_rank_programs_call_onednn_and_compute_the_model(monkeypatch):
    monkeypatch.setattr(kernels, "ONEDNN_MIN_MACS", 0)
    model = build_model("llama-tiny")
    args, kwargs = example_inputs(model, 4, 16)
    with torch.no_grad():
        want = model(*args, **kwargs).logits
    plan = shardwise.plan(model, args, kwargs, mesh="1x2x2", layouts="ffn=ws1d_ar,attn=heads")
    fast = plan.program.emit(0, group_name=sim_group_name).program
    plain = plan.program.emit(0, group_name=sim_group_name, cpu_kernels=False).program
    n_plain = sum(1 for n in plain.graph.nodes if n.target is aten.linear.default)
    assert n_plain >= 4 * 2 + 1  # every projection of both blocks and the head
    assert not [n for n in fast.graph.nodes if n.target is aten.linear.default]
    assert sum(1 for n in fast.graph.nodes if n.target is kernels.linear) == n_plain

    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            got = plan.program.simulate(args, kwargs).logits  # every rank, cpu_kernels on (the default)
        plain_out = plan.program.simulate(
            args, kwargs, programs=[plan.program.emit(r, group_name=sim_group_name, cpu_kernels=False).program
                                    for r in range(plan.mesh.size)]).logits
    assert "mkldnn::_linear_pointwise" in {e.key for e in prof.key_averages()}
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert torch.allclose(plain_out, want, atol=1e-4, rtol=1e-4)


def test_emit_refuses_a_flag_that_is_not_a_bool():
    """A wrong value for emit's switches is refused, naming it, before anything is emitted (a truthy string
    would otherwise silently switch the kernel on)."""
    from shardwise.errors import InputError

    model = build_model("llama-tiny")
    args, kwargs = example_inputs(model, 2, 8)
    plan = shardwise.plan(model, args, kwargs, mesh="1x1x2", layouts="ffn=ws1d,attn=heads")
    for kw, named in (({"cpu_kernels": "no"}, "cpu_kernels='no'"), ({"cpu_kernels": None}, "cpu_kernels=None"),
                      ({"schedule": "x"}, "schedule='x'"), ({"collective_matmul": 3}, "collective_matmul=3")):
        with pytest.raises(InputError, match=named):
            plan.emit(0, group_name=sim_group_name, **kw)
    assert plan.emit(0, group_name=sim_group_name, schedule=None, cpu_kernels=False) is not None

