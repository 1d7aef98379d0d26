"""int8 weights: symmetric per-output-channel quantization of a rank's weight shard, and its matmul.

A weight W (global, [out, in] as nn.Linear stores it; Conv1D's [in, out] is transposed when quantized)
is stored on each rank as

    q = round(W_shard / s).clamp(-127, 127)  (int8, [out_local, in_local], contiguous)
    s = absmax(W[row, :]) / 127               (one scale per output row of the WHOLE weight, in the
                                               activation dtype; rows that are all zero get s = 1)

The scales are those of the global weight (absmax over the full input dim), so every rank's shard of a
row uses the same scale and the sharded program computes the same dequantized model (q · s) whatever
the layout: a row-parallel shard's partial sums add up to the dequantized row's product. A rank whose
shard holds only part of its rows' input dim reads the rest of those rows in pieces of its own shard's
size (`row_scales`): it never holds more than one shard-sized piece at once, nor any row it does not use.
A weight-gathered weight is gathered as int8 (its collectives move 1 byte per element); its rank holds
the scales of the rows it multiplies after the gather.

`int8_linear` multiplies with torch's CPU int8-weight kernel (`aten._weight_int8pack_mm`: a 2-D input
contiguous on its last dim, an int8 [N, K] contiguous weight, scales of the input's dtype) for bf16/fp16
activations; for float32 (whose kernel path is a slow reference loop) and other devices it converts the
int8 shard on the fly and scales the product (`linear(x, q.to(x.dtype)) * s`), with the kernel a float32
rank program multiplies with (runtime/kernels.py: oneDNN's, on the CPU, for large enough products).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .kernels import linear

QMAX = 127
QUANTIZED = ("int8",)  # the weight dtypes a rank program stores and multiplies as such

aten = torch.ops.aten
KERNEL_DTYPES = (torch.bfloat16, torch.float16)  # activations `_weight_int8pack_mm` runs fast on CPU
KERNEL_ROWS = 16  # ... for fewer rows than this (a GEMV per row: slower than converting beyond)


def check_quantize(quantize: str | None) -> str | None:
    """None, a float dtype name (nothing to quantize: "bf16", "fp32", "as captured") or "int8"."""
    if quantize is None or quantize in QUANTIZED:
        return quantize
    return None


def row_scales(read: Callable[[tuple[slice, ...]], torch.Tensor], shape: tuple[int, ...], out_dim: int,
               rows: slice, width: int, dtype: torch.dtype, height: int | None = None) -> torch.Tensor:
    """Scales of rows `rows` (along `out_dim`) of a 2-D weight of global `shape`: absmax over the whole
    input dim / 127, read through `read(index)` in pieces of at most `height` rows × `width` columns (a
    rank's own shard size: never more than that in memory at once)."""
    in_dim = 1 - out_dim
    height = height or rows.stop - rows.start
    parts = []
    for r in range(rows.start, rows.stop, height):
        amax = None
        for start in range(0, shape[in_dim], width):
            index = [slice(None), slice(None)]
            index[out_dim] = slice(r, min(r + height, rows.stop))
            index[in_dim] = slice(start, min(start + width, shape[in_dim]))
            piece = read(tuple(index)).detach().float().abs().amax(dim=in_dim)
            amax = piece if amax is None else torch.maximum(amax, piece)
        parts.append(amax)
    return scales_of(torch.cat(parts), dtype)


def scales_of(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    s = amax.float() / QMAX
    return torch.where(s > 0, s, torch.ones_like(s)).to(dtype)


def quantize_rows(w: torch.Tensor, scales: torch.Tensor, out_dim: int = 0) -> torch.Tensor:
    """int8 [out, in] (contiguous) of a shard whose output rows lie along `out_dim`, with their scales."""
    w = w.detach().float()
    if out_dim == 1:
        w = w.t()
    q = torch.round(w / scales.float()[:, None]).clamp_(-QMAX, QMAX)
    return q.to(torch.int8).contiguous()


def dequantize(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The float [out, in] weight a quantized one stands for (in float32 unless `dtype`)."""
    w = q.float() * scales.float()[:, None]
    return w if dtype is None else w.to(dtype)


def quantize_weight(w: torch.Tensor, out_dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole weight quantized: (int8 [out, in], scales [out]) — the reference the rank shards must match."""
    amax = w.detach().float().abs().amax(dim=1 - out_dim)
    s = scales_of(amax, w.dtype)
    return quantize_rows(w, s, out_dim), s


def dequantized_weight(w: torch.Tensor, out_dim: int = 0) -> torch.Tensor:
    """W replaced by q · s, in W's own layout and dtype: the float model an int8 program computes."""
    q, s = quantize_weight(w, out_dim)
    d = dequantize(q, s, w.dtype)
    return d.t().contiguous() if out_dim == 1 else d


def int8_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ (q · s)ᵀ (+ bias) for an int8 weight q [N, K] with per-row scales s [N].

    bf16/fp16 on CPU with fewer than KERNEL_ROWS rows (decode): torch's int8-weight kernel
    (`_weight_int8pack_mm`; on this machine, 1 thread, [1, 1024] × [4096, 1024]: 0.22 ms against 0.32 ms for
    a bf16 linear and 1.1 ms converting; its time grows with every row, so at ≥ 16 rows converting wins).
    Otherwise `linear(x, q.to(x.dtype)) · s`: the kernel's own order of operations, the int8 shard converted
    on the fly. The kernel's float32 path is a slow reference loop (13–26× a float32 linear here): unused."""
    lead, k = x.shape[:-1], x.shape[-1]
    if x.device.type == "cpu" and x.dtype in KERNEL_DTYPES and scales.dtype == x.dtype and x.numel() < KERNEL_ROWS * k:
        y = aten._weight_int8pack_mm(x.reshape(-1, k).contiguous(), q, scales).reshape(*lead, q.shape[0])
    else:
        y = linear(x, q.to(x.dtype)) * scales.to(x.dtype)
    return y if bias is None else y + bias


def int8_addmm(bias: torch.Tensor, x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, *,
               beta=1, alpha=1) -> torch.Tensor:
    """addmm(bias, x, W) with W [K, N] stored quantized as q [N, K] (GPT-2's Conv1D)."""
    y = int8_linear(x, q, scales)
    if alpha != 1:
        y = y * alpha
    return y + (bias if beta == 1 else bias * beta)


def int8_mm(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """mm(x, W) with W [K, N] stored quantized as q [N, K]."""
    return int8_linear(x, q, scales)
