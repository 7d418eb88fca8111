"""Batches built ahead of the training step in a background thread, resumable exactly.

Each queued batch carries the loader position and objective RNG state *after* it was made, which is the
state to resume from once that batch has been consumed: a checkpoint never counts batches that were only
prefetched.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from llmtrain.data.loader import WindowLoader


def pinned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous page-locked copy, so that `.to("cuda", non_blocking=True)` is one asynchronous copy
    (`pin_memory()` keeps a view's strides, and CUDA copies a non-contiguous tensor through pageable memory)."""
    if t.is_contiguous():
        return t.pin_memory()
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)


class Prefetcher:
    def __init__(
        self,
        loader: WindowLoader,
        objective: Callable[[torch.Tensor, torch.Generator], dict[str, torch.Tensor]],
        rng: torch.Generator,
        depth: int = 2,
        pin_memory: bool = False,
    ):
        self.loader, self.objective, self.rng = loader, objective, rng
        self.depth, self.pin_memory = depth, pin_memory
        self.wait_seconds = 0.0
        """Time the consumer spent blocked waiting for a batch (the data-loading stall)."""
        self._resume = self._snapshot()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def _snapshot(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict(), "rng": self.rng.get_state()}

    def _make(self) -> dict[str, torch.Tensor]:
        batch = self.objective(self.loader.next_batch(), self.rng)
        return {k: pinned(v) for k, v in batch.items()} if self.pin_memory else batch

    def _put(self, item: tuple) -> None:
        """Into the queue once there is room, or not at all once close() asks the producer to stop."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                self._put((self._make(), self._snapshot()))
        except BaseException as err:  # surfaces in the training thread (unless close() stops it first)
            self._put((err, None))

    def next(self) -> dict[str, torch.Tensor]:
        if self.depth <= 0:  # synchronous
            batch = self._make()
            self._resume = self._snapshot()
            return batch
        if self._thread is None:
            self._queue = queue.Queue(maxsize=self.depth)
            self._stop.clear()
            self._thread = threading.Thread(target=self._produce, name="llmtrain-prefetch", daemon=True)
            self._thread.start()
        start = time.perf_counter()
        batch, state = self._queue.get()
        self.wait_seconds += time.perf_counter() - start
        if state is None:
            raise batch
        self._resume = state
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Loader position and RNG state after the last batch consumed."""
        return {"loader": dict(self._resume["loader"]), "rng": self._resume["rng"].clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()
        self.loader.load_state_dict(state["loader"])
        self.rng.set_state(state["rng"])
        self._resume = self._snapshot()

    def close(self) -> None:
        """Stop the producer; batches it made ahead are dropped (the loader rewinds on the next load)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.loader.load_state_dict(self._resume["loader"])
            self.rng.set_state(self._resume["rng"])
