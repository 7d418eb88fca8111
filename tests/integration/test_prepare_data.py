"""scripts/prepare_data.py and scripts/train_tokenizer.py as a user runs them, and training on their shards."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from llmtrain.data.mixture import MixtureSource, build_loaders
from llmtrain.data.shards import shard_corpus
from llmtrain.training.trainer import Trainer
from tests.conftest import ROOT, write_jsonl
from tests.unit.test_curation import _edit, _words, prose
from tests.unit.test_mixture import MixtureDataConfig


def run(script: str, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *overrides],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )  # fmt: skip


def web_corpus(tmp_path):
    docs = [prose(5000 + i, paragraphs=3) for i in range(80)]
    noise = [
        _words(20),
        docs[0],
        _edit(docs[1], 1, seed=3),
        "Buy now!!! ### $$$",
        "\n".join([docs[2][:200]] * 8),
    ]
    return write_jsonl(tmp_path / "web.jsonl", docs + noise), docs


def test_prepare_data_script_curates_tokenises_and_reports(tmp_path):
    corpus, docs = web_corpus(tmp_path)
    out = tmp_path / "shards"
    args = ["data=files", f"data.paths=[{corpus}]", "data.tokenizer.vocab_size=400", "data.val_fraction=0.1",
            f"data.cache_dir={tmp_path / 'cache'}", f"prepare.output_dir={out}", "prepare.workers=2",
            "prepare.shard_bytes=20000"]  # fmt: skip
    proc = run("prepare_data.py", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in (
        "normalize",
        "gopher_repetition",
        "gopher_quality",
        "c4",
        "exact_dedup",
        "near_dedup",
        "tokenize",
    ):
        assert stage in proc.stdout
    assert "gopher_quality.min_words 2" in proc.stdout and "exact_dedup.exact 1" in proc.stdout
    assert "near_dedup.threshold 1" in proc.stdout and f"shards: {out}" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert report["input"]["documents"] == len(docs) + 5 and report["output"]["documents"] == len(docs)
    assert report["workers"] == 2 and report["mb_per_s"] > 0 and report["mb_per_cpu_second"] > 0
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == len(docs)
    assert (
        manifest["curation"]["gopher_quality"]["min_words"] == 50
        and manifest["tokenizer"]["vocab_size"] == 400
    )

    again = run("prepare_data.py", *args)  # complete: reused, the same manifest
    assert again.returncode == 0 and "is complete; reusing it" in again.stderr
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_prepare_data_script_errors_name_the_setting(tmp_path):
    corpus, _ = web_corpus(tmp_path)
    base = ["data=files", f"data.paths=[{corpus}]", f"data.cache_dir={tmp_path / 'cache'}"]
    proc = run("prepare_data.py", *base, "prepare.curation.gopher_quality.min_word=3")
    assert proc.returncode != 0 and "min_word" in proc.stderr
    proc = run(
        "prepare_data.py",
        *base,
        f"prepare.output_dir={tmp_path / 'x'}",
        "prepare.curation.c4.min_sentences=1000",
    )
    assert (
        proc.returncode == 2
        and "error: data.paths=" in proc.stderr
        and "(removed by: c4.min_sentences" in proc.stderr
    )
    assert not (tmp_path / "x" / "manifest.json").exists()


def test_train_tokenizer_script_reports_bytes_per_token(tmp_path):
    corpus, _ = web_corpus(tmp_path)
    out = tmp_path / "tok" / "tokenizer.json"
    # 300: below a byte-level BPE's floor (362 with 100 sentinels), which does not bind a unigram model
    proc = run("train_tokenizer.py", "data=files", f"data.paths=[{corpus}]", "data.tokenizer.vocab_size=300",
               "data.val_fraction=0.2", "tokenizer_training.kind=unigram", f"tokenizer_training.output={out}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bytes per token" in proc.stdout and str(out) in proc.stdout
    report = json.loads(out.with_name("report.json").read_text())
    assert (
        report["kind"] == "unigram"
        and report["special_ids"]["mask"] == 4
        and report["special_ids"]["sentinels"] == 100
    )
    assert 1.0 < report["heldout"]["bytes_per_token"] < 8 and report["heldout"]["exact_round_trip"] == 1.0
    bad = run(
        "train_tokenizer.py", "tokenizer_training.kind=sentencepiece", f"tokenizer_training.output={out}"
    )
    assert bad.returncode == 2 and "tokenizer_training.kind='sentencepiece' is not allowed" in bad.stderr


def test_prepare_data_script_names_a_corrupt_parquet_and_leaves_no_folder(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not a parquet file" * 20)
    out = tmp_path / "shards"
    proc = run("prepare_data.py", "data=files", f"data.paths=[{bad}]", f"prepare.output_dir={out}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"error: data.paths ({bad}): could not be read: Parquet magic bytes" in proc.stderr
    assert not out.exists()


def test_train_tokenizer_checks_its_options_before_training(tmp_path):
    corpus, _ = web_corpus(tmp_path)
    base = ["data=files", f"data.paths=[{corpus}]", f"data.cache_dir={tmp_path / 'cache'}"]
    folder = run("train_tokenizer.py", *base, f"tokenizer_training.output={tmp_path}")
    assert folder.returncode == 2, folder.stderr[-3000:]  # before: IsADirectoryError after training
    assert f"error: tokenizer_training.output={tmp_path} is a folder" in folder.stderr
    heldout = run("train_tokenizer.py", *base, "tokenizer_training.heldout_bytes=-1")
    assert (
        heldout.returncode == 2 and "error: tokenizer_training.heldout_bytes=-1 must be > 0" in heldout.stderr
    )


def test_trainer_trains_on_memory_mapped_shards(tiny_config, tmp_path):
    corpus, _ = web_corpus(tmp_path)
    args = ["data=files", f"data.paths=[{corpus}]", "data.tokenizer.vocab_size=400", "data.val_fraction=0.2",
            f"prepare.output_dir={tmp_path / 'shards'}", "prepare.workers=1", "prepare=minimal"]  # fmt: skip
    assert run("prepare_data.py", *args).returncode == 0
    shards = shard_corpus(tmp_path / "shards")
    cfg = tiny_config("decoder", "trainer.max_steps=30")
    trainer = Trainer(cfg, corpus=shards)  # today's hook; with data.shards the trainer opens it itself
    result = trainer.fit()
    assert result["val_loss"] < result["initial_val_loss"] - 1.0
    # the same shards through the mixture loader the trainer would build for data.mixture
    pipeline = build_loaders(
        MixtureDataConfig(mixture=[MixtureSource(str(tmp_path / "shards"), 1.0)]), 33, 8, seed=0
    )
    assert np.isin(pipeline.train_loader.next_batch().numpy(), np.asarray(shards.train)).all()


def test_training_config_names_shards_and_a_weighted_mixture(tiny_config, tmp_path):
    """data.shards and data.mixture from the real config tree; the mixture's realised shares are logged."""
    corpus, _ = web_corpus(tmp_path)
    common = [
        "data=files",
        "data.tokenizer.vocab_size=400",
        "data.val_fraction=0.2",
        "prepare.workers=1",
        "prepare=minimal",
    ]
    assert (
        run(
            "prepare_data.py", *common, f"data.paths=[{corpus}]", f"prepare.output_dir={tmp_path / 'a'}"
        ).returncode
        == 0
    )
    tokenizer = tmp_path / "a" / "tokenizer.json"
    other = write_jsonl(tmp_path / "other.jsonl", [f"other text number {i} " * 40 for i in range(60)])
    second = run(
        "prepare_data.py",
        *common,
        f"data.paths=[{other}]",
        f"data.tokenizer.path={tokenizer}",
        f"prepare.output_dir={tmp_path / 'b'}",
    )
    assert second.returncode == 0, second.stderr[-2000:]

    single = Trainer(
        tiny_config("decoder", f"data.shards={tmp_path / 'a'}", "trainer.max_steps=4", "run_name=shards")
    )
    assert np.array_equal(np.asarray(single.corpus.train), np.asarray(shard_corpus(tmp_path / "a").train))

    mixture = f"data.mixture=[{{path:{tmp_path / 'a'},weight:0.75,name:web}},{{path:{tmp_path / 'b'},weight:0.25,name:other}}]"
    trainer = Trainer(
        tiny_config(
            "decoder", mixture, f"data.tokenizer.path={tokenizer}", "trainer.max_steps=20", "run_name=mix"
        )
    )
    trainer.fit()
    last = [
        json.loads(line)
        for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ][-1]
    assert last["data/web"] == pytest.approx(0.75, abs=0.02) and last["data/other"] == pytest.approx(
        0.25, abs=0.02
    )
