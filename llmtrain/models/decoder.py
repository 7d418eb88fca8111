"""Decoder-only language model (GPT style): causal stack + LM head, trained by next-token prediction."""

from __future__ import annotations

import torch
from torch import nn

from llmtrain.models.blocks import Stack
from llmtrain.models.cache import KVCache
from llmtrain.models.config import ModelConfig
from llmtrain.models.heads import LanguageModel, ModelOutput, lm_loss


class DecoderLM(LanguageModel):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.decoder = Stack(cfg, cfg.n_layers, causal=True)
        self.tie_weights()

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.decoder.embed

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> ModelOutput:
        """input_ids (B, T); labels (B, T) already shifted (labels[t] is the token after input_ids[t]);
        document_ids (B, T) restrict attention to each token's own document (packed windows)."""
        h = self.decoder(input_ids, attention_mask=attention_mask, document_ids=document_ids)
        logits = self.head(h)  # (B, T, V)
        if labels is None:
            return ModelOutput(logits)
        loss, n = lm_loss(logits, labels, self.compiled_loss)
        return ModelOutput(logits, loss, n)

    def new_cache(self) -> KVCache:
        return KVCache(len(self.decoder.layers))

    def decode_step(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, T, V) of input_ids that continue the cache.length positions the cache holds."""
        return self.head(self.decoder(input_ids, cache=cache))
