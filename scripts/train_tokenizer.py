"""Train a tokenizer on a sample of the curated corpus and report its bytes per token on held-out text.

    python scripts/train_tokenizer.py data=stdlib prepare=code tokenizer_training.kind=unigram data.tokenizer.vocab_size=8000
    python scripts/train_tokenizer.py data=hub data.hub_name=HuggingFaceFW/fineweb-edu tokenizer_training.kind=wordpiece

Kinds: bpe (byte-level, GPT-2 style, lossless), unigram (SentencePiece style), wordpiece (BERT style). Every kind
carries the special tokens of all three objectives at fixed ids (pad, bos, eos, unk, mask, <extra_id_0..>).
The sample is the training split after the `prepare` curation (prepare=web | code | minimal and prepare.curation.*);
held-out text is the validation split (data.val_fraction), never seen in training. Then train or prepare with
`data.tokenizer.path=<the printed path>`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import hydra
from omegaconf import DictConfig

from llmtrain.cli import setup_logging
from llmtrain.config import ConfigError, DataConfig
from llmtrain.data.curation import CurationError
from llmtrain.data.shards import curated_texts, register_prepare_config
from llmtrain.data.sources import DataError
from llmtrain.data.tokenizer import TOKENIZER_KINDS, atomic_write_text, train_tokenizer
from llmtrain.measure.options import section, table, train_config


@dataclass
class TokenizerTraining:
    kind: str = "bpe"
    """bpe | unigram | wordpiece. Vocabulary size, min frequency and sentinels: data.tokenizer.*."""
    sample_bytes: int | None = None
    """Curated training bytes to train on (null: data.tokenizer.train_bytes)."""
    heldout_bytes: int = 2_000_000
    """Validation-split bytes to measure on."""
    output: str | None = None
    """tokenizer.json to write (null: <data.cache_dir>/tokenizers/<data.name>-<kind>-<vocab>/tokenizer.json)."""


register_prepare_config("train_tokenizer", tokenizer_training=TokenizerTraining)


def take(texts, budget: int) -> list[str]:
    out, used = [], 0
    for text in texts:
        if used >= budget:
            break
        out.append(text)
        used += len(text.encode("utf-8"))
    return out


def measure(tokenizer, texts: list[str]) -> dict:
    """Bytes and characters per token on `texts`, the unknown-token rate, and how many decode back exactly."""
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    ids = tokenizer.encode_documents(texts)
    n_tokens = sum(map(len, ids))
    unk = sum(row.count(tokenizer.unk_id) for row in ids)
    exact = sum(tokenizer.decode(row) == text for row, text in zip(ids, texts))
    return {
        "documents": len(texts),
        "bytes": n_bytes,
        "tokens": n_tokens,
        "bytes_per_token": n_bytes / n_tokens if n_tokens else 0.0,
        "chars_per_token": sum(map(len, texts)) / n_tokens if n_tokens else 0.0,
        "unk_rate": unk / n_tokens if n_tokens else 0.0,
        "exact_round_trip": exact / len(texts) if texts else 0.0,
    }


def check_options(opts: TokenizerTraining) -> None:
    if opts.kind not in TOKENIZER_KINDS:
        raise ConfigError(
            f"tokenizer_training.kind={opts.kind!r} is not allowed; allowed: {', '.join(TOKENIZER_KINDS)}"
        )
    if opts.sample_bytes is not None and not opts.sample_bytes > 0:
        raise ConfigError(
            f"tokenizer_training.sample_bytes={opts.sample_bytes} must be > 0 (null: data.tokenizer.train_bytes)"
        )
    if not opts.heldout_bytes > 0:
        raise ConfigError(f"tokenizer_training.heldout_bytes={opts.heldout_bytes} must be > 0")


def output_path(opts: TokenizerTraining, data: DataConfig) -> Path:
    """Where the tokenizer goes, checked before training: a file path whose folder can be made."""
    t = data.tokenizer
    default = (
        Path(data.cache_dir) / "tokenizers" / f"{data.name}-{opts.kind}-{t.vocab_size}" / "tokenizer.json"
    )
    path = Path(opts.output) if opts.output else default
    if path.is_dir():
        raise ConfigError(
            f"tokenizer_training.output={path} is a folder; give the file to write, e.g. {path / 'tokenizer.json'}"
        )
    if path.name == "report.json":
        raise ConfigError(
            f"tokenizer_training.output={path}: report.json is written beside it; name it otherwise"
        )
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ConfigError(f"tokenizer_training.output={path}: {blocking} is a file, not a folder")
    return path


@hydra.main(version_base="1.3", config_path="../configs", config_name="train_tokenizer")
def main(cfg: DictConfig) -> None:
    setup_logging()
    try:
        opts: TokenizerTraining = section(cfg, "tokenizer_training")
        data = train_config(cfg, "prepare", "tokenizer_training", trains_bpe=opts.kind == "bpe").data
        curation = section(cfg, "prepare").curation
        check_options(opts)
        t = data.tokenizer
        path = output_path(opts, data)
        sample = take(curated_texts(data, curation, "train"), opts.sample_bytes or t.train_bytes)
        heldout = take(curated_texts(data, curation, "val"), opts.heldout_bytes)
        if not sample or not heldout:
            which = "training" if not sample else "held-out (validation)"
            more = f"raise data.max_bytes={data.max_bytes} or" if data.max_bytes else "add data or raise"
            raise DataError(
                f"no curated {which} text: {more} data.val_fraction={data.val_fraction}, or loosen the "
                "curation (prepare=minimal keeps the most)"
            )
        start = time.perf_counter()
        tokenizer = train_tokenizer(sample, opts.kind, t.vocab_size, t.min_frequency, t.n_sentinels)
        seconds = time.perf_counter() - start
    except (ConfigError, DataError, CurationError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    tokenizer.save(path)
    heldout_stats = measure(tokenizer, heldout)
    report = {
        "kind": opts.kind,
        "vocab_size": tokenizer.vocab_size,
        "digest": tokenizer.digest(),
        "special_ids": {"pad": tokenizer.pad_id, "bos": tokenizer.bos_id, "eos": tokenizer.eos_id,
                        "unk": tokenizer.unk_id, "mask": tokenizer.mask_id, "sentinels": len(tokenizer.sentinel_ids)},
        "train": {"documents": len(sample), "bytes": sum(len(x.encode("utf-8")) for x in sample), "seconds": round(seconds, 2)},
        "heldout": heldout_stats,
        "settings": {"data": data.name, "tokenizer": asdict(t), "tokenizer_training": asdict(opts)},
    }  # fmt: skip
    atomic_write_text(path.with_name("report.json"), json.dumps(report, indent=1))
    rows = [
        ["kind", opts.kind],
        ["vocabulary", str(tokenizer.vocab_size)],
        ["trained on", f"{report['train']['bytes'] / 1e6:.2f} MB, {len(sample)} documents, {seconds:.1f} s"],
        ["held out", f"{heldout_stats['bytes'] / 1e6:.2f} MB, {len(heldout)} documents"],
        ["bytes per token", f"{heldout_stats['bytes_per_token']:.3f}"],
        ["chars per token", f"{heldout_stats['chars_per_token']:.3f}"],
        ["unknown tokens", f"{heldout_stats['unk_rate']:.3%}"],
        ["exact round trip", f"{heldout_stats['exact_round_trip']:.1%} of documents"],
    ]
    print(table(["tokenizer", "value"], rows))
    print(f"\ntokenizer: {path}\nreport: {path.with_name('report.json')}")
    print(f"use it: data.tokenizer.path={path}")


if __name__ == "__main__":
    main()
