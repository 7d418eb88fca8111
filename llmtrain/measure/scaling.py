"""IsoFLOP scaling fits (Chinchilla approach 2, Hoffmann et al. 2022) from finished runs, and their plots.

Every run of an IsoFLOP sweep trains one model size N for a fixed budget C (`trainer.max_flops`). Per
budget, the final loss against log N is a valley: a parabola fitted through it gives the compute-optimal
N_opt(C) at its vertex. Across budgets, N_opt ∝ C^a and D_opt ∝ C^b are straight lines in log-log
(Chinchilla finds a ≈ b ≈ 0.5).

Conventions. N is the parameter count of the built model (embeddings included, a tied head once, as
Chinchilla counts; `llmtrain.measure.shapes.parameter_count`). D is the corpus tokens the run trained on,
steps × sequences per step × corpus tokens per sequence, so the steps that the trainer's FLOP count
(`llmtrain.measure.flops.forward_flops`, attention included) pays for decide D. D_opt is read off the
budget's own (N, D) line at N_opt, not taken as C / 6N_opt; the table reports 6·N·D beside C to show how far
the 6ND convention is from the trainer's count at these tiny sizes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from llmtrain.config import ConfigError, TrainConfig, to_dataclass
from llmtrain.data.tokenizer import load_tokenizer
from llmtrain.measure.shapes import corpus_tokens, model_config_for, parameter_count
from llmtrain.models.config import ModelConfig


class ScalingError(ValueError):
    """Input that cannot give a scaling fit; the message says what is missing and where."""


@dataclass(frozen=True)
class RunPoint:
    """One finished run of a sweep: its budget, size, tokens and final validation loss."""

    budget: float
    """The run's training compute budget C (trainer.max_flops)."""
    n_params: float
    n_tokens: float
    loss: float
    name: str = ""
    val_bpb: float | None = None

    @property
    def flops_6nd(self) -> float:
        return 6.0 * self.n_params * self.n_tokens


@dataclass(frozen=True)
class IsoFlopMinimum:
    """The vertex of one budget's parabola, loss = c2·x² + c1·x + c0 with x = ln N."""

    budget: float
    n_opt: float
    d_opt: float
    loss_min: float
    curvature: float
    n_points: int
    inside: bool
    """Whether N_opt lies within the sizes fitted (outside them the parabola extrapolates)."""
    n_min: float = 0.0
    n_max: float = 0.0
    """The smallest and largest sizes the parabola was fitted on."""


@dataclass(frozen=True)
class PowerLaw:
    """y = coefficient · C^exponent, fitted in log-log by least squares."""

    exponent: float
    coefficient: float

    def __call__(self, flops: float | np.ndarray) -> float | np.ndarray:
        return self.coefficient * np.asarray(flops, dtype=float) ** self.exponent


@dataclass(frozen=True)
class ScalingFit:
    minima: list[IsoFlopMinimum]
    n_opt: PowerLaw
    """N_opt ∝ C^a."""
    d_opt: PowerLaw
    """D_opt ∝ C^b."""

    def to_dict(self) -> dict:
        return {
            "a": self.n_opt.exponent,
            "b": self.d_opt.exponent,
            "n_opt_law": asdict(self.n_opt),
            "d_opt_law": asdict(self.d_opt),
            "minima": [asdict(m) for m in self.minima],
        }


# -- reading runs ----------------------------------------------------------------------------------------------


def point_from_run(run_dir: Path) -> RunPoint:
    """A RunPoint from a run directory's config.json (resolved config) and result.json."""
    config_path, result_path = run_dir / "config.json", run_dir / "result.json"
    if not config_path.is_file() or not result_path.is_file():
        raise ScalingError(f"{run_dir} is not a finished run: it needs config.json and result.json")
    cfg: TrainConfig = to_dataclass(json.loads(config_path.read_text()))
    result = json.loads(result_path.read_text())
    if result.get("stopped"):
        raise ScalingError(f"{run_dir} stopped early ({result['stopped']}); resume it before fitting")
    budget = cfg.trainer.max_flops
    if not budget or budget <= 0:
        raise ScalingError(f"{run_dir} has no positive compute budget (trainer.max_flops={budget})")
    # input tokens trained on, over all ranks: result.json's, else the last logged (runs before it had them)
    inputs = result.get("tokens", last_logged_tokens(run_dir / "metrics.jsonl"))
    if inputs is None:
        raise ScalingError(
            f"{run_dir}: result.json has no tokens and there is no metrics.jsonl to count them"
        )
    n_tokens = corpus_tokens(cfg, inputs)
    return RunPoint(
        budget=float(budget),
        n_params=float(parameter_count(run_model(run_dir, cfg, result))),
        n_tokens=float(n_tokens),
        loss=float(result["val_loss"]),
        name=run_dir.name,
        val_bpb=result.get("val_bpb"),
    )


