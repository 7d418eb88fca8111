"""The planner against GPT-3 and Chinchilla's published figures; the fitted law's optimum; model shapes."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from llmtrain.measure.options import PlanOptions
from llmtrain.measure.planning import (
    CHINCHILLA,
    PETAFLOP_DAY,
    chinchilla_optimal,
    device_budget,
    device_peak_flops,
    from_pf_days,
    model_shape_for,
    plan_for_budget,
    plan_for_model,
    to_pf_days,
    training_compute,
    training_seconds,
)
from llmtrain.measure.shapes import parameter_count
from llmtrain.models import ModelConfig, check_model_config


def test_gpt3_175b_on_300b_tokens_is_about_3640_petaflop_days():
    assert to_pf_days(training_compute(175e9, 300e9)) == pytest.approx(3640, rel=0.01)
    assert plan_for_model(175e9, 300e9).pf_days == pytest.approx(3640, rel=0.01)


@pytest.mark.parametrize("n_params,flops,n_tokens", [(1e9, 1.21e20, 20.2e9), (10e9, 1.23e22, 205.1e9)])
def test_chinchilla_table_3_rows(n_params, flops, n_tokens):
    """Hoffmann et al. 2022, Table 3, both ways: parameters -> FLOPs and tokens, FLOPs -> parameters and tokens."""
    assert training_compute(n_params, 20 * n_params) == pytest.approx(flops, rel=0.05)
    assert 20 * n_params == pytest.approx(n_tokens, rel=0.05)
    n_opt, d_opt = chinchilla_optimal(flops)
    assert n_opt == pytest.approx(n_params, rel=0.05)
    assert d_opt == pytest.approx(n_tokens, rel=0.05)


@pytest.mark.parametrize("flops", [1e18, 1e21, 5.76e23])
def test_fitted_law_optimum_is_a_true_minimum_at_equal_compute(flops):
    n_opt, d_opt = CHINCHILLA.optimal(flops)
    assert training_compute(n_opt, d_opt) == pytest.approx(flops)
    best = CHINCHILLA.loss(n_opt, d_opt)
    for factor in (0.5, 2.0):
        n = factor * n_opt
        assert CHINCHILLA.loss(n, flops / (6 * n)) > best
    # and the closed form agrees with a brute-force search over model sizes
    sizes = np.geomspace(n_opt / 100, n_opt * 100, 20001)
    losses = [CHINCHILLA.loss(n, flops / (6 * n)) for n in sizes]
    assert sizes[int(np.argmin(losses))] == pytest.approx(n_opt, rel=0.01)


def test_fitted_plan_predicts_no_higher_loss_than_the_20_token_rule():
    for flops in (1e19, 1e22):
        assert plan_for_budget(flops, "fitted").loss <= plan_for_budget(flops, "chinchilla").loss


def test_budget_units():
    assert PETAFLOP_DAY == 1e15 * 86_400
    assert from_pf_days(1.0) == 8.64e19 and to_pf_days(8.64e19) == 1.0
    peak = device_peak_flops("H100")
    flops = device_budget(n_devices=8, hours=24, mfu=0.4, peak_flops=peak)
    assert flops == pytest.approx(8 * 24 * 3600 * 989e12 * 0.4)
    assert training_seconds(flops, n_devices=8, peak_flops=peak, mfu=0.4) == pytest.approx(24 * 3600)
    assert device_peak_flops("my-card", peak_tflops=100) == 1e14


def test_bad_budgets_and_devices_are_clear_errors():
    for rule in ("chinchilla", "fitted"):
        with pytest.raises(ValueError, match="budget must be a positive"):
            plan_for_budget(0.0, rule)
    with pytest.raises(ValueError, match="not in the peak table"):
        device_peak_flops("my-card")
    with pytest.raises(ValueError, match="mfu"):
        device_budget(8, 24, 1.5, 989e12)
    with pytest.raises(ValueError, match="rule"):
        plan_for_budget(1e20, "kaplan")


def test_plan_options_take_exactly_one_positive_budget():
    assert PlanOptions(pf_days=2).budget(1e15) == 2 * PETAFLOP_DAY
    assert PlanOptions(hours=10, devices=4, mfu=0.5).budget(1e15) == 4 * 10 * 3600 * 1e15 * 0.5
    assert PlanOptions().budget(1e15) is None  # no budget: the planner costs the configured model instead
    with pytest.raises(ValueError, match="give one budget"):
        PlanOptions(flops=1e20, pf_days=2).budget(1e15)
    with pytest.raises(ValueError, match=re.escape("plan.hours=0 must be > 0 (a budget)")):
        PlanOptions(hours=0).budget(1e15)
    with pytest.raises(ValueError, match="not in the peak table"):
        PlanOptions(device="TPUv5").peak_flops()
    assert PlanOptions(device="TPUv5", peak_tflops=197).peak_flops() == 197e12


@pytest.mark.parametrize(
    "options, message",
    [
        ({"mfu": 0}, r"plan.mfu=0 must be in \(0, 1\]"),
        ({"mfu": 2}, r"plan.mfu=2 must be in \(0, 1\]"),
        ({"devices": 0}, r"plan.devices=0 must be >= 1"),
        ({"peak_tflops": -1}, r"plan.peak_tflops=-1 must be > 0"),
        ({"tokens": -5}, r"plan.tokens=-5 must be > 0"),
        ({"pf_days": 100, "params": 1e9}, r"plan.pf_days and plan.params over-determine the plan"),
        ({"hours": 5, "tokens": 1e9}, r"plan.hours and plan.tokens over-determine the plan"),
        ({"dtype": "fp8"}, r"plan.dtype='fp8' has no peak; allowed: bf16, fp16, tf32, fp32"),
        (
            {"device": "V100"},
            r"plan.device='V100' is not in the peak table .*; name one of those or set plan.peak_tflops",
        ),
    ],
)
def test_plan_options_out_of_range_or_over_determined_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        PlanOptions(**options).check()


def test_plan_options_in_range_pass():
    for options in (
        {},
        {"pf_days": 100, "devices": 64},
        {"params": 175e9, "tokens": 300e9},
        {"mfu": 1.0},
        {"device": "TPUv5", "peak_tflops": 197},
    ):
        PlanOptions(**options).check()


@pytest.mark.parametrize("n_params", [3e6, 1.25e8, 1e9, 7e9, 70e9])
def test_model_shape_is_buildable_and_near_the_target(n_params):
    base = ModelConfig(vocab_size=32000 if n_params > 1e7 else 4096)
    shape = model_shape_for(n_params, base)
    check_model_config(shape)
    assert parameter_count(shape) == pytest.approx(n_params, rel=0.05)
    assert shape.head_dim == base.head_dim and shape.d_model % 128 == 0


def test_model_shape_for_gpt3_size_is_gpt3():
    base = ModelConfig(vocab_size=50257, n_heads=1, d_model=128, mlp="gelu", norm="layernorm", bias=True,
                       position="learned", max_seq_len=2048)  # fmt: skip
    shape = model_shape_for(175e9, base)
    assert (shape.d_model, shape.n_layers) == (12288, 96)  # GPT-3 175B (Brown et al. 2020, Table 2.1)


def test_model_shape_keeps_family_and_grouped_query_ratio():
    t5 = model_shape_for(2e8, ModelConfig(family="encoder_decoder", vocab_size=32000, n_decoder_layers=2))
    assert t5.family == "encoder_decoder" and t5.n_decoder_layers == t5.n_layers
    gqa = model_shape_for(7e9, ModelConfig(vocab_size=32000, d_model=4096, n_heads=32, n_kv_heads=8))
    assert gqa.n_heads % gqa.kv_heads == 0 and gqa.n_heads // gqa.kv_heads in (4, 5)
    assert math.isclose(parameter_count(gqa), 7e9, rel_tol=0.05)
