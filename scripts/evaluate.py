"""Evaluate a trained model: loss, perplexity, bits per byte and token accuracy (MLM: on the selected
tokens; span corruption: on the targets), at each precision asked for, as one JSON result.

    python scripts/evaluate.py runs/decoder-stdlib
    python scripts/evaluate.py runs/decoder-stdlib --data files --set data.paths=[legal/*.jsonl] data.name=legal
    python scripts/evaluate.py runs/decoder-stdlib --precision fp32 bf16 int8 --out eval.json

The source is a run directory (its newest checkpoint), a step-XXXXXXX folder or an exported folder. The data
is the run's own validation split, read as training reads it (data.shards and data.mixture included), unless
--data NAME (configs/data/NAME.yaml) and --set data.KEY=VALUE change it; the model's own tokenizer is always
used. Each precision reports its weight bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llmtrain.cli import device, number, output_file
from llmtrain.config import ConfigError, TrainConfig, to_dataclass, validate_data, validate_lengths
from llmtrain.data import DataError
from llmtrain.data.mixture import build_loaders, load_corpus
from llmtrain.data.tokenizer import atomic_write_text
from llmtrain.inference.evaluate import evaluate_loader
from llmtrain.inference.loading import CheckpointError, load_trained_model, model_tokenizer
from llmtrain.inference.quantize import PRECISIONS, weight_bytes, with_precision
from llmtrain.objectives import OBJECTIVE_FAMILY
from llmtrain.training.trainer import build_objective

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


SOURCE_SETTINGS = ("data.source", "data.paths", "data.hub_name", "data.hub_config", "data.hub_split")
"""--set keys that name a raw source, which a run's data.shards / data.mixture would otherwise override."""


def setting_keys(settings: list[str]) -> list[str]:
    """The keys of --set KEY=VALUE settings."""
    return [setting.split("=")[0].strip() for setting in settings]


def run_config(source: Path, data: str | None, settings: list[str]) -> tuple[TrainConfig, bool]:
    """The run's training config (or the defaults, for an exported folder), with the data changed as asked;
    and whether a run's config was found."""
    saved = {}
    for candidate in (source / "config.json", source.parent / "config.json"):
        if candidate.is_file() and "data" in (found := json.loads(candidate.read_text())):
            saved = found
            break
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), {k: v for k, v in saved.items() if k != "hydra"})
    seq_len = cfg.data.seq_len
    if data:
        path = CONFIGS / "data" / f"{data}.yaml"
        if not path.is_file():
            allowed = ", ".join(sorted(p.stem for p in (CONFIGS / "data").glob("*.yaml")))
            raise ConfigError(f"--data {data}: no {path}; allowed: {allowed}")
        cfg.data.shards, cfg.data.mixture = None, []  # the run's prepared data gives way to NAME's
        cfg.data = OmegaConf.merge(cfg.data, OmegaConf.load(path))
        cfg.data.seq_len = seq_len  # the model's sequence length, unless --set changes it
    keys = setting_keys(settings)
    prepared = any(k.startswith(("data.shards", "data.mixture")) for k in keys)
    if any(k in SOURCE_SETTINGS for k in keys) and not prepared:  # the run's prepared data gives way
        cfg.data.shards, cfg.data.mixture = None, []
    for setting in settings:  # one at a time, so an error names the setting
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([setting]))
        except OmegaConfBaseException as err:
            raise ConfigError(
                f"--set {setting}: {str(err).splitlines()[0]} (expected data.KEY=VALUE)"
            ) from None
    return to_dataclass(cfg), bool(saved)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="run directory, step-XXXXXXX folder, or exported folder")
    parser.add_argument("--data", help="a data config name (configs/data/NAME.yaml); default: the run's data")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="e.g. data.paths=[a.jsonl]")
    parser.add_argument("--tokenizer", help="tokenizer.json (default: the one beside the run, if found)")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=PRECISIONS)
    parser.add_argument("--batches", type=number(int, minimum=1), default=20)
    parser.add_argument("--batch-size", type=number(int, minimum=1), default=8)
    parser.add_argument("--device", type=device, default="cpu")
    parser.add_argument("--out", type=output_file, help="also write the JSON result here")
    args = parser.parse_args(argv)
    try:
        source = Path(args.source)
        loaded = load_trained_model(source, args.device)
        tokenizer, _ = model_tokenizer(loaded, args.tokenizer)
        cfg, from_run = run_config(loaded.source, args.data, args.set)
        cfg.data.tokenizer.path = str(tokenizer)
        cfg.model = loaded.cfg
        if OBJECTIVE_FAMILY[cfg.objective.name] != loaded.cfg.family:  # an exported folder: the family's own
            cfg.objective.name = next(k for k, v in OBJECTIVE_FAMILY.items() if v == loaded.cfg.family)
        if not from_run and "data.seq_len" not in setting_keys(args.set):
            # an exported folder: the default length, or the model's own where that is shorter
            cfg.data.seq_len = min(cfg.data.seq_len, loaded.cfg.max_seq_len)
        validate_data(cfg)  # e.g. --data files without data.paths
        validate_lengths(cfg)  # e.g. a data.seq_len beyond the model's position table
        # the corpus as the trainer reads it: data.shards, data.mixture (its loaders below), or tokenised here
        corpus = load_corpus(cfg.data)
        objective = build_objective(cfg, corpus.tokenizer)
    except (CheckpointError, ConfigError, DataError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        loaders = build_loaders(
            cfg.data, objective.raw_length, args.batch_size, cfg.seed, corpus=corpus, train=False
        )
    except DataError as err:  # e.g. a validation split shorter than one batch of windows
        print(
            f"error: {err} (--batch-size {args.batch_size}, data.seq_len={cfg.data.seq_len})", file=sys.stderr
        )
        return 2

    batches = min(args.batches, loaders.val_loader.batches_per_epoch)
    if batches < args.batches:
        print(
            f"note: the validation split holds {batches} batches of {args.batch_size} windows; evaluating "
            f"those (--batches {args.batches})",
            file=sys.stderr,
        )
    result = {
        "source": str(loaded.source),
        "family": loaded.cfg.family,
        "objective": cfg.objective.name,
        "data": cfg.data.name,
        "seq_len": cfg.data.seq_len,
        "batches": batches,
        "batch_size": args.batch_size,
        "results": {},
    }
    token_bytes = corpus.tokenizer.token_bytes()
    for precision in args.precision:
        model = load_trained_model(loaded.source, args.device).model if precision != "fp32" else loaded.model
        model = with_precision(model, precision)
        metrics = evaluate_loader(model, objective, loaders.val_loader, token_bytes, batches, cfg.seed)
        result["results"][precision] = {**metrics, "weight_bytes": weight_bytes(model)}
        print(
            f"{precision:>5}: loss {metrics['loss']:.4f}  ppl {metrics['ppl']:.2f}  bpb {metrics['bpb']:.4f}  "
            f"accuracy {metrics['accuracy']:.3f}  weights {weight_bytes(model) / 2**20:.2f} MiB",
            file=sys.stderr,
        )
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n")  # a failed write leaves no half file
    return 0


if __name__ == "__main__":
    sys.exit(main())