def run_model(run_dir: Path, cfg: TrainConfig, result: dict | None = None) -> ModelConfig:
    """The model a run trained: its config.json's, with vocab_size 0 ("from the tokenizer") resolved as the
    trainer resolved it: result.json's record, else the run directory's copy of its tokenizer (config.json
    keeps the 0, and data.tokenizer.vocab_size is only the size of a BPE the run trains)."""
    vocab = cfg.model.vocab_size or (result or {}).get("vocab_size")
    kept = run_dir / "tokenizer.json"
    if not vocab and kept.is_file():
        vocab = load_tokenizer(kept).vocab_size
    return replace(cfg.model, vocab_size=vocab) if vocab else model_config_for(cfg)


def last_logged_tokens(metrics_path: Path) -> int | None:
    """Input tokens trained on, over all ranks (the trainer's `tokens`), from the last training record of
    metrics.jsonl; `corpus_tokens` turns them into D."""
    if not metrics_path.is_file():
        return None
    tokens = None
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if "tokens" in record:
            tokens = record["tokens"]
    return tokens


def load_runs(run_dirs: Iterable[Path], skip_unfinished: bool = True) -> tuple[list[RunPoint], list[str]]:
    """Points of the finished runs among `run_dirs`, and a note for each one skipped."""
    points, skipped = [], []
    for run_dir in sorted(Path(d) for d in run_dirs):
        if not run_dir.is_dir():
            continue
        try:
            points.append(point_from_run(run_dir))
        except (ScalingError, ConfigError, KeyError) as err:  # ConfigError: a config.json of another version
            if not skip_unfinished:
                raise
            if isinstance(err, ScalingError):
                skipped.append(str(err))
            elif isinstance(err, ConfigError):
                skipped.append(f"{run_dir}: config.json: {err}")
            else:
                skipped.append(f"{run_dir}: result lacks {err}")
    return points, skipped


# -- fitting ---------------------------------------------------------------------------------------------------


def group_by_budget(points: Sequence[RunPoint]) -> dict[float, list[RunPoint]]:
    """Points by budget; budgets within 0.1% of each other are one budget (1e13 written two ways)."""
    groups: dict[float, list[RunPoint]] = {}
    for p in sorted(points, key=lambda p: (p.budget, p.n_params)):
        if not p.budget > 0 or not math.isfinite(p.budget):
            raise ScalingError(
                f"run {p.name or '?'}: the budget must be a positive number of FLOPs, got {p.budget}"
            )
        key = next((b for b in groups if abs(b - p.budget) <= 1e-3 * b), p.budget)
        groups.setdefault(key, []).append(p)
    return groups


def near_the_best(points: Sequence[RunPoint], neighbors: int) -> list[RunPoint]:
    """The runs whose size is within `neighbors` sizes (in order of N) of the lowest-loss run's."""
    sizes = sorted({p.n_params for p in points})
    best = sizes.index(min(points, key=lambda p: p.loss).n_params)
    keep = set(sizes[max(0, best - neighbors) : best + neighbors + 1])
    return [p for p in points if p.n_params in keep]


def fit_isoflop_minimum(
    budget: float, points: Sequence[RunPoint], neighbors: int | None = None
) -> IsoFlopMinimum:
    """Parabola of loss in ln N through one budget's runs; its vertex is the compute-optimal size.

    neighbors=None fits every run (Chinchilla's approach 2); an integer fits only the sizes within that many
    of the best run's, for valleys that are not parabolas over the whole range swept (asymmetric ones).
    """
    if neighbors is not None:
        if neighbors < 1:
            raise ScalingError(f"neighbors={neighbors} must be >= 1 (a parabola needs 3 sizes)")
        points = near_the_best(points, neighbors)
    sizes = sorted({p.n_params for p in points})
    if len(sizes) < 3:
        raise ScalingError(
            f"budget {budget:.3g} has {len(sizes)} distinct model size(s); a parabola needs at least 3"
        )
    x = np.log([p.n_params for p in points])
    loss = np.array([p.loss for p in points])
    c2, c1, c0 = np.polyfit(x, loss, 2)
    if not c2 > 0:
        raise ScalingError(
            f"budget {budget:.3g}: loss against log N has no minimum (curvature {c2:.3g} <= 0); "
            "train sizes on both sides of the optimum"
        )
    x_opt = -c1 / (2 * c2)
    # D at N_opt from the budget's own points: ln D is (nearly) linear in ln N at a fixed budget
    slope, intercept = np.polyfit(x, np.log([p.n_tokens for p in points]), 1)
    return IsoFlopMinimum(
        budget=budget,
        n_opt=float(math.exp(x_opt)),
        d_opt=float(math.exp(intercept + slope * x_opt)),
        loss_min=float(c0 - c1**2 / (4 * c2)),
        curvature=float(c2),
        n_points=len(points),
        inside=bool(x.min() <= x_opt <= x.max()),
        n_min=float(min(sizes)),
        n_max=float(max(sizes)),
    )


