"""Causal language modelling: predict token t+1 from tokens <= t over packed windows."""

from __future__ import annotations

import torch

from llmtrain.objectives.documents import document_ids


class CausalLM:
    family = "decoder"
    random = False  # the same batch whatever the generator (evaluation_batch need not go window by window)

    def __init__(self, seq_len: int, document_eos_id: int | None = None):
        """document_eos_id: emit `document_ids` (documents end with this token) for document-aware attention."""
        self.seq_len = seq_len
        self.document_eos_id = document_eos_id
        self.raw_length = seq_len + 1  # one extra token so every input position has a next token
        self.target_length = seq_len

    def __call__(
        self, windows: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """windows (B, seq_len + 1) -> input_ids (B, seq_len), labels (B, seq_len)."""
        # contiguous: a strided view would be pinned as it is and then copied to CUDA through pageable memory
        batch = {"input_ids": windows[:, :-1].contiguous(), "labels": windows[:, 1:].contiguous()}
        if self.document_eos_id is not None:
            batch["document_ids"] = document_ids(batch["input_ids"], self.document_eos_id)
        return batch
