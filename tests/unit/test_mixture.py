"""Mixtures: proportions, a rank-independent global order, exact resume (also at another world size), the
exhaustion policy, and the loaders built from a data config over prepared shards."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from llmtrain.config import DataConfig, TokenizerConfig
from llmtrain.data import WindowLoader
from llmtrain.data.mixture import (
    MixtureExhausted,
    MixtureLoader,
    MixtureSource,
    SourceTokens,
    build_loaders,
    smooth_round_robin,
)
from llmtrain.data.shards import PrepareConfig, prepare_shards
from llmtrain.data.sources import DataError
from tests.conftest import write_jsonl
from tests.unit.test_curation import prose
from tests.unit.test_shards import prep_config

L = 8  # raw window length


def source(name: str, index: int, n_windows: int, weight: float, max_epochs=None) -> SourceTokens:
    """Tokens whose every window starts with index * 100000 + window number: the window tells where it came from."""
    tokens = np.repeat(index * 100_000 + np.arange(n_windows, dtype=np.int64), L)
    return SourceTokens(name, tokens, weight, max_epochs)


def sources(weights=(0.5, 0.3, 0.2), sizes=(3000, 800, 50)) -> list[SourceTokens]:
    return [source(f"s{i}", i, n, w) for i, (n, w) in enumerate(zip(sizes, weights))]


def drawn(batch: torch.Tensor) -> list[tuple[int, int]]:
    first = batch[:, 0].tolist()
    return [(v // 100_000, v % 100_000) for v in first]


def test_proportions_within_two_percent_over_10000_windows():
    loader = MixtureLoader(sources(), L, batch_size=10, seed=0)
    counts = np.zeros(3)
    for _ in range(1000):
        for s, _ in drawn(loader.next_batch()):
            counts[s] += 1
    assert counts.sum() == 10_000
    assert np.all(np.abs(counts / counts.sum() - [0.5, 0.3, 0.2]) < 0.02)
    assert loader.proportions() == pytest.approx({"s0": 0.5, "s1": 0.3, "s2": 0.2}, abs=0.001)


def test_smooth_round_robin_stays_within_one_window_of_every_share():
    weights, counts = np.array([0.51, 0.49]), np.zeros(2, dtype=np.int64)
    for step in range(1, 200):
        smooth_round_robin(weights, counts, 7)
        assert np.all(np.abs(counts - weights * 7 * step) <= 1)


def test_each_pass_of_a_source_sees_every_window_once():
    loader = MixtureLoader(sources(sizes=(300, 80, 50)), L, batch_size=10, seed=1)
    seen = {0: [], 1: [], 2: []}
    for _ in range(200):
        for s, w in drawn(loader.next_batch()):
            seen[s].append(w)
    for s, n in ((0, 300), (1, 80), (2, 50)):
        counts = np.bincount(seen[s], minlength=n)
        assert len(seen[s]) >= n and counts.max() - counts.min() <= 1, s  # k full passes, part of the next
        assert seen[s][:10] != seen[s][n : n + 10]  # each pass is reshuffled


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_together_read_the_global_order_once(world_size):
    """At a fixed global batch, the ranks' batches put side by side are the one-rank batch."""
    single = MixtureLoader(sources(), L, batch_size=8, seed=3)
    ranks = [
        MixtureLoader(sources(), L, batch_size=8 // world_size, seed=3, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    for _ in range(60):
        together = torch.cat([loader.next_batch() for loader in ranks])
        assert torch.equal(together, single.next_batch())


def test_one_source_epoch_covers_every_window_exactly_once_across_ranks():
    for world_size in (1, 2, 4):
        loaders = [
            MixtureLoader(
                [source("a", 0, 64, 1.0)],
                L,
                batch_size=16 // world_size,
                seed=5,
                rank=r,
                world_size=world_size,
            )
            for r in range(world_size)
        ]
        windows = [
            w
            for loader in loaders
            for _ in range(loader.batches_per_epoch)
            for _, w in drawn(loader.next_batch())
        ]
        assert sorted(windows) == list(range(64)), world_size


def test_resume_gives_the_same_next_batch():
    a = MixtureLoader(sources(), L, batch_size=6, seed=7)
    for _ in range(137):  # the small source is past its first pass
        a.next_batch()
    state = a.state_dict()
    b = MixtureLoader(sources(), L, batch_size=6, seed=7)
    b.load_state_dict(state)
    for _ in range(5):
        assert torch.equal(a.next_batch(), b.next_batch())


def test_resume_at_another_world_size_continues_from_the_same_position():
    two = [
        MixtureLoader([source("a", 0, 96, 1.0)], L, batch_size=4, seed=9, rank=r, world_size=2)
        for r in range(2)
    ]
    before = [
        w for _ in range(5) for loader in two for _, w in drawn(loader.next_batch())
    ]  # 40 of 96 windows
    state = two[0].state_dict()
    four = [
        MixtureLoader([source("a", 0, 96, 1.0)], L, batch_size=2, seed=9, rank=r, world_size=4)
        for r in range(4)
    ]
    for loader in four:
        loader.load_state_dict(state)
    after = [w for _ in range(7) for loader in four for _, w in drawn(loader.next_batch())]  # the other 56
    assert sorted(before + after) == list(range(96))


def test_window_loader_style_reset_restarts_from_the_top():
    loader = MixtureLoader(sources(), L, batch_size=4, seed=0, shuffle=False)
    first = loader.next_batch()
    loader.next_batch()
    loader.load_state_dict({"epoch": 0, "windows": 0})  # what the trainer does before every evaluation
    assert torch.equal(loader.next_batch(), first)
    replayed = MixtureLoader(sources(), L, batch_size=4, seed=0, shuffle=False)
    replayed.load_state_dict({"epoch": 0, "windows": 8})  # position only: the schedule is replayed to it
    loader.next_batch()
    assert torch.equal(replayed.next_batch(), loader.next_batch())


def test_exhausted_source_stops_or_repeats_with_a_warning(caplog):
    limited = [source("big", 0, 1000, 0.5), source("small", 1, 10, 0.5, max_epochs=1)]
    loader = MixtureLoader(limited, L, batch_size=4, seed=0)
    for _ in range(5):  # 10 windows of "small"
        loader.next_batch()
    with pytest.raises(MixtureExhausted, match=r"source small ran out after 1 epochs \(max_epochs=1\)"):
        loader.next_batch()
    repeating = MixtureLoader(
        [source("big", 0, 1000, 0.5), source("small", 1, 10, 0.5)], L, batch_size=4, seed=0
    )
    with caplog.at_level(logging.WARNING, logger="llmtrain.data.mixture"):
        for _ in range(8):
            repeating.next_batch()
    assert "data.mixture source small: all 10 windows seen; starting pass 2" in caplog.text


def test_bad_mixtures_are_named():
    with pytest.raises(DataError, match=r"data.mixture\[1\] \(s1\): the train split has 4 tokens"):
        MixtureLoader([source("s0", 0, 10, 1.0), SourceTokens("s1", np.zeros(4), 1.0)], L, 2, seed=0)
    with pytest.raises(DataError, match="weights"):
        MixtureLoader([source("s0", 0, 10, -1.0)], L, 2, seed=0)
    loader = MixtureLoader(sources(), L, 2, seed=0)
    with pytest.raises(DataError, match="resumes only with the same sources in the same order"):
        loader.load_state_dict({"epoch": 0, "windows": 4, "source_windows": [2, 2]})


def test_a_resume_with_the_sources_reordered_or_renamed_is_refused():
    """The saved per-source counts belong to sources by position: loaded into [s1, s0, s2] they would give s1
    s0's count (it was accepted, as the number of sources matched); new weights are fine."""
    loader = MixtureLoader(sources(), L, batch_size=4, seed=0)
    for _ in range(3):
        loader.next_batch()
    state = loader.state_dict()
    assert state["sources"] == ["s0", "s1", "s2"]
    s0, s1, s2 = sources()
    for changed in ([s1, s0, s2], [s0, s1, source("other", 2, 50, 0.2)]):
        with pytest.raises(DataError, match=r"sources are \['s0', 's1', 's2'\], the config's"):
            MixtureLoader(changed, L, batch_size=4, seed=0).load_state_dict(state)
    reweighted = MixtureLoader(sources(weights=(0.2, 0.3, 0.5)), L, batch_size=4, seed=0)
    reweighted.load_state_dict(state)
    assert reweighted.counts.tolist() == state["source_windows"]


def test_a_fractional_max_epochs_stops_inside_the_pass():
    """max_epochs=0.5 of a 10-window source allows 5 windows and 1.5 allows 15 (it allowed 10 and 20)."""
    for limit, allowed in ((0.5, 5), (1.5, 15), (1, 10)):
        loader = MixtureLoader([source("small", 0, 10, 1.0, max_epochs=limit)], L, batch_size=1, seed=0)
        for _ in range(allowed):
            loader.next_batch()
        with pytest.raises(MixtureExhausted, match=f"ran out after {limit} epochs"):
            loader.next_batch()


def test_a_negative_seed_draws_as_its_value_modulo_2_to_the_64():
    """The trainer takes any integer seed; numpy's seeding refuses negative ones (the first batch crashed)."""
    negative = MixtureLoader(sources(), L, batch_size=4, seed=-1)
    wrapped = MixtureLoader(sources(), L, batch_size=4, seed=2**64 - 1)
    other = MixtureLoader(sources(), L, batch_size=4, seed=1)
    batches = [(negative.next_batch(), wrapped.next_batch(), other.next_batch()) for _ in range(5)]
    assert all(torch.equal(a, b) for a, b, _ in batches)
    assert not all(torch.equal(a, c) for a, _, c in batches)


def test_logged_shares_count_the_batches_trained_on_not_those_prefetched():
    """Weights 1:1, one window a batch: after 5 batches the trained shares are 3:2 (0.6), whatever the
    prefetch thread has drawn ahead; proportions() of the loader itself counted the prefetched ones too."""
    import time

    from llmtrain.data.prefetch import Prefetcher

    loader = MixtureLoader([source("a", 0, 100, 1.0), source("b", 1, 100, 1.0)], L, batch_size=1, seed=0)
    prefetcher = Prefetcher(loader, lambda windows, rng: {"x": windows}, torch.Generator(), depth=3)
    trained = [drawn(prefetcher.next()["x"])[0][0] for _ in range(5)]
    deadline = time.monotonic() + 10
    while not prefetcher._queue.full() and time.monotonic() < deadline:  # let the producer run ahead
        time.sleep(0.01)
    shares = loader.proportions(prefetcher.state_dict()["loader"])
    assert loader.counts.sum() > 5  # drawn ahead
    prefetcher.close()
    assert shares == {"a": trained.count(0) / 5, "b": trained.count(1) / 5}
    assert sorted(shares.values()) == [0.4, 0.6]


# -- from a data config over prepared shards ----------------------------------------------------------------


@dataclass
class MixtureDataConfig(DataConfig):
    """DataConfig with the two fields this module asks the config schema for."""

    shards: str | None = None
    mixture: list[MixtureSource] = field(default_factory=list)


def test_build_loaders_from_shards_and_mixtures(tmp_path):
    cache = tmp_path / "cache"
    folders = []
    tokenizer_path = None
    for i in range(2):
        corpus = write_jsonl(
            tmp_path / f"d{i}.jsonl", [prose(3000 + 100 * i + j, paragraphs=2) for j in range(40)]
        )
        data = MixtureDataConfig(
            name=f"d{i}", source="files", paths=[str(corpus)], cache_dir=str(cache), val_fraction=0.25,
            tokenizer=TokenizerConfig(vocab_size=400, path=tokenizer_path),
        )  # fmt: skip
        prep: PrepareConfig = prep_config(tmp_path / f"shards{i}")
        prepare_shards(data, prep)
        folders.append(str(tmp_path / f"shards{i}"))
        tokenizer_path = str(tmp_path / "shards0" / "tokenizer.json")  # the second source reuses the first's

    single = build_loaders(MixtureDataConfig(shards=folders[0]), raw_length=16, batch_size=4, seed=0)
    assert isinstance(single.train_loader, WindowLoader)
    assert single.corpus.tokenizer_path == tmp_path / "shards0" / "tokenizer.json"
    assert single.train_loader.next_batch().shape == (4, 16)

    mix = [MixtureSource(folders[0], 0.7, "a"), MixtureSource(folders[1], 0.3, "b")]
    pipeline = build_loaders(
        MixtureDataConfig(mixture=mix), raw_length=16, batch_size=4, seed=0, rank=1, world_size=2
    )
    assert isinstance(pipeline.train_loader, MixtureLoader) and isinstance(pipeline.val_loader, MixtureLoader)
    vocab = pipeline.corpus.tokenizer.vocab_size
    for _ in range(20):
        batch = pipeline.train_loader.next_batch()
        assert batch.shape == (4, 16) and batch.dtype == torch.int64 and int(batch.max()) < vocab
    assert pipeline.train_loader.proportions()["a"] == pytest.approx(0.7, abs=0.02)
    assert pipeline.val_loader.next_batch().shape == (4, 16)
    # two sources of one name (given, or their folders') would share one logged share and one resume slot
    same = [MixtureSource(folders[0], 0.5, "a"), MixtureSource(folders[1], 0.5, "a")]
    with pytest.raises(DataError, match=r"data.mixture\[1\] is named 'a', as an earlier source is"):
        build_loaders(MixtureDataConfig(mixture=same), raw_length=16, batch_size=4, seed=0)

    # a source made with another tokenizer is refused, naming the sources
    prepare_shards(
        MixtureDataConfig(name="d2", source="files", paths=[str(tmp_path / "d1.jsonl")], cache_dir=str(cache),
                          val_fraction=0.25, tokenizer=TokenizerConfig(vocab_size=500)),
        prep_config(tmp_path / "other"),
    )  # fmt: skip
    bad = mix + [MixtureSource(str(tmp_path / "other"), 0.1)]
    with pytest.raises(DataError, match="different tokenizers"):
        build_loaders(MixtureDataConfig(mixture=bad), raw_length=16, batch_size=4, seed=0)
    with pytest.raises(DataError, match="has no manifest.json|does not exist"):
        build_loaders(
            MixtureDataConfig(shards=str(tmp_path / "nowhere")), raw_length=16, batch_size=4, seed=0
        )
    assert dataclasses.is_dataclass(MixtureSource)
