"""Load a trained model for inference: from a run directory, one of its step-XXXXXXX checkpoints, or a
Hugging Face folder written by scripts/export_hf.py. The checkpoint's small state is read with
weights_only=True, its weights through llmtrain.training.checkpoint (DCP, any world size), an exported
folder from safetensors; a damaged file gets an error that names it."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from llmtrain.data.tokenizer import Tokenizer, load_tokenizer
from llmtrain.models import ModelConfig, build_model
from llmtrain.models.hf import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_hf_weights,
    model_config_from_hf,
    read_hf_config,
)
from llmtrain.training.checkpoint import (
    TRAIN_STATE,
    is_complete,
    latest_checkpoint,
    load_checkpoint,
    read_train_state,
)

TOKENIZER_FILE = "tokenizer.json"


class CheckpointError(ValueError):
    """A checkpoint or model folder that cannot be used; the message names the file and what is wrong."""


@dataclass
class LoadedModel:
    model: nn.Module
    cfg: ModelConfig
    tokenizer_path: Path | None
    """The tokenizer.json the model was trained with, when it could be found."""
    source: Path
    """The checkpoint folder or Hugging Face folder the weights came from."""


def is_hf_folder(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """A complete step-XXXXXXX folder (or a Hugging Face folder) from a run directory or the folder itself."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; pass a run directory, a step-XXXXXXX folder or an exported folder"
        )
    if is_hf_folder(path) and latest_checkpoint(path) is not None:
        raise CheckpointError(
            f"{path} holds both an exported model ({CONFIG_FILE}, {WEIGHTS_FILE}) and step-XXXXXXX checkpoints, so "
            "which to load is unclear; pass the step folder, or move the exported files to a folder of their own"
        )
    if is_complete(path) or is_hf_folder(path):
        return path
    if (path / TRAIN_STATE).is_file():
        raise CheckpointError(f"{path} is an incomplete checkpoint (its DCP .metadata is missing)")
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"{path} holds no complete step-XXXXXXX checkpoint and no {WEIGHTS_FILE}")
    return found


def _describe(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def model_config_from_checkpoint(saved: dict, where: Path) -> ModelConfig:
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise CheckpointError(f"{where}: model_config has settings this llmtrain does not know: {unknown}")
    cfg = ModelConfig(**saved)
    cfg.init_from = None  # the checkpoint's own weights follow; do not read the original folder again
    return cfg


def read_model_config(folder: Path) -> ModelConfig:
    """The model config saved in a checkpoint's train state (torch.load with weights_only=True)."""
    path = folder / TRAIN_STATE
    try:
        state = read_train_state(folder)
    except Exception as err:  # truncated zip, tampered pickle (weights_only refuses code), wrong format
        raise CheckpointError(
            f"{path} is not a readable llmtrain checkpoint (truncated, damaged or not made by llmtrain): "
            + _describe(err)
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("model_config"), dict):
        raise CheckpointError(f"{path} lacks the 'model_config' entry of an llmtrain checkpoint")
    return model_config_from_checkpoint(state["model_config"], path)


def find_tokenizer(checkpoint: Path) -> Path | None:
    """tokenizer.json beside the weights, in the run directory, or the one the run's config names."""
    for folder in (checkpoint, checkpoint.parent):
        if (folder / TOKENIZER_FILE).is_file():
            return folder / TOKENIZER_FILE
    run_config = checkpoint.parent / "config.json"
    if run_config.is_file():
        named = json.loads(run_config.read_text()).get("data", {}).get("tokenizer", {}).get("path")
        if named and Path(named).is_file():
            return Path(named)
    return None


def check_tokenizer_fits(tokenizer: Tokenizer, path: str | Path, vocab_size: int) -> None:
    """Refuse a tokenizer with more tokens than the model's vocabulary: its ids would index past the embedding
    table (an IndexError, or silently other tokens' rows)."""
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"{path} has {tokenizer.vocab_size} tokens but the model only {vocab_size}; "
            "pass the tokenizer the model was trained with"
        )


def model_tokenizer(loaded: LoadedModel, given: str | Path | None) -> tuple[Path, Tokenizer]:
    """The tokenizer for a loaded model: `given` (a script's --tokenizer), else the one found beside it;
    refused, naming the file, when missing, unreadable or larger than the model's vocabulary."""
    if given is None:
        if loaded.tokenizer_path is None:
            raise FileNotFoundError(
                f"no tokenizer.json found beside {loaded.source}; pass --tokenizer PATH (a run's tokenizer lives "
                "under data.cache_dir/tokenizers/<key>/tokenizer.json)"
            )
        path, flag = Path(loaded.tokenizer_path), "the tokenizer found beside the model"
    else:
        path, flag = Path(given), "--tokenizer"
    try:
        tokenizer = load_tokenizer(path)
    except (
        FileNotFoundError,
        ValueError,
    ) as err:  # its message names data.tokenizer.path, a training setting
        reason = str(err).removeprefix("data.tokenizer.path: ")
        raise type(err)(f"{flag}: {reason}; pass the tokenizer.json the model was trained with") from None
    check_tokenizer_fits(tokenizer, path, loaded.cfg.vocab_size)
    return path, tokenizer


def load_trained_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """The model (eval mode) of a run directory, a step folder, or a Hugging Face folder."""
    folder = resolve_checkpoint(path)
    if is_hf_folder(folder):
        try:
            cfg = model_config_from_hf(read_hf_config(folder))
            model = build_model(cfg, device)
            load_hf_weights(model, folder)
        except (KeyError, ValueError) as err:
            raise CheckpointError(f"{folder}: {err}") from None
        tokenizer = folder / TOKENIZER_FILE
        return LoadedModel(model.eval(), cfg, tokenizer if tokenizer.is_file() else None, folder)
    cfg = read_model_config(folder)
    model = build_model(cfg, device)
    try:
        load_checkpoint(folder, model)
    except (Exception, CheckpointException) as err:  # DCP's CheckpointException is a BaseException
        raise CheckpointError(f"{folder}: the model weights could not be read ({_describe(err)})") from None
    return LoadedModel(model.eval(), cfg, find_tokenizer(folder), folder)
