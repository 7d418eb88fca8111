"""Masked language modelling (BERT, Devlin et al. 2019): select, then mask / randomise / keep."""

from __future__ import annotations

import torch

from llmtrain.models.heads import IGNORE_INDEX
from llmtrain.objectives.documents import document_ids


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
        if not 0 < select_rate < 1:
            raise ValueError(f"objective.select_rate={select_rate} must be in (0, 1)")
        if mask_rate < 0 or random_rate < 0 or mask_rate + random_rate > 1:
            raise ValueError(
                f"objective.mask_rate={mask_rate} and objective.random_rate={random_rate} must be >= 0 "
                "and sum to at most 1 (the rest stay unchanged)"
            )
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

    def __call__(
        self, windows: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """windows (B, T) -> input_ids with corruptions, labels = original token at selected positions else -100."""
        tokens = windows
        u = torch.rand(tokens.shape, generator=generator)
        selectable = ~torch.isin(tokens, self.special)
        selected = (u < self.select_rate) & selectable
        # One more uniform decides what a selected token becomes: [MASK] / random / unchanged.
        v = torch.rand(tokens.shape, generator=generator)
        to_mask = selected & (v < self.mask_rate)
        to_random = selected & (v >= self.mask_rate) & (v < self.mask_rate + self.random_rate)
        random_ids = self.ordinary_ids[
            torch.randint(len(self.ordinary_ids), tokens.shape, generator=generator)
        ]
        input_ids = torch.where(to_mask, torch.full_like(tokens, self.mask_token_id), tokens)
        input_ids = torch.where(to_random, random_ids, input_ids)
        labels = torch.where(selected, tokens, torch.full_like(tokens, IGNORE_INDEX))
        batch = {"input_ids": input_ids, "labels": labels}
        if self.document_eos_id is not None:
            batch["document_ids"] = document_ids(tokens, self.document_eos_id)
        return batch
