"""One builder for the three families: a dict, not a registry."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from llmtrain.models.config import ModelConfig, ModelConfigError, check_model_config
from llmtrain.models.decoder import DecoderLM
from llmtrain.models.encoder import EncoderMLM
from llmtrain.models.encoder_decoder import EncoderDecoderLM

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "encoder": EncoderMLM,
    "decoder": DecoderLM,
    "encoder_decoder": EncoderDecoderLM,
}


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> nn.Module:
    """Build on the meta device (no memory, no init work), materialise on `device`, then init_weights();
    with cfg.init_from, then copy in the weights of that Hugging Face folder."""
    check_model_config(cfg)
    if cfg.vocab_size <= 0:
        raise ModelConfigError("model.vocab_size must be set (from the tokenizer) before building the model")
    with torch.device("meta"):
        model = MODEL_CLASSES[cfg.family](cfg)
    model.to_empty(device=device)
    model.tie_weights()
    with torch.no_grad():
        model.init_weights()
    if cfg.init_from:
        from llmtrain.models.hf import load_hf_weights

        with naming_init_from(cfg.init_from):
            load_hf_weights(model, cfg.init_from)
    return model


def check_init_from(cfg: ModelConfig) -> None:
    """model.init_from's architecture against cfg's, the vocabulary aside (the tokenizer sets it later): the
    check build_model makes, before any work."""
    from llmtrain.models.hf import check_architecture

    with naming_init_from(cfg.init_from):
        check_architecture(cfg, cfg.init_from, vocabulary=False)


@contextlib.contextmanager
def naming_init_from(folder: str) -> Iterator[None]:
    """A folder's problems as a ModelConfigError naming model.init_from: weights that do not fit, a
    config.json that is no JSON object (those of another architecture name the settings themselves)."""
    try:
        yield
    except ModelConfigError:
        raise
    except (KeyError, ValueError) as err:
        raise ModelConfigError(f"model.init_from={folder}: {err}") from None


def count_parameters(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Unique parameters (a tied weight counts once); optionally without the embedding tables."""
    params = {id(p): p for p in model.parameters()}
    if exclude_embeddings:
        for m in model.modules():
            if isinstance(m, nn.Embedding):
                params.pop(id(m.weight), None)
    return sum(p.numel() for p in params.values())
