"""The published recipes (configs/experiment/{gpt2_124m,bert_base,t5_base}.yaml) keep their papers' settings,
and their CPU-sized variants train through the real Trainer.

The full-size recipes stream FineWeb-Edu and want 8 GPUs, so they are only composed and validated here (as
test_configs.py does for every option); the `_cpu` variants inherit them and are trained for a few steps.
"""

from __future__ import annotations

import math

import pytest

from llmtrain.config import to_dataclass, validate
from llmtrain.training.trainer import Trainer
from tests.conftest import compose_config

# recipe -> (model family, objective, d_model, layers, seq_len, tokens per optimizer step, lr, beta2, weight decay)
PUBLISHED = {
    "gpt2_124m": ("decoder", "clm", 768, 12, 1024, 512 * 1024, 6e-4, 0.95, 0.1),
    "bert_base": ("encoder", "mlm", 768, 12, 512, 256 * 512, 1e-4, 0.999, 0.01),
    "t5_base": ("encoder_decoder", "span_corruption", 768, 12, 512, 128 * 512, 7e-4, 0.999, 0.0),
}


def compose_recipe(name: str, *extra: str):
    cfg = to_dataclass(compose_config([f"experiment={name}", "run_name=x", *extra]))
    validate(cfg)
    return cfg


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_recipe_composes_with_its_settings(name, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")  # as under torchrun --nproc_per_node=8
    family, objective, width, layers, seq_len, tokens, lr, beta2, decay = PUBLISHED[name]
    cfg = compose_recipe(name)
    assert (cfg.model.family, cfg.objective.name) == (family, objective)
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.data.seq_len) == (width, layers, seq_len)
    t = cfg.trainer
    assert t.global_batch_size * seq_len == tokens
    assert t.micro_batch_size * 8 * t.grad_accum_steps == t.global_batch_size
    assert (cfg.optim.lr, cfg.optim.beta2, cfg.optim.weight_decay, cfg.optim.grad_clip) == (
        lr,
        beta2,
        decay,
        1.0,
    )
    assert t.precision == "bf16" and cfg.parallel.compile and cfg.parallel.strategy == "ddp"
    assert cfg.model.vocab_size % 64 == 0 and cfg.model.vocab_size >= cfg.data.tokenizer.vocab_size


def test_recipes_match_the_papers_details():
    gpt2, bert, t5 = (compose_recipe(n) for n in ("gpt2_124m", "bert_base", "t5_base"))
    assert (gpt2.model.norm, gpt2.model.position, gpt2.model.gelu, gpt2.model.tie_embeddings) == (
        "layernorm", "learned", "tanh", True,
    )  # fmt: skip
    assert gpt2.optim.warmup_steps == 700 and math.isclose(gpt2.optim.lr * gpt2.optim.min_lr_ratio, 6e-5)
    assert round(gpt2.trainer.max_steps * 512 * 1024 / 1e9) == 10  # llm.c's 10B-token run
    assert (bert.model.norm_position, bert.model.gelu, bert.model.head_transform) == ("post", "exact", True)
    assert (bert.optim.schedule, bert.optim.warmup_steps, bert.optim.eps) == ("linear", 10000, 1e-6)
    assert (bert.objective.select_rate, bert.objective.mask_rate, bert.objective.random_rate) == (
        0.15,
        0.8,
        0.1,
    )
    assert (t5.model.mlp, t5.model.position, t5.model.d_ff, t5.model.tie_embeddings) == (
        "geglu", "relative", 2048, False,
    )  # fmt: skip
    assert (t5.objective.noise_density, t5.objective.mean_noise_span_length) == (0.15, 3.0)
    assert (t5.trainer.max_steps, t5.optim.warmup_steps) == (65536, 10000)
    assert math.isclose(t5.optim.lr * t5.optim.min_lr_ratio, 1e-5, rel_tol=0.01)  # nanoT5's final_cosine


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_cpu_variant_keeps_the_recipe_optimizer(name):
    full, cpu = compose_recipe(name), compose_recipe(f"{name}_cpu")
    assert cpu.model.family == full.model.family and cpu.objective.name == full.objective.name
    for key in ("beta1", "beta2", "eps", "weight_decay", "grad_clip", "schedule", "min_lr_ratio"):
        assert getattr(cpu.optim, key) == getattr(full.optim, key), key
    for key in (
        "norm",
        "norm_position",
        "mlp",
        "gelu",
        "position",
        "bias",
        "tie_embeddings",
        "head_transform",
    ):
        assert getattr(cpu.model, key) == getattr(full.model, key), key
    assert cpu.parallel.strategy == "single" and cpu.data.source == "stdlib" and not cpu.parallel.compile


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_cpu_variant_trains(name, corpus_file, cache_dir, tmp_path):
    seq_len = 48 if name == "t5_base" else 32  # the synthetic corpus is small: short windows
    cfg = compose_recipe(
        f"{name}_cpu",
        "data=files",
        f"data.paths=[{corpus_file}]",
        f"data.cache_dir={cache_dir}",
        f"data.seq_len={seq_len}",
        "data.tokenizer.vocab_size=400",
        "trainer.max_steps=6",
        "trainer.eval_interval=0",
        "trainer.eval_batches=1",
        "trainer.log_interval=3",
        "trainer.progress=false",
        "trainer.sample_tokens=0",
        "trainer.checkpoint=false",
        "optim.lr=3e-3",
        "optim.warmup_steps=2",
        "logger.wandb=disabled",
        f"output_dir={tmp_path}",
    )
    trainer = Trainer(cfg)
    assert trainer.cfg.trainer.grad_accum_steps == 2  # global batch 16 of micro-batches of 8
    group = trainer.optimizer.param_groups[0]
    assert group["betas"] == (cfg.optim.beta1, cfg.optim.beta2)
    result = trainer.fit()
    assert math.isfinite(result["val_loss"]) and result["val_loss"] < result["initial_val_loss"], result
