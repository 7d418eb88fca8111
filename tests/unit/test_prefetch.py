"""The background prefetcher: an error of the loader reaches the training thread, and close() never hangs."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from llmtrain.data.prefetch import Prefetcher


class FiniteLoader:
    """n batches, then the error a source that has run out raises."""

    def __init__(self, n: int):
        self.n, self.i = n, 0

    def next_batch(self) -> torch.Tensor:
        if self.i >= self.n:
            raise RuntimeError("source exhausted")
        self.i += 1
        return torch.full((2, 4), self.i)

    def state_dict(self) -> dict:
        return {"epoch": 0, "windows": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["windows"]


def prefetcher(n: int, depth: int) -> Prefetcher:
    return Prefetcher(FiniteLoader(n), lambda windows, rng: {"input_ids": windows}, torch.Generator(), depth)


@pytest.mark.parametrize(("consumed", "depth"), [(8, 2), (7, 3), (6, 2)])
def test_close_returns_when_the_loader_failed_ahead_with_the_queue_full(consumed, depth):
    """The data ran out `depth` batches past the last step: the producer's error must not block close()
    (the run would hang after its last step instead of saving)."""
    p = prefetcher(10, depth)
    assert [int(p.next()["input_ids"][0, 0]) for _ in range(consumed)] == list(range(1, consumed + 1))
    time.sleep(0.3)  # the producer fills the queue and meets the end of the data
    closing = threading.Thread(target=p.close, daemon=True)
    closing.start()
    closing.join(5)
    assert not closing.is_alive(), "close() hung"
    assert p.loader.i == consumed  # rewound to what was consumed


def test_the_loaders_error_reaches_the_consumer():
    p = prefetcher(3, 2)
    for _ in range(3):
        p.next()
    with pytest.raises(RuntimeError, match="source exhausted"):
        p.next()
    p.close()
