"""The matmul kernel a CPU rank program multiplies its float32 weights with, and calibrate measures.

`linear(x, w, b)` is `torch.nn.functional.linear` computed by oneDNN's inner product
(`mkldnn._linear_pointwise`, the kernel Inductor's CPU backend emits for linears) wherever it applies:
a float32 input and weight on the CPU, a product of at least ONEDNN_MIN_MACS multiply-adds, oneDNN built
into torch, no autograd recording. Anywhere else it is `F.linear` itself (torch's MKL / OpenBLAS GEMM on
the CPU, cuBLAS on a GPU).

Why: on this machine, one thread, a program's projections run faster on oneDNN than on torch's own GEMM:
0.76–0.94× of its time over the benchmarks' shapes of at least 2^23 multiply-adds (`python -m
shardwise.benchmarks.bench_kernels`; [2048, 1024]·[1024, 2048] 79 ms against 90, a decode step's
[8, 1024]·[1024, 2048] 0.57 ms against 0.75). Below 2^23 it does not pay: each call costs about 20 µs more
than F.linear's 4 µs ([8, 64]·[64, 64]), a new shape about 0.8 ms to set up, and small K loses
([8, 256]·[256, 1024]: 1.46×). A weight that is not contiguous (a looped collective matmul's partial
weight, a slice of its columns) stays on F.linear too: oneDNN multiplied [32, 256]·[256, 1024] with such a
slice in 225 ms, against 0.3 ms for the same weight contiguous.
The weight stays a plain tensor in the model's own layout (not oneDNN's blocked one: an opaque tensor
has no storage, so it could not be copied, saved or counted): what a program holds, reads from a
checkpoint and reports is unchanged.

Numerics: the same float32 products summed in another order (oneDNN's blocking, not MKL's): results differ
by a few float32 ulps of the dot products, as any two GEMM libraries do (about 1e-4 absolute on
[2048, 1024] × [1024, 2048] products of standard normals, whose outputs are of order 32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_ONEDNN = torch.backends.mkldnn.is_available()
ONEDNN_MIN_MACS = 1 << 23  # the smallest product (M·K·N) multiplied with oneDNN (module doc); read at each call
_linear_pointwise = torch.ops.mkldnn._linear_pointwise.default if _ONEDNN else None


def onednn_applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `linear` multiplies `x` by `w` with oneDNN (else with F.linear)."""
    return (_ONEDNN and x.dtype is torch.float32 and w.dtype is torch.float32 and x.device.type == "cpu"
            and w.device.type == "cpu" and x.dim() >= 1 and w.dim() == 2 and w.numel() > 0 and w.is_contiguous()
            and x.numel() * w.shape[0] >= ONEDNN_MIN_MACS
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)))


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x · wᵀ (+ b), as `F.linear`: oneDNN's inner product where it applies (module doc), else F.linear."""
    if onednn_applies(x, w) and (b is None or (b.dtype is torch.float32 and b.device.type == "cpu")):
        return _linear_pointwise(x, w, b, "none", [], "")
    return F.linear(x, w, b)
