"""Sampling from a decoder and greedy decoding of an encoder-decoder (no KV cache yet: short outputs only)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def sample(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 50,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Append up to max_new_tokens sampled tokens to input_ids (1, T); temperature 0 is greedy."""
    max_len = model.cfg.max_seq_len
    for _ in range(max_new_tokens):
        logits = model(input_ids[:, -max_len:]).logits[:, -1, :].float()  # (1, V)
        if temperature <= 0:
            next_id = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = torch.multinomial(logits.softmax(-1), 1, generator=generator)
        input_ids = torch.cat([input_ids, next_id], dim=1)
        if eos_token_id is not None and next_id.item() == eos_token_id:
            break
    return input_ids


@torch.no_grad()
def greedy_seq2seq(
    model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None
) -> torch.Tensor:
    """Greedy decoder output (1, <= max_new_tokens) for one encoder input (1, S); the encoder runs once."""
    encoded = model.encode(input_ids)
    out = torch.full((1, 1), model.cfg.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
    for _ in range(max_new_tokens):
        next_id = model.decode(out, encoded)[:, -1, :].argmax(-1, keepdim=True)
        out = torch.cat([out, next_id], dim=1)
        if eos_token_id is not None and next_id.item() == eos_token_id:
            break
    return out[:, 1:]
