"""Every config group option composes on top of the typed schema and passes validation."""

from __future__ import annotations

import re

import pytest
from hydra.errors import ConfigCompositionException

from llmtrain.config import ConfigError, to_dataclass, validate
from tests.conftest import CONFIGS, compose_config

GROUPS = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir())
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONFIGS / g).glob("*.yaml"))]
NEEDS = {  # options that need a setting a user must supply
    ("data", "files"): ["data.paths=[corpus.jsonl]"],
    ("data", "hub"): ["data.hub_name=org/dataset"],
    ("objective", "mlm"): ["model=encoder"],
    ("objective", "span_corruption"): ["model=encoder_decoder"],
}


def test_groups_exist():
    assert {"model", "objective", "data", "optim", "trainer", "logger", "experiment"} <= set(GROUPS)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_validates(group, option):
    cfg = compose_config([f"{group}={option}", "run_name=x", *NEEDS.get((group, option), [])])
    validate(to_dataclass(cfg))


@pytest.mark.parametrize(
    ("model", "objective"), [("decoder", "clm"), ("encoder", "mlm"), ("encoder_decoder", "span_corruption")]
)
def test_each_model_picks_its_objective(model, objective):
    cfg = compose_config([f"model={model}", "run_name=x"])
    assert cfg.model.family == model and cfg.objective.name == objective


MODELS = sorted(f.stem for f in (CONFIGS / "model").glob("*.yaml"))


@pytest.mark.parametrize("model", MODELS)
def test_debug_tiny_shrinks_every_model(model):
    """debug=tiny is "any model, in seconds": every preset validates, and none keeps a full-size part (a
    llama's grouped heads, a T5's 12 decoder layers, BERT's 3072-wide MLP)."""
    from llmtrain.measure.shapes import model_config_for, parameter_count

    cfg = to_dataclass(compose_config([f"model={model}", "debug=tiny", "run_name=x"]))
    validate(cfg)
    assert parameter_count(model_config_for(cfg)) < 500_000, model


@pytest.mark.parametrize(
    ("overrides", "wandb"),
    [
        (["debug=tiny"], "disabled"),
        (["debug=tiny", "logger=wandb_online"], "online"),  # debug/tiny.yaml was applied last: disabled
        (["logger=wandb_offline", "debug=tiny"], "offline"),
        (["experiment=isoflop_cpu"], "disabled"),
        (["experiment=isoflop_cpu", "logger=wandb_online"], "online"),
    ],
)
def test_debug_tiny_turns_wandb_off_unless_a_logger_is_asked_for(overrides, wandb):
    assert to_dataclass(compose_config([*overrides, "run_name=x"])).logger.wandb == wandb


def test_unknown_key_is_refused_at_composition():
    with pytest.raises(ConfigCompositionException, match="model.n_layer") as info:
        compose_config(["model.n_layer=3", "run_name=x"])
    assert "not in 'ModelConfig'" in str(info.value.__cause__)


@pytest.mark.parametrize(
    "override, named",
    [
        ("+model.n_layer=3", "unknown setting model.n_layer (ModelConfig has: "),
        ("+trainer.max_stepz=5", "unknown setting trainer.max_stepz (TrainerConfig has: "),
        ("+data.tokenizer.size=5", "unknown setting data.tokenizer.size (TokenizerConfig has: "),
        ("+seeds=3", "unknown setting seeds (TrainConfig has: "),
    ],
)
def test_a_key_added_with_plus_is_refused_by_name(override, named):
    """Hydra's refusal of a misspelled key says "To append to your config use +key=value"; a key added that
    way was kept by the merge and dropped by to_object: the run trained without it, and said nothing."""
    with pytest.raises(ConfigError, match=re.escape(named)):
        to_dataclass(compose_config([override, "run_name=x"]))
    from omegaconf import OmegaConf, open_dict

    from llmtrain.data.shards import PrepareConfig
    from llmtrain.measure.options import section

    prepare = OmegaConf.structured(
        PrepareConfig
    )  # scripts' own sections (prepare_data, train_tokenizer, plan)
    with open_dict(prepare.curation.dedup):
        prepare.curation.dedup.treshold = 0.7  # what +prepare.curation.dedup.treshold=0.7 composes
    with pytest.raises(ConfigError, match=re.escape("unknown setting prepare.curation.dedup.treshold")):
        section({"prepare": prepare}, "prepare")
    mixture = {"data": {"mixture": [{"path": "a", "weight": 1.0}, {"path": "b", "wieght": 1.0}]}}
    with pytest.raises(ConfigError, match=re.escape("unknown setting data.mixture[1].wieght")):
        to_dataclass(mixture)


def test_validation_names_setting():
    cfg = to_dataclass(compose_config(["model.d_model=100", "model.n_heads=3", "run_name=x"]))
    with pytest.raises(ConfigError, match=r"model.d_model=100 is not divisible by model.n_heads=3"):
        validate(cfg)
