"""One builder for the three families: a dict, not a registry."""

from __future__ import annotations

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

        try:
            load_hf_weights(model, cfg.init_from)
        except ModelConfigError:
            raise
        except (KeyError, ValueError) as err:  # weights that do not fit, a config.json that is no object
            raise ModelConfigError(f"model.init_from={cfg.init_from}: {err}") from None
    return model


def count_parameters(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Unique parameters (a tied weight counts once); optionally without the embedding tables."""
    params = {id(p): p for p in model.parameters()}
    if exclude_embeddings:
        for m in model.modules():
            if isinstance(m, nn.Embedding):
                params.pop(id(m.weight), None)
    return sum(p.numel() for p in params.values())
