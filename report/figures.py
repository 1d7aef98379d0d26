"""Figures from sweeps and the planner's candidates, drawn with matplotlib (each as PNG and SVG).

    cost_vs_latency(sweep, stem)      PAPER.md's Figure 1: cost per token against latency, the Pareto
                                      frontier of every model, prefill and decode side by side, each
                                      frontier point labelled with its chips, batch and layout
    layout_map(sweep, model, stem)    the layout chosen at every (tokens per step, chip count), with the
                                      Figure 3 crossovers of the feed-forward communication drawn
    breakdown(panels, stem)           compute / memory / communication of every layout at one point

Every function writes `stem.png` and `stem.svg` and returns their paths.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import ShardwiseError
from ..planning.candidate import Candidate, Choice
from .sweep import Sweep, SweepRow
from .views import PART_NAMES, PARTS

FAMILY_COLORS = {"2D WS": "#4e79a7", "1D WS": "#a0cbe8", "1D WS (all-reduce)": "#76b7b2", "WG-X": "#f28e2b",
                 "WG-XY": "#e15759", "WG-XYZ": "#b07aa1"}
PART_COLORS = {"compute": "#4e79a7", "memory": "#f28e2b", "comm": "#e15759"}
MODEL_MARKERS = ["o", "s", "^", "D", "v"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(fig, stem: str | Path) -> list[Path]:
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    fig.savefig(out[0], dpi=130, bbox_inches="tight")
    fig.savefig(out[1], bbox_inches="tight", metadata={"Date": None})  # no date: regenerating changes nothing
    _pyplot().close(fig)
    return out


def _require(rows: list[SweepRow], what: str) -> None:
    if not rows:
        raise ShardwiseError(f"{what}: the sweep has no planned point for it; expected at least one row with a "
                             f"plan: sweep that model and phase on more chips or smaller batches")


# ------------------------------------------------------------------------------------ Figure 1
def cost_vs_latency(sweep: Sweep, stem: str | Path, *, models: list[str] | None = None,
                    highlight: list[tuple[str, SweepRow]] = ()) -> list[Path]:
    """Cost (chip-ms per token) against latency per step, log-log, decode left and prefill right: every
    planned point faint, each model's Pareto frontier as a line whose points are labelled; `highlight`:
    (label, row) pairs drawn as stars (PAPER.md's Table 2 operating points)."""
    plt = _pyplot()
    models = models or list(dict.fromkeys(r.model for r in sweep.rows))
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.6))
    for ax, phase in zip(axes, ("decode", "prefill")):
        for i, model in enumerate(models):
            pts = [r for r in sweep.select(model=model, phase=phase) if r.ok]
            if not pts:
                continue
            color = f"C{i}"
            ax.scatter([r.latency_ms for r in pts], [r.cost_chip_ms_per_token for r in pts], s=9, color=color,
                       alpha=0.18, linewidths=0)
            front = sweep.frontier(model, phase)
            ax.plot([r.latency_ms for r in front], [r.cost_chip_ms_per_token for r in front],
                    marker=MODEL_MARKERS[i % len(MODEL_MARKERS)], ms=5, lw=1.4, color=color, label=model)
            for r in _spaced(front):
                ax.annotate(f"C{r.chips_used} B{r.batch}\n{r.ffn}+{r.attention}", (r.latency_ms, r.cost_chip_ms_per_token),
                            textcoords="offset points", xytext=(4, 3), fontsize=5.5, color=color)
        for label, r in highlight:
            if r.phase == phase and r.ok:
                ax.scatter([r.latency_ms], [r.cost_chip_ms_per_token], marker="*", s=140, color="black", zorder=5)
                ax.annotate(label, (r.latency_ms, r.cost_chip_ms_per_token), textcoords="offset points",
                            xytext=(-6, -16), fontsize=7, ha="right", weight="bold")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.25)
        ax.set_ylabel("cost: chip-milliseconds per token")
        ax.set_xlabel("latency per generated token (ms)" if phase == "decode" else
                      "latency of the prefill step (ms), 2048 tokens per sequence")
        ax.set_title(f"{phase}: cost vs latency, Pareto frontier (C chips, B batch)")
        ax.legend(loc="upper right", fontsize=8)
    fig.suptitle("PaLM on TPU v4 (predicted by shardwise): PAPER.md's Figure 1; stars are Table 2's operating points",
                 fontsize=11)
    return _save(fig, stem)


