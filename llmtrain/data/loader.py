"""Corpus -> tokenizer -> cached token arrays -> packed windows, with a loader whose position can be saved."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmtrain.config import DataConfig
from llmtrain.data.sources import DataError, fingerprint, is_validation, iter_documents
from llmtrain.data.tokenizer import (
    Tokenizer,
    atomic_write_text,
    load_tokenizer,
    tokenizer_settings_key,
    train_bpe,
)

log = logging.getLogger(__name__)
ENCODE_BATCH = 512


@dataclass
class Corpus:
    tokenizer: Tokenizer
    train: np.ndarray
    """All training documents' tokens, each followed by EOS (uint16 when the vocabulary fits, else uint32)."""
    val: np.ndarray
    tokenizer_path: Path


def _training_texts(cfg: DataConfig, budget: int):
    used = 0
    for text in iter_documents(cfg):
        if is_validation(text, cfg.val_fraction):
            continue
        yield text
        used += len(text.encode("utf-8"))
        if used >= budget:
            return


def get_tokenizer(cfg: DataConfig, corpus_key: str) -> tuple[Tokenizer, Path]:
    """The configured tokenizer.json, or a byte-level BPE trained on this corpus once and then reused."""
    if cfg.tokenizer.path:
        return load_tokenizer(cfg.tokenizer.path), Path(cfg.tokenizer.path)
    t = cfg.tokenizer
    key = tokenizer_settings_key(
        corpus=corpus_key,
        vocab=t.vocab_size,
        min_freq=t.min_frequency,
        sentinels=t.n_sentinels,
        bytes=t.train_bytes,
    )
    path = Path(cfg.cache_dir) / "tokenizers" / key / "tokenizer.json"
    if path.is_file():
        log.info("tokenizer: reusing %s", path)
        return load_tokenizer(path), path
    log.info("tokenizer: training byte-level BPE (vocab %d) on up to %d bytes", t.vocab_size, t.train_bytes)
    tokenizer = train_bpe(_training_texts(cfg, t.train_bytes), t.vocab_size, t.min_frequency, t.n_sentinels)
    tokenizer.save(path)
    return tokenizer, path


def _encode_splits(cfg: DataConfig, tokenizer: Tokenizer) -> dict[str, np.ndarray]:
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    batch: list[str] = []

    def flush() -> None:
        for text, ids in zip(batch, tokenizer.encode_documents(batch)):
            split = "val" if is_validation(text, cfg.val_fraction) else "train"
            parts[split].append(np.array([*ids, tokenizer.eos_id], dtype=dtype))
        batch.clear()

    for text in iter_documents(cfg):
        batch.append(text)
        if len(batch) == ENCODE_BATCH:
            flush()
    flush()
    if not parts["train"] and not parts["val"]:
        raise DataError(f"data ({cfg.source}): no non-empty document found")
    if not parts["val"] or not parts["train"]:  # a tiny corpus: hold out its last document all the same
        docs = parts["train"] + parts["val"]
        if len(docs) < 2:
            raise DataError(f"data ({cfg.source}): one document only; need at least 2 for a train/val split")
        parts = {"train": docs[:-1], "val": docs[-1:]}
    return {split: np.concatenate(chunks) for split, chunks in parts.items()}


def prepare_corpus(cfg: DataConfig) -> Corpus:
    """Tokenizer plus train/val token arrays, cached under cache_dir keyed by corpus and tokenizer."""
    corpus_key = fingerprint(cfg)
    tokenizer, tokenizer_path = get_tokenizer(cfg, corpus_key)
    # v2: special-token text in a document is encoded as plain text (`Tokenizer.encode_documents`)
    folder = Path(cfg.cache_dir) / "tokens" / f"{corpus_key}-{tokenizer.digest()}-v2"
    meta_path = folder / "meta.json"
    if not meta_path.is_file():  # meta.json is written last: without it, nothing here counts
        log.info("data: tokenizing %s corpus into %s", cfg.source, folder)
        arrays = _encode_splits(cfg, tokenizer)
        folder.mkdir(parents=True, exist_ok=True)
        for split, array in arrays.items():
            tmp = folder / f".{split}.bin.tmp{os.getpid()}"
            array.tofile(tmp)
            os.replace(tmp, folder / f"{split}.bin")
        meta = {split: {"tokens": int(a.size), "dtype": a.dtype.name} for split, a in arrays.items()}
        meta["tokenizer"] = str(tokenizer_path)
        atomic_write_text(meta_path, json.dumps(meta, indent=1))
    meta = json.loads(meta_path.read_text())
    splits = {
        s: np.memmap(folder / f"{s}.bin", dtype=meta[s]["dtype"], mode="r", shape=(meta[s]["tokens"],))
        for s in ("train", "val")
    }
    return Corpus(tokenizer, splits["train"], splits["val"], tokenizer_path)


