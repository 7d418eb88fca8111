"""Evaluation batches whose randomness belongs to the windows, not to the layout that holds them."""

from __future__ import annotations

import hashlib

import torch


def window_seed(window: torch.Tensor, seed: int) -> int:
    """A 63-bit seed from a window's tokens and `seed`."""
    digest = hashlib.blake2b(window.contiguous().numpy().tobytes(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") ^ seed) & (2**63 - 1)


def evaluation_batch(objective, windows: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """The objective applied window by window, each window's randomness (MLM's selection, the spans) drawn
    from a generator seeded by its tokens and `seed`: the same masks whatever micro-batch, accumulation or
    world size holds the window, so every layout evaluates the same thing. Rows are stacked back; MLM's flat
    label_positions are offset to their row."""
    if not getattr(objective, "random", True):
        return objective(windows, None)
    rows = [objective(w[None], torch.Generator().manual_seed(window_seed(w, seed))) for w in windows]
    batch = {}
    for key in rows[0]:
        if key == "label_positions":  # flat indices into (1, T): into (B, T) at row i, + i * T
            width = rows[0]["labels"].shape[-1]
            batch[key] = torch.cat([row[key] + i * width for i, row in enumerate(rows)])
        else:
            batch[key] = torch.cat([row[key] for row in rows])
    return batch
