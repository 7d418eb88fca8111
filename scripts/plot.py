"""Plot runs' loss and bits-per-byte curves: `python scripts/plot.py runs/a runs/b --x tokens --out curves.png`.

Reads each run directory's metrics.jsonl: training records (step, loss, tokens) draw the training loss, eval
records (step, val_loss, val_bpb) the validation loss and bits per byte. The x axis is steps, tokens (the
trainer's count: input tokens), or training FLOPs (tokens x the trainer's FLOPs per input token, from the
run's config.json).
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

from llmtrain.cli import output_file

X_LABELS = {"step": "step", "tokens": "tokens", "flops": "training FLOPs"}


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training records, eval records) of a run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    if not train and not evals:
        raise ValueError(f"{path} holds no loss records")
    return train, evals


def flops_per_token(run_dir: Path) -> float:
    """Training FLOPs per token of the trainer's count (input tokens; span corruption reads more corpus
    tokens than that) of the run's model and objective."""
    from llmtrain.config import to_dataclass
    from llmtrain.measure.flops import forward_flops
    from llmtrain.measure.scaling import run_model
    from llmtrain.measure.shapes import lengths_for

    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no config.json: --x flops needs the run's model")
    cfg = to_dataclass(json.loads(config_path.read_text()))
    lengths = lengths_for(cfg)
    return forward_flops(run_model(run_dir, cfg), lengths).training / lengths.inputs


def x_values(records: list[dict], x: str, tokens_per_step: float, per_token: float) -> list[float]:
    steps = [r["step"] for r in records]
    if x == "step":
        return steps
    tokens = [r.get("tokens", s * tokens_per_step) for r, s in zip(records, steps)]
    return tokens if x == "tokens" else [t * per_token for t in tokens]


def plot_runs(run_dirs: list[Path], out: Path, x: str = "step", log_x: bool = False) -> Path:
    from llmtrain.measure.scaling import pyplot

    plt = pyplot()
    fig, (ax_loss, ax_bpb) = plt.subplots(1, 2, figsize=(9, 3.8), dpi=100)
    for i, run_dir in enumerate(run_dirs):
        train, evals = read_metrics(run_dir)
        last = next((r for r in reversed(train) if r.get("step") and "tokens" in r), None)
        tokens_per_step = last["tokens"] / last["step"] if last else 0.0
        if x != "step" and not last:
            raise ValueError(f"{run_dir}: no training record with tokens to place eval points on --x {x}")
        per_token = flops_per_token(run_dir) if x == "flops" else 1.0
        color, label = f"C{i % 10}", run_dir.name
        if train:
            ax_loss.plot(x_values(train, x, tokens_per_step, per_token), [r["loss"] for r in train],
                         color=color, lw=1, label=f"{label} train")  # fmt: skip
        if evals:
            ex = x_values(evals, x, tokens_per_step, per_token)
            ax_loss.plot(ex, [r["val_loss"] for r in evals], color=color, ls="--", marker="o", ms=3,
                         label=f"{label} val")  # fmt: skip
            if any("val_bpb" in r for r in evals):
                bpb = [(xv, r["val_bpb"]) for xv, r in zip(ex, evals) if "val_bpb" in r]
                ax_bpb.plot(*zip(*bpb), color=color, marker="o", ms=3, label=label)
    for ax, ylabel in ((ax_loss, "loss (nats/token)"), (ax_bpb, "validation bits per byte")):
        ax.set_xlabel(X_LABELS[x])
        ax.set_ylabel(ylabel)
        if log_x:
            ax.set_xscale("log")
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = out if out.suffix else out.with_suffix(".png")  # what matplotlib writes for a name without one
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories or globs (quote them)")
    parser.add_argument("--x", choices=sorted(X_LABELS), default="step", help="x axis (default: step)")
    parser.add_argument("--log-x", action="store_true", help="logarithmic x axis")
    parser.add_argument(
        "--out",
        type=output_file,
        default=Path("runs/curves.png"),
        help="PNG to write (its folder must exist)",
    )
    args = parser.parse_args(argv)
    run_dirs = sorted({Path(p) for pattern in args.runs for p in (glob.glob(pattern) or [pattern])})
    run_dirs = [d for d in run_dirs if d.is_dir()]
    if not run_dirs:
        print(f"error: no run directories match {' '.join(args.runs)}", file=sys.stderr)
        return 2
    try:
        out = plot_runs(run_dirs, args.out, args.x, args.log_x)
    except (FileNotFoundError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
