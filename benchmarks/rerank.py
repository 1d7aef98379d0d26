"""Saved bench_layouts measurements ranked again by one profile, as is and without parts of its model.

    python -m shardwise.benchmarks.bench_layouts --json run1.json     # (several runs, any profiles)
    python -m shardwise.benchmarks.rerank run1.json run2.json [--profile cpu-local.json]

Every layout of every saved run is planned again (forced layouts, as bench_layouts plans them; planning
only, nothing runs) on the profile (default: this machine's cpu-local) and on three variants of it, and
Spearman's ρ between those predictions and the run's measured step times is printed per run and token
count, with the mean over runs:

    profile          the profile as calibrated
    no shapes        without `matmul_shapes`: every matmul at the one peak FLOP/s
    no sizes         every collective priced by the line fitted to its small sizes, at any size
    neither          both

One calibration judged against several runs' measurements separates what the model gets right from the
noise of one run, and each variant shows what that part of the model is worth on this machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import torch

from .bench_layouts import MESH, build_model, spearman


def variants(hw) -> dict:
    """The profile and the three variants of the module doc."""
    smallest = {}
    for kind, group, latency, bandwidth, up_to in hw.collectives:  # the first line of each kind and group
        key = (kind, group)
        if key not in smallest or (up_to or float("inf")) < (smallest[key][4] or float("inf")):
            smallest[key] = (kind, group, latency, bandwidth, up_to)
    one_line = tuple(entry[:4] for entry in smallest.values())
    return {"profile": hw,
            "no shapes": dataclasses.replace(hw, matmul_shapes=()),
            "no sizes": dataclasses.replace(hw, collectives=one_line),
            "neither": dataclasses.replace(hw, matmul_shapes=(), collectives=one_line)}


def _cases(path: Path) -> list[dict]:
    """The cases of a saved bench_layouts run, or a ShardwiseError naming the file."""
    from shardwise.errors import ShardwiseError

    try:
        text = path.read_text()
    except OSError as e:
        raise ShardwiseError(f"{path}: cannot be read ({e.strerror}); give the JSON files bench_layouts --json "
                             f"saved") from None
    try:
        cases = json.loads(text)["cases"]
        if all({"tokens", "rows"} <= set(c) for c in cases):
            return cases
    except (ValueError, KeyError, TypeError):
        pass
    raise ShardwiseError(f"{path}: not a saved bench_layouts run (expected the JSON `python -m "
                         f"shardwise.benchmarks.bench_layouts --json {path.name}` writes)")


def rerank(runs: list[Path], hw) -> dict:
    """{(run, tokens): {variant or "saved": ρ}} for every case of every run."""
    import shardwise

    saved = {path: _cases(path) for path in runs}  # every file read before anything is planned
    model = build_model()
    profiles = variants(hw)
    out = {}
    for path, cases in saved.items():
        for case in cases:
            b, l = case["tokens"]
            ids = torch.zeros(b, l, dtype=torch.long)  # planning reads shapes only
            rows = [r for r in case["rows"] if r.get("measured_s") is not None]
            measured = [r["measured_s"] for r in rows]
            got = {"saved": spearman([r["predicted_s"] for r in rows], measured)}
            for name, profile in profiles.items():
                predicted = [shardwise.plan(model, (ids,), {}, mesh=MESH, hardware=profile,
                                            layouts={"ffn": r["member"], "attention": r["attention"]}).totals.latency
                             for r in rows]
                got[name] = spearman(predicted, measured)
            out[(path.name, f"{b}x{l}")] = got
            print(f"  {path.name} {b}x{l}: " + ", ".join(f"{k} {v:.3f}" for k, v in got.items()), flush=True)
    return out


def main(argv=None) -> None:
    from shardwise.ir.hardware import CPU_LOCAL, Hardware, get_hardware

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="bench_layouts --json files")
    ap.add_argument("--profile", type=Path, help="a saved cpu-local profile (default: this machine's)")
    args = ap.parse_args(argv)
    if args.profile and not args.profile.is_file():
        ap.error(f"--profile {args.profile}: no such file")
    hw = Hardware.from_json(args.profile.read_text()) if args.profile else get_hardware(CPU_LOCAL)
    print(f"profile: {args.profile or CPU_LOCAL} ({hw.source})")
    got = rerank(args.runs, hw)
    names = list(next(iter(got.values())))
    print(f"\nSpearman's rho, predicted vs measured, per token count: mean (min–max) over {len(args.runs)} run(s)")
    print(f"{'tokens':<8}" + "".join(f"{n:>22}" for n in names))
    for tokens in sorted({t for _, t in got}, key=lambda t: int(t.split('x')[0]) * int(t.split('x')[1])):
        cells = []
        for n in names:
            values = [v[n] for (_, t), v in got.items() if t == tokens]
            cells.append(f"{statistics.fmean(values):.3f} ({min(values):.3f}–{max(values):.3f})")
        print(f"{tokens:<8}" + "".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    from shardwise.errors import ShardwiseError

    try:
        main()
    except ShardwiseError as e:
        raise SystemExit(f"rerank: {e}") from None
