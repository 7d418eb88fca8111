"""Evaluate a trained model on the validation split of any data config: loss, perplexity, bits per byte and
token accuracy (for MLM: on the selected tokens), with the objective of the model's family."""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

from llmtrain.data import WindowLoader
from llmtrain.models import IGNORE_INDEX
from llmtrain.objectives.evaluation import evaluation_batch

LN2 = math.log(2)


def evaluate_model(
    model: nn.Module,
    objective,
    tokens: np.ndarray,
    token_bytes: torch.Tensor,
    batch_size: int,
    n_batches: int,
    seed: int,
) -> dict[str, float]:
    """Over the first n_batches windows of `tokens` (in order); see evaluate_loader."""
    loader = WindowLoader(tokens, objective.raw_length, batch_size, seed, shuffle=False, name="validation")
    return evaluate_loader(model, objective, loader, token_bytes, n_batches, seed)


@torch.no_grad()
def evaluate_loader(
    model: nn.Module, objective, loader, token_bytes: torch.Tensor, n_batches: int, seed: int
) -> dict[str, float]:
    """Over the first n_batches batches of a validation loader (a WindowLoader, or the MixtureLoader of
    data.mixture), from its start, with the objective's randomness seeded per window as the trainer's
    evaluation seeds it (`evaluation_batch`, seed + 1), so the figures match the trainer's val_* over the same
    windows.

    bits per byte = summed nats / ln 2 / UTF-8 bytes of the predicted tokens.
    """
    model.eval()
    device = next(model.parameters()).device
    loader.load_state_dict({"epoch": 0, "windows": 0})  # from the top, as the trainer's evaluation
    n_batches = min(n_batches, loader.batches_per_epoch)
    nats, targets, n_bytes, correct = 0.0, 0, 0, 0
    start = time.perf_counter()
    for _ in range(n_batches):
        batch = {
            k: v.to(device) for k, v in evaluation_batch(objective, loader.next_batch(), seed + 1).items()
        }
        out = model(**batch)
        labels = batch["labels"]
        selected = labels != IGNORE_INDEX
        predictions = out.logits.argmax(-1)
        # the encoder's logits are (N, V) over its labelled positions only
        truth = labels[selected] if predictions.dim() == 1 else labels
        hits = predictions == truth
        correct += int(hits.sum() if predictions.dim() == 1 else hits[selected].sum())
        nats += out.loss.double().item() * int(out.n_targets)
        targets += int(out.n_targets)
        n_bytes += int(token_bytes.to(device)[labels[selected]].sum())
    loss = nats / max(targets, 1)
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "bpb": nats / LN2 / max(n_bytes, 1),
        "accuracy": correct / max(targets, 1),
        "targets": targets,
        "seconds": time.perf_counter() - start,
    }