def _spaced(front: list[SweepRow], *, gap: float = 0.12) -> list[SweepRow]:
    """The frontier points to label: each at least `gap` decades (log10) from the last one labelled, on
    one axis or the other, so labels along a flat stretch of the frontier do not overprint."""
    out: list[SweepRow] = []
    for r in front:
        if not out or max(abs(math.log10(r.latency_ms / out[-1].latency_ms)),
                          abs(math.log10(r.cost_chip_ms_per_token / out[-1].cost_chip_ms_per_token))) >= gap:
            out.append(r)
    return out


# ------------------------------------------------------------------------------------ layout map
def layout_map(sweep: Sweep, model: str, stem: str | Path, *, weights: str = "int8",
               phases: tuple[str, ...] = ("decode", "prefill"), crossovers: list[tuple[str, str, float]] = (),
               crossover_chips: int = 64) -> list[Path]:
    """For each phase, a grid of tokens per step (columns) × chips (rows) at one weight precision and the
    objective of latency, each cell coloured by the
    feed-forward layout of the main run of blocks and labelled with its attention split. `crossovers`
    ((from, to, tokens), from experiments.paper_checks.figure3_crossovers) are drawn as vertical lines
    on the prefill panel, at the row of `crossover_chips` chips they were computed for."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(1, len(phases), figsize=(7.5 * len(phases), 4.8), squeeze=False)
    seen: set[str] = set()
    for ax, phase in zip(axes[0], phases):
        rows = sweep.select(model=model, phase=phase, weights=weights, objective="latency")
        _require([r for r in rows if r.ok], f"layout map of {model} {phase} with {weights} weights")
        tokens = sorted({r.batch * r.seq for r in rows})
        chips = sorted({r.chips for r in rows})
        for r in rows:
            x, y = tokens.index(r.batch * r.seq), chips.index(r.chips)
            color = FAMILY_COLORS.get(r.ffn, "#dddddd") if r.ok else "#f4f4f4"
            ax.add_patch(plt.Rectangle((x - 0.5, y - 0.5), 1, 1, color=color, ec="white", lw=1.5))
            text = r.attention.replace("heads+batch", "h+b") if r.ok else "no fit"
            ax.text(x, y, text, ha="center", va="center", fontsize=6.5, color="black" if r.ok else "#999999")
            if r.ok:
                seen.add(r.ffn)
        ax.set_xlim(-0.5, len(tokens) - 0.5)
        ax.set_ylim(-0.5, len(chips) - 0.5)
        ax.set_xticks(range(len(tokens)), [_tokens(t) for t in tokens], rotation=45, fontsize=8)
        ax.set_yticks(range(len(chips)), [str(c) for c in chips])
        ax.set_xlabel("tokens per step (batch × tokens per sequence)")
        ax.set_ylabel("chips")
        ax.set_title(f"{model} {phase}, {weights} weights: the layout chosen")
        if phase == "prefill" and crossovers and crossover_chips in chips:
            y = chips.index(crossover_chips)
            for a, b, t in crossovers:
                x = _position(t, tokens)
                if x is not None:
                    ax.plot([x, x], [y - 0.5, y + 0.5], color="black", lw=2.2, ls="--")
                    ax.annotate(f"Fig. 3: {a}→{b}\n{_tokens(t)}", (x, y + 0.5), textcoords="offset points",
                                xytext=(2, 4), fontsize=6.5, rotation=0)
    handles = [Patch(color=FAMILY_COLORS[f], label=f) for f in FAMILY_COLORS if f in seen]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, bbox_to_anchor=(0.5, -0.06))
    fig.suptitle("Feed-forward layout (colour) and attention split (text) of the main run of blocks; dashed: "
                 "PAPER.md's Figure 3 crossovers (feed-forward communication only)", fontsize=9.5)
    return _save(fig, stem)


def _tokens(t: float) -> str:
    return f"{t / 2**20:g}M" if t >= 2**20 else f"{t / 2**10:g}K" if t >= 2**10 else f"{t:g}"


def _position(t: float, ticks: list[int]) -> float | None:
    """Where `t` falls on a row of log-spaced ticks drawn at 0, 1, 2, ... (None outside them)."""
    for i, (a, b) in enumerate(itertools.pairwise(ticks)):
        if a <= t <= b:
            return i + math.log(t / a) / math.log(b / a)
    return None


# ------------------------------------------------------------------------------------ breakdown
@dataclass(frozen=True)
class LayoutTime:
    """One candidate at one operating point: its whole step split into the cost model's three terms."""

    name: str  # "ws2d+batch"
    family: str  # "2D WS + attention by batch"
    parts: dict[str, float]  # seconds per step: compute, memory, comm (summed over every layer)
    time: float  # seconds per step, every block on this candidate
    chosen: bool
    refused: str = ""


