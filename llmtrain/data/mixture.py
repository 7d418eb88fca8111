"""Domain mixtures: windows drawn from several prepared shard sets in configured proportions.

The global order is fixed by the seed and does not depend on the number of ranks: slot g of the global window
sequence goes to the source with the largest deficit w_s * (g + 1) - drawn_s (smooth weighted round robin, so
after any number of windows every source is within one window of its share), and slots are shuffled within each
global batch so a rank's part of the batch is not tied to a source. Source s's k-th window is window
perm_{s,e}[k mod n_s] of its pass e = k // n_s, a seeded permutation per pass. Rank r of R takes slots
[r * B, (r + 1) * B) of every global batch of R * B slots, so the ranks together see the global sequence once.

The loader's state is the global position and the windows drawn per source, so a resumed run continues exactly,
at the same or at another number of ranks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from llmtrain.data.loader import Corpus, WindowLoader, epoch_batches, prepare_corpus
from llmtrain.data.sources import DataError
from llmtrain.data.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class MixtureSource:
    """One entry of data.mixture (the lead's DataConfig holds a list of these, or of an identical class)."""

    path: str
    """A shard directory made by scripts/prepare_data.py."""
    weight: float = 1.0
    """Share of the windows (weights are normalised to sum to 1)."""
    name: str | None = None
    """Label in logs and proportions (default: the directory name)."""
    max_epochs: float | None = None
    """Passes over this source before the run stops with an error (null: repeat as often as needed)."""


@dataclass
class SourceTokens:
    """A source as the loader sees it: its tokens (ndarray or shards.TokenArray) and mixing settings."""

    name: str
    tokens: object
    weight: float
    max_epochs: float | None = None
    n_windows: int = field(default=0, init=False)


class MixtureExhausted(DataError):
    """A source reached its max_epochs (data.mixture[i].max_epochs) with the policy to stop."""


def smooth_round_robin(weights: Sequence[float], counts: np.ndarray, n: int) -> list[int]:
    """The sources of the next n slots, updating counts (windows drawn so far, per source) in place."""
    w, c = [float(x) for x in weights], [int(x) for x in counts]
    slot = sum(c)
    out = []
    for _ in range(n):
        slot += 1
        deficits = [wi * slot - ci for wi, ci in zip(w, c)]
        s = deficits.index(max(deficits))  # ties: the first source
        c[s] += 1
        out.append(s)
    counts[:] = c
    return out


class MixtureLoader:
    """WindowLoader's interface (next_batch, state_dict, load_state_dict, batches_per_epoch) over a mixture."""

    def __init__(
        self,
        sources: Sequence[SourceTokens],
        raw_length: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        name: str = "train",
        steps_of: int = 1,
    ):
        """steps_of: micro-batches per optimizer step; an epoch is a whole number of steps (`epoch_batches`)."""
        if not sources:
            raise DataError("data.mixture is empty; list at least one source")
        self.sources, self.raw_length, self.batch_size = list(sources), raw_length, batch_size
        self.seed, self.shuffle, self.rank, self.world_size, self.name = seed, shuffle, rank, world_size, name
        self.entropy = seed % 2**64  # numpy's seeding takes non-negative ints; the same for seeds >= 0
        weights = np.array([s.weight for s in self.sources], dtype=np.float64)
        if not (np.all(weights >= 0) and weights.sum() > 0 and np.all(np.isfinite(weights))):
            raise DataError(f"data.mixture weights {weights.tolist()} must be >= 0 with a positive sum")
        self.weights = weights / weights.sum()
        for i, source in enumerate(self.sources):
            source.n_windows = len(source.tokens) // raw_length
            if source.n_windows == 0 and self.weights[i] > 0:
                raise DataError(
                    f"data.mixture[{i}] ({source.name}): the {name} split has {len(source.tokens)} tokens, fewer than "
                    f"one window of {raw_length}; add data, lower its weight to 0 or lower data.seq_len"
                )
        self.global_batch = batch_size * world_size
        total = sum(s.n_windows for s in self.sources)
        self.batches_per_epoch = epoch_batches(total, self.global_batch, steps_of)
        if self.batches_per_epoch == 0:
            raise DataError(
                f"data: the {name} mixture has {total} windows, fewer than one batch of {self.global_batch}; add data "
                "or lower data.seq_len / trainer.micro_batch_size"
            )
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        self.load_state_dict({"epoch": 0, "windows": 0})

    # -- order ----------------------------------------------------------------------------------------------

    def _permutation(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        if key not in self._perms:
            n = self.sources[source].n_windows
            if self.shuffle:
                rng = np.random.default_rng([self.entropy, source, epoch])
                perm = rng.permutation(n).astype(np.int64)
            else:
                perm = np.arange(n, dtype=np.int64)
            self._perms = {k: v for k, v in self._perms.items() if k[0] != source or k[1] >= epoch - 1}
            self._perms[key] = perm
        return self._perms[key]

    def _window(self, source: int, k: int) -> int:
        """Index of source's k-th drawn window (k from 0)."""
        n = self.sources[source].n_windows
        epoch = k // n
        limit = self.sources[source].max_epochs
        if limit is not None and k >= limit * n:  # a fractional limit stops inside a pass
            raise MixtureExhausted(
                f"data.mixture source {self.sources[source].name} ran out after {limit} epochs "
                f"(max_epochs={limit}) at global window {self.windows}; raise its max_epochs (null repeats) or lower "
                "trainer.max_steps"
            )
        if epoch > self._warned[source]:
            self._warned[source] = epoch
            if self.name == "train":
                log.warning(
                    "data.mixture source %s: all %d windows seen; starting pass %d",
                    self.sources[source].name,
                    n,
                    epoch + 1,
                )
        return int(self._permutation(source, epoch)[k % n])

    def _global_batch(self) -> list[tuple[int, int]]:
        """(source, window) of each slot of the next global batch; advances the state."""
        counts_before = self.counts.copy()
        slots = smooth_round_robin(self.weights, self.counts, self.global_batch)
        drawn = counts_before.tolist()
        out = []
        for s in slots:  # k-th draw of source s, in schedule order
            out.append((s, self._window(s, drawn[s])))
            drawn[s] += 1
        if self.shuffle:  # seeded by the position, so any world size reproduces it from the state
            order = np.random.default_rng([self.entropy, self.windows, 7]).permutation(self.global_batch)
            out = [out[i] for i in order]
        self.windows += self.global_batch
        return out

    # -- WindowLoader interface -----------------------------------------------------------------------------

    def next_batch(self) -> torch.Tensor:
        """(batch_size, raw_length) int64 windows: this rank's part of the next global batch."""
        mine = self._global_batch()[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        L = self.raw_length
        rows = [np.asarray(self.sources[s].tokens[w * L : (w + 1) * L]) for s, w in mine]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    @property
    def epoch(self) -> int:
        return self.windows // (self.batches_per_epoch * self.global_batch)

    def state_dict(self) -> dict:
        """Global position (windows drawn by all ranks) and windows drawn per source."""
        return {
            "epoch": self.epoch,
            "windows": self.windows,
            "source_windows": self.counts.tolist(),
            "sources": [s.name for s in self.sources],
        }

    def load_state_dict(self, state: dict) -> None:
        """Accepts this loader's state or WindowLoader's {"epoch", "windows"} (windows within the epoch)."""
        if "source_windows" in state:
            counts = np.array(state["source_windows"], dtype=np.int64)
            names = [s.name for s in self.sources]
            saved = state.get("sources", names)  # checkpoints before the names were saved: the count only
            if len(counts) != len(self.sources) or saved != names:
                raise DataError(
                    f"the checkpoint's data.mixture sources are {saved if 'sources' in state else len(counts)}, "
                    f"the config's {names}; a run resumes only with the same sources in the same order (their "
                    "weights may change)"
                )
            windows = int(state["windows"])
        else:  # a position only: replay the schedule to it
            windows = int(state["epoch"]) * self.batches_per_epoch * self.global_batch + int(state["windows"])
            counts = np.zeros(len(self.sources), dtype=np.int64)
            smooth_round_robin(self.weights, counts, windows)
        self.windows, self.counts = windows, counts
        self._warned = [max(0, (int(c) - 1) // max(s.n_windows, 1)) for c, s in zip(counts, self.sources)]

    # -- reporting ------------------------------------------------------------------------------------------

    def proportions(self, state: dict | None = None) -> dict[str, float]:
        """Realised share of each source in the global sequence up to `state` (a state_dict: the position of
        the last batch trained on, where a prefetcher has drawn further), or so far; the configured shares
        before any draw."""
        counts = self.counts if state is None else np.array(state["source_windows"], dtype=np.int64)
        total = counts.sum()
        shares = counts / total if total else self.weights
        return {s.name: float(p) for s, p in zip(self.sources, shares)}

    def describe(self) -> str:
        parts = [
            f"{s.name} {w:.1%} of windows ({s.n_windows} windows, {s.n_windows / max(w * self.global_batch, 1e-9):.0f} "
            "global batches per pass)"
            for s, w in zip(self.sources, self.weights)
        ]
        return f"{self.name} mixture: " + "; ".join(parts)


# -- building the loaders from the data config ------------------------------------------------------------


@dataclass
class DataPipeline:
    corpus: Corpus
    """Tokenizer, tokenizer path, and the train / val tokens (of the first mixture source for a mixture)."""
    train_loader: WindowLoader | MixtureLoader | None
    val_loader: WindowLoader | MixtureLoader


def _mixture_sources(entries, split: str, configured_digest: str | None) -> tuple[list[SourceTokens], list]:
    from llmtrain.data.shards import open_shards

    sets, sources = [], []
    for i, entry in enumerate(entries):
        shard_set = open_shards(entry.path, configured_digest)
        if not math.isfinite(entry.weight):
            raise DataError(f"data.mixture[{i}].weight={entry.weight} must be finite")
        sets.append(shard_set)
        name = entry.name or shard_set.folder.name
        if name in (s.name for s in sources):
            raise DataError(
                f"data.mixture[{i}] is named {name!r}, as an earlier source is (by its name or its folder's); "
                f"set data.mixture[{i}].name to a name of its own (names label the logged shares and a resume)"
            )
        sources.append(SourceTokens(name, shard_set.split(split), entry.weight, entry.max_epochs))
    digests = {s.manifest["tokenizer"]["digest"] for s in sets}
    if len(digests) > 1:
        listing = ", ".join(f"{s.folder} ({s.manifest['tokenizer']['digest']})" for s in sets)
        raise DataError(
            f"data.mixture sources were made with different tokenizers: {listing}; prepare them all with one "
            "data.tokenizer.path"
        )
    return sources, sets


def load_corpus(data) -> Corpus:
    """The corpus the data config names: data.shards (a prepared set), data.mixture (its first source's
    tokenizer and val tokens), or the source tokenised here by prepare_corpus."""
    from llmtrain.data.shards import shard_corpus

    mixture, shards = getattr(data, "mixture", None), getattr(data, "shards", None)
    if mixture:
        return shard_corpus(mixture[0].path, data.tokenizer.path)
    if shards:
        return shard_corpus(shards, data.tokenizer.path)
    return prepare_corpus(data)


def build_loaders(
    data,
    raw_length: int,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    corpus: Corpus | None = None,
    train: bool = True,
    steps_of: int = 1,
) -> DataPipeline:
    """Corpus, train loader and val loader for a data config (llmtrain.config.DataConfig); train=False: the
    val loader only (evaluation: the train split need not hold a batch), train_loader None.

    With `data.mixture` (a list of entries with path, weight, name, max_epochs) both loaders are MixtureLoaders
    over the sources' train / val splits; every source must have been made with the same tokenizer. Otherwise
    they are WindowLoaders over `corpus` (load_corpus(data) when not given: data.shards or prepare_corpus).
    steps_of (trainer.grad_accum_steps): both loaders' epochs are whole optimizer steps (`epoch_batches`).
    """
    mixture = getattr(data, "mixture", None)
    if mixture:
        expected = load_tokenizer(data.tokenizer.path).digest() if data.tokenizer.path else None
        val_sources, sets = _mixture_sources(mixture, "val", expected)
        for source in val_sources:
            source.max_epochs = (
                None  # evaluation restarts from the top every time; it never exhausts a source
            )
        corpus = corpus or Corpus(
            sets[0].tokenizer(), sets[0].split("train"), sets[0].split("val"), sets[0].tokenizer_path
        )
        loader = None
        if train:
            sources, _ = _mixture_sources(mixture, "train", expected)
            loader = MixtureLoader(
                sources, raw_length, batch_size, seed, rank=rank, world_size=world_size, steps_of=steps_of
            )
            log.info("%s", loader.describe())
        val = MixtureLoader(
            val_sources,
            raw_length,
            batch_size,
            seed,
            shuffle=False,
            rank=rank,
            world_size=world_size,
            name="validation",
            steps_of=steps_of,
        )
        return DataPipeline(corpus, loader, val)
    corpus = corpus or load_corpus(data)
    loader = (
        WindowLoader(
            corpus.train, raw_length, batch_size, seed, rank=rank, world_size=world_size, steps_of=steps_of
        )
        if train
        else None
    )
    val = WindowLoader(
        corpus.val,
        raw_length,
        batch_size,
        seed,
        shuffle=False,
        rank=rank,
        world_size=world_size,
        name="validation",
        steps_of=steps_of,
    )
    return DataPipeline(corpus, loader, val)


def build_train_loader(data, raw_length: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
    """The training loader alone (see build_loaders)."""
    return build_loaders(data, raw_length, batch_size, seed, rank, world_size).train_loader
