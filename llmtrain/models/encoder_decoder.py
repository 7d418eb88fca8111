"""Encoder-decoder model (T5 style): bidirectional encoder, causal decoder whose blocks cross-attend."""

from __future__ import annotations

import torch
from torch import nn

from llmtrain.models.blocks import Stack
from llmtrain.models.cache import KVCache
from llmtrain.models.config import ModelConfig
from llmtrain.models.heads import LanguageModel, ModelOutput, lm_loss


class EncoderDecoderLM(LanguageModel):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.encoder = Stack(cfg, cfg.n_layers, causal=False)
        self.decoder = Stack(
            cfg, cfg.decoder_layers, causal=True, cross_attention=True, embedding=self.encoder.embed
        )
        self.tie_weights()

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.encoder.embed

    @property
    def n_residual_layers(self) -> int:
        return self.cfg.n_layers + self.cfg.decoder_layers

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        embedded: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.encoder(
            input_ids, attention_mask=attention_mask, document_ids=document_ids, embedded=embedded
        )  # (B, S, d)

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        encoded: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        document_ids: torch.Tensor | None = None,
        decoder_document_ids: torch.Tensor | None = None,
        embedded: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V). With a cache (from new_cache), decoder_input_ids continue the positions it
        holds and the encoder output is projected to keys/values once, on the first call. With document
        ids, decoder position t (which predicts target t, of document decoder_document_ids[t]) attends to
        decoder positions and cross-attends to encoder positions of that document only."""
        h = self.decoder(
            decoder_input_ids,
            attention_mask=decoder_attention_mask,
            context=encoded,
            context_mask=attention_mask,
            cache=cache,
            document_ids=decoder_document_ids,
            context_document_ids=document_ids,
            embedded=embedded,
        )
        return self.head(h)  # (B, T, V)

    def embed_both(
        self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both stacks' token embeddings from one lookup in the shared table: its backward then builds one
        dense (V, d) gradient instead of two that are summed (at T5's vocabulary, a zero-filled 32k-row
        table and an add fewer per step)."""
        ids = torch.cat([input_ids.flatten(), decoder_input_ids.flatten()])
        encoder_x, decoder_x = self.encoder.embed(ids).split([input_ids.numel(), decoder_input_ids.numel()])
        return encoder_x.view(*input_ids.shape, -1), decoder_x.view(*decoder_input_ids.shape, -1)

    def new_cache(self) -> KVCache:
        return KVCache(len(self.decoder.layers))

    def forward(
        self,
        input_ids: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        decoder_document_ids: torch.Tensor | None = None,
    ) -> ModelOutput:
        """input_ids (B, S) to the encoder; decoder_input_ids (B, T) are labels shifted right by one.
        document_ids (B, S) / decoder_document_ids (B, T): document-aware attention in packed windows
        (both or neither)."""
        if (document_ids is None) != (decoder_document_ids is None):
            raise ValueError("pass both document_ids and decoder_document_ids, or neither")
        encoder_x, decoder_x = self.embed_both(input_ids, decoder_input_ids)
        # the class's own methods: FSDP's register_fsdp_forward_method patches encode/decode on the instance
        # (for generation), and torch 2.11 mishandles those hooks nested in the root's forward (the tied
        # embedding / lm_head weight then gets no gradient)
        encoded = type(self).encode(self, input_ids, attention_mask, document_ids, embedded=encoder_x)
        logits = type(self).decode(
            self,
            decoder_input_ids,
            encoded,
            attention_mask,
            decoder_attention_mask,
            document_ids=document_ids,
            decoder_document_ids=decoder_document_ids,
            embedded=decoder_x,
        )
        if labels is None:
            return ModelOutput(logits)
        loss, n = lm_loss(logits, labels, self.compiled_loss)
        return ModelOutput(logits, loss, n)