def layout_times(choice: Choice, n_blocks: int) -> list[LayoutTime]:
    """Every candidate of a mesh (refused ones too) with its step split into compute, memory and comm:
    the blocks' terms × n_blocks plus the embedding's, the head's and the final output's. Candidates that
    act as the same layout (the same member and attention core) appear once."""
    chosen = choice.first

    def whole(c: Candidate) -> tuple[dict[str, float], float]:
        scale = {"attention": n_blocks, "ffn": n_blocks}
        parts = {k: sum(t[k] * scale.get(p, 1) for p, t in c.times.items()) for k in PARTS}
        return parts, sum(t["time"] * scale.get(p, 1) for p, t in c.times.items())

    out: dict[str, LayoutTime] = {}
    for c in choice.candidates:
        run = c.run(0, 0)  # named as it acts: wg_xyz asked to split attention by heads splits it by batch
        parts, time = whole(c) if not c.refused else (dict.fromkeys(PARTS, 0.0), 0.0)
        is_chosen = c.same_layout(chosen)
        if run.name not in out or is_chosen:
            out[run.name] = LayoutTime(run.name, run.describe(), parts, time, is_chosen, c.refused or "")
    return list(out.values())


def breakdown(panels: list[tuple[str, list[LayoutTime]]], stem: str | Path) -> list[Path]:
    """One panel per operating point: for every layout, compute / memory / communication side by side
    (ms per step, log scale) and a black tick at its step time; the chosen layout's name in bold."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 3.6 * len(panels)), squeeze=False)
    for ax, (title, times) in zip(axes[:, 0], panels):
        times = sorted(times, key=lambda t: (bool(t.refused), t.time))
        w = 0.26
        for i, t in enumerate(times):
            if t.refused:
                ax.text(i, 0.04, "refused", rotation=90, ha="center", va="bottom", fontsize=7, color="#888888",
                        transform=ax.get_xaxis_transform())
                continue
            for j, k in enumerate(PARTS):
                ax.bar(i + (j - 1) * w, t.parts[k] * 1e3, w, color=PART_COLORS[k],
                       label=PART_NAMES[k] if i == 0 else None)
            ax.plot([i - 0.42, i + 0.42], [t.time * 1e3] * 2, color="black", lw=2,
                    label="step time" if i == 0 else None)
        ax.set_yscale("log")
        ax.set_xlim(-0.6, len(times) - 0.4)
        ax.set_xticks(range(len(times)), [t.name for t in times], rotation=40, ha="right", fontsize=8)
        for label, t in zip(ax.get_xticklabels(), times):
            label.set_fontweight("bold" if t.chosen else "normal")
        ax.set_ylabel("ms per step")
        ax.set_title(title, fontsize=10, loc="left")
        ax.grid(True, axis="y", which="both", alpha=0.25)
    fig.suptitle("Every layout at one operating point: the step time is the largest of the overlapping terms "
                 "plus what cannot overlap (bold: chosen)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=4, fontsize=8, bbox_to_anchor=(0.5, 0.965))
    return _save(fig, stem)
