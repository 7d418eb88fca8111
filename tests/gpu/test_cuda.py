"""CUDA-only checks (run on a lent GPU by scripts/gpu_check.sh; skipped elsewhere).

The corpus is the standard library (no `datasets` needed on the GPU machine), cut to a few hundred KB.
"""

from __future__ import annotations

import pytest
import torch

from llmtrain.config import to_dataclass
from llmtrain.training.trainer import Trainer
from tests.conftest import compose_config, tiny_overrides

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture
def cuda_config(cache_dir, tmp_path):
    def make(model: str = "decoder", *extra: str):
        overrides = [
            o
            for o in tiny_overrides(tmp_path, cache_dir, tmp_path / "runs", model)
            if not o.startswith("data")
        ]
        overrides += [
            "data=stdlib",
            "data.max_bytes=600000",
            "data.seq_len=48" if model == "encoder_decoder" else "data.seq_len=32",
            "data.tokenizer.vocab_size=400",
            "data.tokenizer.train_bytes=300000",
            f"data.cache_dir={cache_dir}",
            "trainer.device=cuda",
            "trainer.max_steps=40",
            *extra,
        ]
        return to_dataclass(compose_config(overrides))

    return make


@pytest.mark.parametrize("model", ["decoder", "encoder", "encoder_decoder"])
def test_bf16_autocast_trains_each_family(cuda_config, model):
    trainer = Trainer(cuda_config(model, "trainer.precision=bf16", f"run_name={model}-bf16"))
    assert (
        trainer.use_autocast and next(trainer.model.parameters()).dtype == torch.float32
    )  # fp32 master weights
    result = trainer.fit()
    assert result["val_loss"] < result["initial_val_loss"] - 0.5


def test_fp16_uses_loss_scaling(cuda_config):
    trainer = Trainer(cuda_config("decoder", "trainer.precision=fp16", "run_name=fp16"))
    assert trainer.scaler is not None
    result = trainer.fit()
    assert result["val_loss"] < result["initial_val_loss"] - 0.5
    assert trainer.scaler.get_scale() > 0


@pytest.mark.parametrize(
    "extra", [[], ["parallel.cpu_offload=true"], ["trainer.precision=fp16"]], ids=["bf16", "offload", "fp16"]
)
def test_fsdp_on_one_gpu(cuda_config, extra):
    """FSDP2 in one process: a one-rank group, MixedPrecisionPolicy, optional CPU offload / sharded scaler."""
    trainer = Trainer(
        cuda_config("decoder", "trainer.precision=bf16", "parallel=fsdp", "run_name=fsdp", *extra)
    )
    assert not trainer.use_autocast  # the policy casts, not autocast
    if "parallel.cpu_offload=true" in extra:
        assert next(trainer.model.parameters()).device.type == "cpu"
    result = trainer.fit()
    assert result["val_loss"] < result["initial_val_loss"] - 0.5


def test_compile_bf16(cuda_config):
    trainer = Trainer(
        cuda_config("decoder", "trainer.precision=bf16", "parallel.compile=true", "run_name=compiled")
    )
    result = trainer.fit()
    assert result["val_loss"] < result["initial_val_loss"] - 0.5