def fit_power_law(flops: Sequence[float], values: Sequence[float]) -> PowerLaw:
    """values = k · flops^e by least squares in log-log."""
    if len(set(flops)) < 2:
        raise ScalingError(f"a power law in C needs at least 2 budgets; got {len(set(flops))}")
    exponent, log_k = np.polyfit(np.log(flops), np.log(values), 1)
    return PowerLaw(exponent=float(exponent), coefficient=float(math.exp(log_k)))


def fit_scaling(points: Sequence[RunPoint], neighbors: int | None = None) -> ScalingFit:
    """IsoFLOP minima per budget (see fit_isoflop_minimum for `neighbors`), then N_opt ∝ C^a and D_opt ∝ C^b."""
    if not points:
        raise ScalingError("no finished runs to fit")
    groups = group_by_budget(points)
    if len(groups) < 2:
        raise ScalingError(
            f"all runs share one budget ({next(iter(groups)):.3g} FLOPs); N_opt ∝ C^a needs at least 2 budgets"
        )
    minima = [fit_isoflop_minimum(budget, group, neighbors) for budget, group in groups.items()]
    budgets = [m.budget for m in minima]
    return ScalingFit(
        minima=minima,
        n_opt=fit_power_law(budgets, [m.n_opt for m in minima]),
        d_opt=fit_power_law(budgets, [m.d_opt for m in minima]),
    )


# -- plots and table -------------------------------------------------------------------------------------------


def pyplot():
    """matplotlib.pyplot drawing to files (Agg); a clear error where the `plots` extra is not installed."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'llmtrain[plots]'") from None

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_isoflops(points: Sequence[RunPoint], fit: ScalingFit, path: Path) -> Path:
    """Loss against parameters, one curve (points and fitted parabola) per budget, vertices marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=100)
    groups = group_by_budget(points)
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(fit.minima)))
    for color, m in zip(colors, fit.minima):
        group = groups[m.budget]
        n = [p.n_params for p in group]
        ax.scatter(n, [p.loss for p in group], color=color, s=18, label=f"C = {m.budget:.2g}")
        grid = np.linspace(math.log(m.n_min), math.log(m.n_max), 60)  # the sizes the parabola was fitted on
        c1 = -2 * m.curvature * math.log(m.n_opt)
        c0 = m.loss_min + m.curvature * math.log(m.n_opt) ** 2
        ax.plot(np.exp(grid), m.curvature * grid**2 + c1 * grid + c0, color=color, lw=1)
        ax.scatter([m.n_opt], [m.loss_min], color=color, marker="*", s=90, edgecolor="k", linewidth=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title("IsoFLOP curves (star: fitted minimum)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_optimal(fit: ScalingFit, path: Path) -> Path:
    """N_opt and D_opt against C in log-log, with the fitted power laws."""
    from matplotlib import ticker

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6), dpi=100)
    budgets = np.array([m.budget for m in fit.minima])
    grid = np.geomspace(budgets.min() / 1.5, budgets.max() * 1.5, 20)
    for ax, law, values, label in (
        (axes[0], fit.n_opt, [m.n_opt for m in fit.minima], "N_opt (parameters)"),
        (axes[1], fit.d_opt, [m.d_opt for m in fit.minima], "D_opt (tokens)"),
    ):
        ax.scatter(budgets, values, color="C0", zorder=3)
        ax.plot(grid, law(grid), color="C1", label=f"∝ C^{law.exponent:.2f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.tick_params(which="minor", labelbottom=False)  # C's minor labels collide within a decade
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.3g}"))
        ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.2g}"))
        ax.set_xlabel("training compute C (FLOPs)")
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def format_table(points: Sequence[RunPoint], fit: ScalingFit) -> str:
    """Markdown tables: every run, then the minimum per budget and the fitted exponents."""
    lines = [
        "| budget C | run | N (params) | D (tokens) | 6ND / C | val loss |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for budget, group in group_by_budget(points).items():
        for p in group:
            lines.append(
                f"| {budget:.3g} | {p.name} | {p.n_params:,.0f} | {p.n_tokens:,.0f} | "
                f"{p.flops_6nd / budget:.2f} | {p.loss:.4f} |"
            )
    lines += [
        "",
        "| budget C | runs fitted | N_opt | D_opt | D_opt / N_opt | min loss | N_opt inside the sizes fitted |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for m in fit.minima:
        lines.append(
            f"| {m.budget:.3g} | {m.n_points} | {m.n_opt:,.0f} | {m.d_opt:,.0f} | {m.d_opt / m.n_opt:.1f} | "
            f"{m.loss_min:.4f} | {'yes' if m.inside else 'no (extrapolated)'} |"
        )
    lines += [
        "",
        f"N_opt ∝ C^{fit.n_opt.exponent:.3f}, D_opt ∝ C^{fit.d_opt.exponent:.3f} "
        f"(Chinchilla approach 2: 0.49 and 0.51)",
    ]
    return "\n".join(lines)
