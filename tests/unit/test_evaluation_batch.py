"""Evaluation batches: the objective per window, seeded by the window, stacked back."""

from __future__ import annotations

import torch

from llmtrain.objectives import MaskedLM, SpanCorruption
from llmtrain.objectives.evaluation import evaluation_batch

VOCAB, PAD, EOS, MASK = 300, 0, 1, 3
SENTINELS = [VOCAB - 1 - i for i in range(40)]


def test_masks_follow_the_window_not_the_batch():
    windows = torch.randint(10, VOCAB - 40, (6, 32), generator=torch.Generator().manual_seed(0))
    mlm = MaskedLM(32, VOCAB, MASK, [PAD, EOS, MASK])
    whole = evaluation_batch(mlm, windows, seed=7)
    halves = [evaluation_batch(mlm, windows[rows], seed=7) for rows in (slice(0, 3), slice(3, 6))]
    for key in ("input_ids", "labels"):
        assert torch.equal(whole[key], torch.cat([h[key] for h in halves]))
    # flat label positions index the stacked batch: they pick the labelled tokens
    flat = whole["labels"].reshape(-1)
    assert torch.equal(whole["label_positions"], (flat != -100).nonzero().squeeze(1))
    assert not torch.equal(evaluation_batch(mlm, windows, seed=8)["labels"], whole["labels"])  # seed matters
    span = SpanCorruption(24, SENTINELS, EOS, PAD, PAD)
    windows = torch.randint(10, VOCAB - 40, (4, span.raw_length), generator=torch.Generator().manual_seed(1))
    whole = evaluation_batch(span, windows, seed=7)
    reversed_rows = evaluation_batch(span, windows.flip(0), seed=7)
    for key in ("input_ids", "decoder_input_ids", "labels"):
        assert torch.equal(whole[key], reversed_rows[key].flip(0))
