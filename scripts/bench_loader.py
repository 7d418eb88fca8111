"""How fast the loader delivers batches against how fast the default tiny model trains, in one run.

    python scripts/bench_loader.py                          # shards prepared from 8 MB of the stdlib corpus
    python scripts/bench_loader.py --shards DIR --families decoder encoder encoder_decoder

For each family, the `debug=tiny` run (`python scripts/train.py debug=tiny model=<family>`) is built on the
shard set (`data.shards=DIR`), and the script times, in the same process:
- its training step (`Trainer.train_step`, after warm-up): steps per second;
- the data path alone, as the trainer's background thread runs it: memory-mapped windows from the shard files
  (`WindowLoader.next_batch`) and the family's objective (CLM shift, MLM masking, span corruption), with and
  without `data.document_attention`; and a two-source `MixtureLoader` (weights 0.7 / 0.3) with the objective.
The ratio batches per second / steps per second is the headroom (the issue's target: 50x or more). Prints a
table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from llmtrain.config import register_configs, to_dataclass
from llmtrain.data.mixture import MixtureLoader, SourceTokens
from llmtrain.training.trainer import Trainer, build_objective

ROOT = Path(__file__).resolve().parents[1]


def prepare(folder: Path) -> Path:
    """A shard set from 8 MB of the standard library's source (prepare=code)."""
    if (folder / "manifest.json").is_file():
        return folder
    from llmtrain.data.curation import code_curation
    from llmtrain.data.shards import PrepareConfig, prepare_shards

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = to_dataclass(
            compose(
                "train", overrides=["data=stdlib", "data.max_bytes=8000000", "debug=tiny", "run_name=prep"]
            )
        )
    cfg.data.cache_dir = str(folder.parent / "cache")
    prepare_shards(cfg.data, PrepareConfig(curation=code_curation(), output_dir=str(folder), workers=2))
    return folder


def tiny_trainer(family: str, shards: Path, out: Path, document_attention: bool) -> Trainer:
    register_configs()
    overrides = [
        "debug=tiny",
        f"model={family}",
        f"data.shards={shards}",
        f"data.document_attention={str(document_attention).lower()}",
        "trainer.max_steps=1000000",
        "trainer.progress=false",
        "trainer.checkpoint=false",
        "logger.jsonl=false",
        f"output_dir={out}",
        f"run_name={family}-{document_attention}",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return Trainer(to_dataclass(compose("train", overrides=overrides)))


def rate(fn, seconds: float) -> float:
    """Calls per second of fn over about `seconds` (after one warm-up call)."""
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - start)


def measure(family: str, shards: Path, out: Path, seconds: float) -> dict:
    trainer = tiny_trainer(family, shards, out, document_attention=False)
    steps = rate(trainer.train_step, seconds)
    loader, objective = trainer.train_loader, trainer.objective
    rng = torch.Generator().manual_seed(0)
    windows = rate(loader.next_batch, seconds)
    batches = rate(lambda: objective(loader.next_batch(), rng), seconds)
    documents = build_objective(
        tiny_trainer(family, shards, out, document_attention=True).cfg, trainer.corpus.tokenizer
    )
    with_docs = rate(lambda: documents(loader.next_batch(), rng), seconds)
    sources = [SourceTokens("a", trainer.corpus.train, 0.7), SourceTokens("b", trainer.corpus.train, 0.3)]
    mixture = MixtureLoader(sources, objective.raw_length, trainer.cfg.trainer.micro_batch_size, seed=0)
    mixed = rate(lambda: objective(mixture.next_batch(), rng), seconds)
    return {
        "family": family,
        "micro_batch": trainer.cfg.trainer.micro_batch_size,
        "raw_length": objective.raw_length,
        "steps_per_s": steps,
        "windows_per_s": windows,
        "batches_per_s": batches,
        "batches_per_s_document_attention": with_docs,
        "mixture_batches_per_s": mixed,
        "headroom": min(batches, with_docs, mixed) / steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", help="a prepared shard directory (default: prepare one in a temp dir)")
    parser.add_argument("--families", nargs="+", default=["decoder", "encoder", "encoder_decoder"])
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per measurement")
    parser.add_argument("--json", default="bench_loader.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(args.shards) if args.shards else prepare(Path(tmp) / "shards")
        for family in args.families:
            row = measure(family, shards, Path(tmp) / "runs", args.seconds)
            rows.append(row)
            print(
                f"{family:16s} b={row['micro_batch']} raw={row['raw_length']:4d}  step {row['steps_per_s']:7.1f}/s  "
                f"windows {row['windows_per_s']:8.0f}/s  +objective {row['batches_per_s']:7.0f}/s  "
                f"+document ids {row['batches_per_s_document_attention']:7.0f}/s  "
                f"mixture+objective {row['mixture_batches_per_s']:7.0f}/s  headroom {row['headroom']:.0f}x",
                flush=True,
            )
    Path(args.json).write_text(json.dumps({"threads": torch.get_num_threads(), "results": rows}, indent=1))
    print(f"headroom = slowest batch rate / step rate; JSON: {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
