"""Shared fixtures: a tiny synthetic corpus on disk, and the real Hydra configs composed and shrunk."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from llmtrain.config import TrainConfig, register_configs, to_dataclass

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
register_configs()

WORDS = {
    "adj": ["small", "red", "quick", "lazy", "bright", "old", "new", "quiet"],
    "noun": ["cat", "dog", "river", "house", "tree", "car", "bird", "stone"],
    "verb": ["sees", "likes", "follows", "finds", "moves", "paints", "hears", "builds"],
}


def synthetic_documents(n_docs: int, seed: int = 0) -> list[str]:
    """Documents of templated sentences: enough structure that a tiny model's loss falls quickly."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = [
            f"the {rng.choice(WORDS['adj'])} {rng.choice(WORDS['noun'])} {rng.choice(WORDS['verb'])} "
            f"the {rng.choice(WORDS['noun'])}."
            for _ in range(rng.randint(4, 10))
        ]
        docs.append(" ".join(sentences))
    return docs


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", synthetic_documents(400))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache for the session, so the tiny tokenizer is trained once."""
    return tmp_path_factory.mktemp("cache")


def tiny_overrides(corpus_file: Path, cache_dir: Path, output_dir: Path, model: str = "decoder") -> list[str]:
    """Overrides that shrink any family to a model that trains in seconds on the synthetic corpus."""
    seq_len = 48 if model == "encoder_decoder" else 32
    return [
        f"model={model}",
        "model.d_model=32",
        "model.n_layers=2",
        "model.n_heads=2",
        "model.max_seq_len=64",
        "data=files",
        f"data.paths=[{corpus_file}]",
        f"data.seq_len={seq_len}",
        "data.tokenizer.vocab_size=400",
        f"data.cache_dir={cache_dir}",
        "trainer.max_steps=40",
        "trainer.micro_batch_size=8",
        "trainer.eval_interval=0",
        "trainer.eval_batches=2",
        "trainer.log_interval=10",
        "trainer.progress=false",
        "trainer.sample_tokens=8",
        "trainer.precision=fp32",
        "optim.lr=3e-3",
        "optim.warmup_steps=5",
        "logger.wandb=disabled",
        f"output_dir={output_dir}",
        f"run_name={model}-test",
    ]


def compose_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.fixture
def tiny_config(corpus_file, cache_dir, tmp_path):
    """tiny_config(model, *extra_overrides) -> a validated TrainConfig of the real config tree, shrunk."""

    def make(model: str = "decoder", *extra: str) -> TrainConfig:
        return to_dataclass(
            compose_config(tiny_overrides(corpus_file, cache_dir, tmp_path / "runs", model) + list(extra))
        )

    return make
