"""The cost model against PAPER.md's analytic results, through the real passes.

  ratio_2d_1d(n)          2D/1D feed-forward communication at n chips, F = 4E (paper's accounting:
                          no (g−1)/g factor): 1.0, 0.5, 0.25 at n = 16, 64, 256
  figure3_crossovers()    E = 16384, F = 65536 on 4×4×4: the token counts where 2D WS gives way to
                          X-WG, X-WG to XY-WG, XY-WG to XYZ-WG (about 16K, 64K, 1M)
  table1()                PaLM 540B on 64 chips, 30% of HBM for the KV cache, bf16: the longest
                          context at batch 128 and 512 for multi-head (64 × 128), multiquery split by
                          heads and multiquery split by batch
Every volume comes from the collectives the passes insert for a feed-forward-only model on the meta
device; every KV size from the cache layouts the planner assigns.

    python -m shardwise.experiments.paper_checks
"""

from __future__ import annotations

import torch

from .. import api
from ..ir.hardware import get_hardware
from ..ir.mesh import Mesh
from ..models.reference import FFNStack
from ..planning.program import capture_program
from ..planning.search import evaluate
from ..strategies.cost import Precision
from ..strategies.family import NAMED

GiB = 1024**3


def ffn_volume(layout: str, mesh: str, *, E: int, F: int, batch: int, seq: int) -> float:
    """Elements per chip one feed-forward layer communicates under `layout` (paper's accounting).

    The layer measured is the middle of three, so its input arrives as the residual stream of the
    layer before (not as a program input) and its output feeds the layer after.
    """
    with torch.device("meta"):
        model = FFNStack(E, F, n_layers=3).to(torch.bfloat16)
        x = torch.empty(batch, seq, E, dtype=torch.bfloat16)
    plan = api.plan(model, (x,), mesh=mesh, layouts=f"ffn={layout}")
    row = plan.layer("blocks.1.mlp")
    return sum(c.bytes for c in row.collectives) / 2  # bf16: 2 bytes per element


def ratio_2d_1d(n: int, *, E: int = 1024) -> float:
    """2D over 1D volume with X = √(n·E/F) chips on E (the paper's best 2D split), F = 4E."""
    X = round((n * E / (4 * E)) ** 0.5)
    YZ = n // X
    Y = 2 ** ((YZ.bit_length() - 1) // 2)
    mesh = f"{X}x{Y}x{YZ // Y}"
    kw = dict(E=E, F=4 * E, batch=8, seq=16)
    return ffn_volume("ws2d", mesh, **kw) / ffn_volume("ws1d", mesh, **kw)


def figure3_crossovers(*, E: int = 16384, F: int = 65536) -> list[tuple[str, str, float]]:
    """(from, to, tokens) where each next layout becomes cheaper; volumes are linear in tokens."""
    order = ["ws2d", "wg_x", "wg_xy", "wg_xyz"]
    lines = {}
    for layout in order:  # volume(T) = a + b·T, from two token counts (batch 64 divides every role)
        v1 = ffn_volume(layout, "4x4x4", E=E, F=F, batch=64, seq=16)
        v2 = ffn_volume(layout, "4x4x4", E=E, F=F, batch=64, seq=32)
        b = (v2 - v1) / (64 * 16)
        lines[layout] = (v1 - b * 64 * 16, b)
    out = []
    for a, b in zip(order, order[1:]):
        (a0, a1), (b0, b1) = lines[a], lines[b]
        out.append((a, b, (b0 - a0) / (a1 - b1)))
    return out


def table1(batch: int, attention: str, *, multiquery: bool, budget: float = 0.3) -> int:
    """Longest context whose KV cache fits in `budget` of HBM per chip (PaLM 540B, 64 chips, bf16)."""
    from ..models import presets

    name = "palm-540b"
    cfg = dict(presets.get(name).config)
    if not multiquery:  # the paper's multi-head baseline: 64 heads of 128 (PaLM's serving head count)
        cfg.update(n_kv_heads=64, n_heads=64, head_dim=128)
    from ..models.reference import RefConfig, RefDecoder
    from ..models.steps import Step, phase_inputs

    n_layers = cfg["n_layers"]
    with torch.device("meta"):
        small = RefDecoder(RefConfig(**{**cfg, "n_layers": 1})).to(torch.bfloat16)
    context = 2048
    proto = capture_program(Step(small, last_only=True),
                                phase_inputs(small, "decode", batch=batch, seq=1, context=context), {})
    # heads-split caches use the 1D layout (heads over all 64 chips); batch-split ones split B over all
    cand = evaluate(proto, Mesh.parse("4x4x4"), NAMED["ws1d"], attention, hw=get_hardware("tpu-v4"),
                    precision=Precision(), n_blocks=n_layers, overlap=False, forced={})
    kv_per_chip = cand.memory["kv_cache"]  # the whole model's cache at `context` tokens, per chip
    return int(budget * 32 * GiB / (kv_per_chip / context))


TABLE1 = {  # PAPER.md: (batch, variant) → published context
    (128, "multihead"): 1320, (512, "multihead"): 330,
    (128, "multiquery by heads"): 660, (512, "multiquery by heads"): 165,
    (128, "multiquery by batch"): 43000, (512, "multiquery by batch"): 10700,
}


def table1_rows() -> list[tuple[int, str, int, int]]:
    variants = {"multihead": (False, "heads"), "multiquery by heads": (True, "heads"),
                "multiquery by batch": (True, "batch")}
    out = []
    for (batch, variant), published in TABLE1.items():
        mq, attn = variants[variant]
        out.append((batch, variant, table1(batch, attn, multiquery=mq), published))
    return out


if __name__ == "__main__":
    for n in (16, 64, 256):
        print(f"2D / 1D feed-forward communication at n = {n:3}: {ratio_2d_1d(n):.3f}")
    for a, b, t in figure3_crossovers():
        print(f"{a} → {b} at {t:,.0f} tokens")
    for batch, variant, ours, pub in table1_rows():
        print(f"Table 1: batch {batch:3}, {variant:20}: {ours:6,} tokens (published {pub:,}, ×{ours / pub:.3f})")
