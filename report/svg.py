"""Small inline SVG drawings for the HTML report: the mesh, time bars, candidates, memory.

Each function returns one `<svg>` element as text, with every label escaped; sizes are in CSS pixels.
No script and no external resource: the report stays one self-contained file.
"""

from __future__ import annotations

import math
from html import escape

from ..ir.collective import format_bytes
from ..ir.mesh import Mesh
from .views import PART_NAMES, PARTS, Explained

COLORS = {"compute": "#4e79a7", "memory": "#f28e2b", "comm": "#e15759",
          "weights": "#4e79a7", "replicated": "#9c755f", "kv_cache": "#59a14f", "free": "#e8e8e8"}
ROLE_COLORS = {"batch": "#59a14f", "E": "#4e79a7", "F": "#b07aa1", "": "#bab0ac"}


def _text(x: float, y: float, s: str, *, size: int = 11, anchor: str = "start", cls: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}"{c}>{escape(s)}</text>'


def mesh_svg(mesh: Mesh, roles: dict[str, str]) -> str:
    """The chips of an X×Y×Z mesh: one X×Y panel per z coordinate (rows x, columns y), panels side by
    side and wrapped eight to a row; each chip titled with its rank (ranks are row-major over x, y, z).
    The legend gives every axis its size and the role it plays in the plan's main run."""
    X, Y, Z = mesh.shape
    cell = max(5.0, min(16.0, 150.0 / max(X, Y)))
    gap, per_row = 14.0, min(Z, 8)
    pw, ph = Y * cell, X * cell
    rows = -(-Z // per_row)
    top, left = 22.0, 8.0
    width = max(left + per_row * (pw + gap) + 8, 3 * 200.0)
    height = top + rows * (ph + gap + 14) + 58
    out = [(f'<svg class="mesh" role="img" width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} '
           f'{height:.0f}" xmlns="http://www.w3.org/2000/svg">'),
           f'<title>mesh {mesh}: {mesh.size} chips</title>',
           _text(left, 14, f"mesh {mesh} = {mesh.size} chips (panels: z; rows: x; columns: y)", size=12)]
    for z in range(Z):
        ox = left + (z % per_row) * (pw + gap)
        oy = top + (z // per_row) * (ph + gap + 14)
        out.append(_text(ox, oy + 10, f"z={z}", size=10, cls="muted"))
        for x in range(X):
            for y in range(Y):
                rank = (x * Y + y) * Z + z
                out.append(f'<rect x="{ox + y * cell:.1f}" y="{oy + 14 + x * cell:.1f}" width="{cell - 1:.1f}" '
                           f'height="{cell - 1:.1f}" rx="1.5" fill="#dfe7f1" stroke="#8aa1bd" stroke-width="0.6">'
                           f'<title>rank {rank}: x={x} y={y} z={z}</title></rect>')
    ly = height - 40
    for i, (axis, size) in enumerate(zip("xyz", mesh.shape)):
        role = roles.get(axis, "")
        word = {"batch": "batch", "E": "E (d_model)", "F": "F (d_ff / heads)", "": "no role"}[role if size > 1 else ""]
        lx = left + i * 200
        out.append(f'<rect x="{lx:.1f}" y="{ly:.1f}" width="12" height="12" fill="{ROLE_COLORS[role if size > 1 else ""]}"/>')
        out.append(_text(lx + 17, ly + 10, f"{axis} = {size}: {word}", size=11))
    out.append(_text(left, ly + 30, "roles of the axes in the main run of blocks", size=10, cls="muted"))
    out.append("</svg>")
    return "".join(out)


def time_bars(parts: dict[str, float], scale: float, *, width: int = 180) -> str:
    """Three thin bars, compute / memory / communication, on a shared scale (seconds → `width` px at
    `scale`): the step time is the largest of the overlapping terms plus what cannot overlap, so the
    bars are drawn side by side rather than stacked."""
    h, gap = 5, 2
    out = [f'<svg class="bars" width="{width}" height="{3 * (h + gap)}" xmlns="http://www.w3.org/2000/svg">']
    for i, k in enumerate(PARTS):
        w = 0.0 if scale <= 0 else max(0.0, min(1.0, parts.get(k, 0.0) / scale)) * width
        out.append(f'<rect class="bar-{k}" x="0" y="{i * (h + gap)}" width="{w:.1f}" height="{h}" fill="{COLORS[k]}">'
                   f'<title>{PART_NAMES[k]}: {parts.get(k, 0.0) * 1e3:.4f} ms</title></rect>')
    out.append("</svg>")
    return "".join(out)


def candidates_svg(ex: Explained, *, rows: int, width: int = 640) -> str:
    """The first `rows` timed candidates (fastest first) as bars of their time per step, chosen in green,
    a tie in blue, losers grey, each labelled with why it lost. When the times drawn span more than a
    factor of 20 the bars are on a log scale (the axis says so)."""
    timed = [c for c in ex.candidates if not c.refused][:rows]
    if not timed:
        return ""
    row, label_w, value_w = 18, 150, 250
    lo, hi = min(c.ms for c in timed), max(c.ms for c in timed)
    log = hi > 20 * lo > 0
    bar_w = width - label_w - value_w

    def length(ms: float) -> float:
        frac = math.log(ms / lo * 2) / math.log(hi / lo * 2) if log else ms / (hi or 1.0)
        return max(1.0, frac * bar_w)

    out = [(f'<svg class="candidates" width="{width}" height="{len(timed) * row + 22}" '
           f'xmlns="http://www.w3.org/2000/svg">')]
    for i, c in enumerate(timed):
        y = i * row + 3
        color = "#59a14f" if c.chosen else "#76b7b2" if c.verdict == "tie" else "#bab0ac"
        w = length(c.ms)
        out.append(f'<g class="candidate">{_text(label_w - 6, y + 12, c.name, anchor="end", cls="mono")}'
                   f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{row - 5}" fill="{color}">'
                   f'<title>{escape(c.name)}: {c.ms:.3f} ms per step, {escape(c.verdict)}</title></rect>'
                   f'{_text(label_w + w + 5, y + 12, f"{c.ms:.3f} ms  {c.verdict}", size=10)}</g>')
    scale = "bar length: log of the time per step" if log else "bar length: time per step"
    out.append(_text(label_w, len(timed) * row + 16, scale, size=10, cls="muted"))
    out.append("</svg>")
    return "".join(out)


def memory_svg(parts: dict[str, float | None], *, width: int = 620) -> str:
    """Bytes per chip as one stacked bar against the chip's capacity (weights' share, weights replicated
    beyond it, KV cache, free), the capacity marked above it, a legend in bytes below."""
    capacity = parts["capacity"] or parts["total"] or 1.0
    full = max(capacity, parts["total"] or 0.0)
    bar_w, y = width - 10, 18
    out = [f'<svg class="memory" width="{width}" height="76" xmlns="http://www.w3.org/2000/svg">']
    x = 0.0
    for k in ("weights", "replicated", "kv_cache"):
        w = (parts[k] or 0.0) / full * bar_w
        out.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="20" fill="{COLORS[k]}">'
                   f'<title>{k}: {format_bytes(parts[k] or 0.0)}</title></rect>')
        x += w
    if parts["capacity"]:
        cx = capacity / full * bar_w
        out.append(f'<rect x="{x:.1f}" y="{y}" width="{max(0.0, cx - x):.1f}" height="20" '
                   f'fill="{COLORS["free"]}"><title>free</title></rect>')
        out.append(f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{y - 4}" y2="{y + 24}" stroke="#333" stroke-width="1.5"/>')
        out.append(_text(cx, y - 6, f"HBM {format_bytes(parts['capacity'])}", size=11, anchor="end"))
    names = {"weights": "weights (1/n share)", "replicated": "replicated weights", "kv_cache": "KV cache"}
    lx = 0.0
    for k, name in names.items():
        out.append(f'<rect x="{lx:.1f}" y="{y + 34}" width="10" height="10" fill="{COLORS[k]}"/>')
        label = f"{name} {format_bytes(parts[k] or 0.0)}"
        out.append(_text(lx + 14, y + 43, label, size=11))
        lx += 30 + 6.4 * len(label)
    out.append("</svg>")
    return "".join(out)
