"""The output every family returns and the loss it carries."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.models.blocks import HeadTransform, init_weights
from llmtrain.models.config import ModelConfig

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    logits: torch.Tensor
    """(B, T, V); for the encoder given labels, (N, V) over its N labelled positions only."""
    loss: torch.Tensor | None = None
    """Mean cross-entropy in nats over labelled positions (0 when there are none)."""
    n_targets: torch.Tensor | None = None
    """How many labelled positions the loss averages over."""


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean fp32 cross-entropy over labels != IGNORE_INDEX, and their count. No host sync."""
    labels = labels.reshape(-1)
    n_targets = (labels != IGNORE_INDEX).sum()
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total / n_targets.clamp(min=1), n_targets


class LanguageModel(nn.Module):
    """What the three families share: the config, the output head (tied or not) and init_weights()."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.head_transform = HeadTransform(cfg) if cfg.head_transform else None
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.lm_head_bias)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states (..., d) -> logits (..., V)."""
        if self.head_transform is not None:
            h = self.head_transform(h)
        return self.lm_head(h)

    @property
    def token_embedding(self) -> nn.Embedding:
        raise NotImplementedError

    @property
    def n_residual_layers(self) -> int:
        """Blocks that add to one residual stream (for the 1/sqrt(2*depth) output-projection scaling)."""
        return self.cfg.n_layers

    def tie_weights(self) -> None:
        """Share the embedding with the head; re-done after materialisation, which makes new tensors."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight

    def init_weights(self) -> None:
        init_weights(self, self.cfg, self.n_residual_layers)
