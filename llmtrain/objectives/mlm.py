"""Masked language modelling (BERT, Devlin et al. 2019): select, then mask / randomise / keep."""

from __future__ import annotations

import numpy as np
import torch

from llmtrain.models.heads import IGNORE_INDEX
from llmtrain.objectives.documents import document_ids


def check_mlm_rates(select_rate: float, mask_rate: float, random_rate: float) -> None:
    if not 0 < select_rate < 1:
        raise ValueError(f"objective.select_rate={select_rate} must be in (0, 1)")
    if not (mask_rate >= 0 and random_rate >= 0 and mask_rate + random_rate <= 1):
        raise ValueError(
            f"objective.mask_rate={mask_rate} and objective.random_rate={random_rate} must be >= 0 "
            "and sum to at most 1 (the rest stay unchanged)"
        )


class MaskedLM:
    family = "encoder"

    def __init__(
        self,
        seq_len: int,
        vocab_size: int,
        mask_token_id: int,
        special_token_ids: list[int],
        select_rate: float = 0.15,
        mask_rate: float = 0.8,
        random_rate: float = 0.1,
        document_eos_id: int | None = None,
    ):
        check_mlm_rates(select_rate, mask_rate, random_rate)
        self.seq_len = self.raw_length = seq_len
        self.target_length = seq_len
        self.vocab_size, self.mask_token_id = vocab_size, mask_token_id
        self.document_eos_id = document_eos_id  # set: emit document_ids for document-aware attention
        self.select_rate, self.mask_rate, self.random_rate = select_rate, mask_rate, random_rate
        self.special = torch.tensor(sorted(set(special_token_ids)), dtype=torch.long)
        # random replacements are drawn from ordinary tokens only
        ordinary = torch.ones(vocab_size, dtype=torch.bool)
        ordinary[self.special[self.special < vocab_size]] = False
        self.ordinary_ids = ordinary.nonzero().squeeze(1)
        # numpy for the per-batch arithmetic (a fraction of torch's per-call cost on the CPU); a lookup table
        # for "is special", one entry longer than any id it knows, which ids beyond it share (not special)
        self._is_special = np.zeros(max(vocab_size, int(self.special.max()) + 1) + 1, dtype=bool)
        self._is_special[self.special.numpy()] = True
        self._ordinary = self.ordinary_ids.numpy()

    def __call__(
        self, windows: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """windows (B, T) -> input_ids with corruptions, labels = original token at selected positions else
        -100, and label_positions = the flat indices of the selected positions (so the model's head needs no
        host sync to find them)."""
        # the generator's stream, window by window: selection, what a selected token becomes, its random id;
        # so a window's masks do not depend on how windows are split into micro-batches (8 x 1 = 4 x 2)
        draws = torch.rand((windows.shape[0], 3, windows.shape[1]), generator=generator).numpy()
        u, v = draws[:, 0], draws[:, 1]
        n = len(self._ordinary)
        random_ids = self._ordinary[np.minimum((draws[:, 2] * n).astype(np.int64), n - 1)]
        tokens = windows.numpy()
        selected = (u < self.select_rate) & ~np.take(self._is_special, tokens, mode="clip")
        to_mask = selected & (v < self.mask_rate)
        to_random = selected & (v >= self.mask_rate) & (v < self.mask_rate + self.random_rate)
        input_ids = np.where(to_mask, self.mask_token_id, np.where(to_random, random_ids, tokens))
        labels = np.where(selected, tokens, IGNORE_INDEX)
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "label_positions": torch.from_numpy(np.flatnonzero(selected)),
        }
        if self.document_eos_id is not None:
            batch["document_ids"] = document_ids(windows, self.document_eos_id)
        return batch
