"""Encoder-only model (BERT style): bidirectional stack + MLM head."""

from __future__ import annotations

import torch
from torch import nn

from llmtrain.models.blocks import Stack
from llmtrain.models.config import ModelConfig
from llmtrain.models.heads import IGNORE_INDEX, LanguageModel, ModelOutput, lm_loss


class EncoderMLM(LanguageModel):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.encoder = Stack(cfg, cfg.n_layers, causal=False)
        self.tie_weights()

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.encoder.embed

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        label_positions: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Without labels, logits for every position; with labels, the head runs only where a label is set
        (about 15% of positions), as ModernBERT does, and logits are (N, V) for those N positions, in
        row-major order. document_ids (B, T) restrict attention to each token's own document (packed windows).

        label_positions (N,): the flat indices (into B * T) of the labelled positions, as the MLM objective
        emits them from the CPU. Without them they are found here, which makes a CUDA device wait for the
        encoder (the count of positions decides the head's shape) once per step."""
        h = self.encoder(input_ids, attention_mask=attention_mask, document_ids=document_ids)  # (B, T, d)
        if labels is None:
            return ModelOutput(self.head(h))
        labels = labels.reshape(-1)
        if label_positions is None:
            label_positions = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        logits = self.head(h.reshape(-1, h.shape[-1]).index_select(0, label_positions))  # (N, V)
        loss, n = lm_loss(logits, labels.index_select(0, label_positions), self.compiled_loss)
        return ModelOutput(logits, loss, n)
