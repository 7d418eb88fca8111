"""Weight-decay groups and learning-rate schedules against hand-computed values."""

from __future__ import annotations

import math

import pytest

from llmtrain.config import OptimConfig
from llmtrain.models import ModelConfig, build_model
from llmtrain.training.optim import lr_factor, param_groups


def test_decay_on_matrices_only_and_tied_weight_once():
    model = build_model(
        ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, bias=True, norm="layernorm")
    )
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    ids = [id(p) for p in decay["params"] + no_decay["params"]]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters()})
    assert any(p is model.lm_head.weight for p in decay["params"])


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedules(schedule):
    """111 steps (0..110): 10 of warmup below the peak, the peak at step 10, min_lr_ratio at the last step."""
    cfg = OptimConfig(schedule=schedule, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg, 111) == pytest.approx(1 / 11)
    assert lr_factor(4, cfg, 111) == pytest.approx(5 / 11)
    assert lr_factor(9, cfg, 111) == pytest.approx(10 / 11)  # the peak once, not at the end of warmup too
    assert lr_factor(10, cfg, 111) == pytest.approx(1.0)
    mid, end = lr_factor(60, cfg, 111), lr_factor(110, cfg, 111)
    if schedule == "constant":
        assert mid == end == 1.0
    else:
        assert end == pytest.approx(0.1)  # the last step that runs trains at the final rate
        assert lr_factor(109, cfg, 111) > 0.1
        assert mid == pytest.approx(0.1 + 0.9 * 0.5)  # cosine and linear agree at the midpoint
        assert (
            lr_factor(0, OptimConfig(schedule=schedule, warmup_steps=0), 111) == 1.0
        )  # no warmup: peak first
        quarter = lr_factor(35, cfg, 111)
        expected = 0.5 * (1 + math.cos(math.pi * 0.25)) if schedule == "cosine" else 0.75
        assert quarter == pytest.approx(0.1 + 0.9 * expected)
