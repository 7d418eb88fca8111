"""Fit an IsoFLOP sweep (Chinchilla approach 2): `python scripts/fit_scaling.py "runs/isoflop-*" --out docs`.

Reads the run directories the globs match (config.json + result.json of each finished run), fits the loss
minimum per budget and the power laws N_opt ∝ C^a, D_opt ∝ C^b, and writes `isoflops.png`, `optimal.png`
and `scaling.json` to --out; the tables go to stdout (markdown). See docs/scaling.md.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

from llmtrain.measure.scaling import (
    ScalingError,
    fit_scaling,
    format_table,
    load_runs,
    plot_isoflops,
    plot_optimal,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "runs", nargs="+", help="run directories or globs (quote them), e.g. 'runs/isoflop-*'"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/scaling"), help="folder for the PNGs and JSON")
    parser.add_argument("--prefix", default="", help="prefix of the output file names, e.g. 'decoder_'")
    parser.add_argument(
        "--neighbors",
        type=int,
        default=None,
        help="fit each budget's parabola on the sizes within this many of its best run (default: all runs)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="fail on an unfinished run instead of skipping it with a note"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_dirs = sorted({Path(p) for pattern in args.runs for p in (glob.glob(pattern) or [pattern])})
    run_dirs = [d for d in run_dirs if d.is_dir()]
    if not run_dirs:
        print(f"error: no run directories match {' '.join(args.runs)}", file=sys.stderr)
        return 2
    try:
        points, skipped = load_runs(run_dirs, skip_unfinished=not args.strict)
        for note in skipped:
            print(f"skipped: {note}", file=sys.stderr)
        if not points:
            raise ScalingError(f"none of the {len(run_dirs)} run directories holds a finished run")
        fit = fit_scaling(points, args.neighbors)
    except ScalingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        outputs = [
            plot_isoflops(points, fit, args.out / f"{args.prefix}isoflops.png"),
            plot_optimal(fit, args.out / f"{args.prefix}optimal.png"),
        ]
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = format_table(points, fit)
    summary = {
        **fit.to_dict(),
        "neighbors": args.neighbors,
        "runs": [{**vars(p), "flops_6nd": p.flops_6nd} for p in points],
    }
    json_path = args.out / f"{args.prefix}scaling.json"
    json_path.write_text(json.dumps(summary, indent=1))
    print(table)
    for m in fit.minima:
        if not m.inside:
            print(
                f"warning: at budget {m.budget:.3g} the fitted optimum N={m.n_opt:,.0f} lies outside the sizes "
                "fitted; add sizes on that side",
                file=sys.stderr,
            )
    print("wrote " + ", ".join(str(p) for p in [*outputs, json_path]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
