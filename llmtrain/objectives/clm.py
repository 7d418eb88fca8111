"""Causal language modelling: predict token t+1 from tokens <= t over packed windows."""

from __future__ import annotations

import torch


class CausalLM:
    family = "decoder"

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.raw_length = seq_len + 1  # one extra token so every input position has a next token
        self.target_length = seq_len

    def __call__(
        self, windows: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """windows (B, seq_len + 1) -> input_ids (B, seq_len), labels (B, seq_len)."""
        return {"input_ids": windows[:, :-1], "labels": windows[:, 1:]}
