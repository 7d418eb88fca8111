"""Prepare a corpus for training: sources -> normalise -> quality filters -> dedup -> tokenise -> shards -> report.

    python scripts/prepare_data.py data=hub data.hub_name=HuggingFaceFW/fineweb-edu data.max_bytes=2000000000 prepare=web
    python scripts/prepare_data.py data=stdlib prepare=code          # the embedded corpus is source code
    python scripts/prepare_data.py data=files 'data.paths=[corpus/*.jsonl]' prepare.curation.dedup.threshold=0.7

Same config tree and overrides as training (data.*, data.tokenizer.*), plus `prepare.*` (PrepareConfig in
llmtrain/data/shards.py; the curation rules in llmtrain/data/curation.py). Presets: prepare=web (FineWeb-style
Gopher + C4 rules, exact + near dedup; the default), prepare=code (length and StarCoder character rules, dedup),
prepare=minimal (normalise + exact dedup). Prints the report table and writes report.json and manifest.json
into the shard directory. An interrupted run, started again with the same command, skips the finished chunks.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from llmtrain.cli import setup_logging
from llmtrain.config import ConfigError
from llmtrain.data.curation import CurationError, Report
from llmtrain.data.shards import PrepareConfig, output_dir, prepare_shards, register_prepare_config
from llmtrain.data.sources import DataError
from llmtrain.measure.options import section, table, train_config

register_prepare_config("prepare_data")


@hydra.main(version_base="1.3", config_path="../configs", config_name="prepare_data")
def main(cfg: DictConfig) -> None:
    setup_logging()
    try:
        data = train_config(cfg, "prepare").data
        prep: PrepareConfig = section(cfg, "prepare")
        manifest = prepare_shards(data, prep)
    except (ConfigError, DataError, CurationError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(table(*Report.from_dict(manifest["report"]).rows()))
    folder = output_dir(data, prep)
    splits = manifest["splits"]
    summary = ", ".join(
        f"{name} {s['tokens']:,} tokens / {s['documents']:,} documents in {len(s['shards'])} shards"
        for name, s in splits.items()
    )
    r = manifest["report"]
    print(
        f"\nthroughput: {r['mb_per_s']:.2f} MB/s with {r['workers']} workers ({r['wall_seconds']:.1f} s), "
        f"{r['mb_per_cpu_second']:.2f} MB per CPU-second (main process and workers); peak memory "
        f"{r['peak_rss_mb'].get('main', 0):.0f} MB main, {r['peak_rss_mb'].get('largest_worker', 0):.0f} MB per worker"
    )
    print(f"shards: {folder} ({manifest['dtype']}; {summary})")
    print(f"report: {folder / 'report.json'}   manifest: {folder / 'manifest.json'}")
    print(f"train on it: python scripts/train.py data.shards={folder}")


if __name__ == "__main__":
    main()