def epoch_batches(windows: int, global_micro_batch: int, steps_of: int) -> int:
    """Micro-batches per rank in an epoch of `windows`: whole optimizer steps of `steps_of` micro-batches of
    `global_micro_batch` windows (all ranks), or, with fewer windows than one step, whole micro-batches."""
    steps = windows // (global_micro_batch * steps_of)
    return steps * steps_of if steps else windows // global_micro_batch


class WindowLoader:
    """Non-overlapping windows of raw_length tokens, reshuffled every epoch by a seeded permutation.

    Its position (epoch, index) is part of a checkpoint, so a resumed run sees the same batches. With
    world_size > 1, rank r takes every world_size-th window of the same permutation. An epoch is a whole
    number of optimizer steps of `steps_of` micro-batches (gradient accumulation), so it ends at the same
    window in every layout of the same global batch (a resume at another world size follows the same order).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        raw_length: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        name: str = "train",
        steps_of: int = 1,
    ):
        self.tokens, self.raw_length, self.batch_size = tokens, raw_length, batch_size
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.n_windows = len(tokens) // raw_length
        if self.n_windows < batch_size * world_size:
            raise DataError(
                f"data: the {name} split has {len(tokens)} tokens, fewer than one batch of "
                f"{batch_size * world_size} windows x {raw_length} tokens; add data or lower data.seq_len / "
                "trainer.micro_batch_size"
            )
        self.batches_per_epoch = epoch_batches(self.n_windows, batch_size * world_size, steps_of)
        # the epoch's micro-batches start `start` windows into its order (0 unless resumed in mid-epoch from
        # another micro-batch x ranks)
        self.epoch, self.index, self.start = 0, 0, 0
        self._order = self._permutation()

    def _permutation(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n_windows)
        return torch.randperm(self.n_windows, generator=torch.Generator().manual_seed(self.seed + self.epoch))

    @property
    def batches_left(self) -> int:
        """Micro-batches of this epoch from `start` on: whole ones of this layout up to the epoch's end."""
        per_batch = self.batch_size * self.world_size
        return (self.batches_per_epoch * per_batch - self.start) // per_batch

    def next_batch(self) -> torch.Tensor:
        """(batch_size, raw_length) int64 windows."""
        if self.index == self.batches_left:
            self.epoch, self.index, self.start = self.epoch + 1, 0, 0
            self._order = self._permutation()
        first = self.start + (self.index * self.world_size + self.rank) * self.batch_size
        starts = self._order[first : first + self.batch_size].numpy() * self.raw_length
        self.index += 1
        windows = np.stack([self.tokens[s : s + self.raw_length] for s in starts]).astype(np.int64)
        return torch.from_numpy(windows)

    def state_dict(self) -> dict[str, int]:
        """Position as windows consumed by all ranks, so a run can resume at another world size."""
        return {"epoch": self.epoch, "windows": self.start + self.index * self.batch_size * self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at the next unread window of the epoch's order, whatever micro-batch x ranks read it
        before; the rest of the epoch is whole micro-batches of this layout (a shorter tail waits, as the
        tail of every epoch does, for a later epoch's order)."""
        self.epoch, self.index = int(state["epoch"]), 0
        self.start = min(int(state["windows"]), self.batches_per_epoch * self.batch_size * self.world_size)
        self._order = self._permutation()
