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


KEEP_GATHERED = (
    "parallel.reshard_after_forward=false"  # on one device FSDP wraps only when asked (fsdp_wraps)
)


@pytest.mark.parametrize(
    "extra",
    [[KEEP_GATHERED], ["parallel.cpu_offload=true"], ["trainer.precision=fp16", KEEP_GATHERED]],
    ids=["bf16", "offload", "fp16"],
)
def test_fsdp_on_one_gpu(cuda_config, extra):
    """FSDP2 in one process: a one-rank group, MixedPrecisionPolicy, optional CPU offload / sharded scaler."""
    trainer = Trainer(
        cuda_config("decoder", "trainer.precision=bf16", "parallel=fsdp", "run_name=fsdp", *extra)
    )
    assert trainer.fsdp and not trainer.use_autocast  # the policy casts, not autocast
    if "parallel.cpu_offload=true" in extra:
        assert next(trainer.model.parameters()).device.type == "cpu"
    result = trainer.fit()
    assert result["val_loss"] < result["initial_val_loss"] - 0.5


def test_zero1_resumes_on_cuda(tmp_path):
    """ZeRO-1's load moves Adam's step counts to the CPU; fused AdamW on CUDA refuses them unless they are
    put back (one-rank NCCL group)."""
    import torch.distributed as dist

    from llmtrain.distributed.env import destroy
    from tests.distributed.test_zero1 import save_and_resume

    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        save_and_resume(tmp_path, "cuda")
    finally:
        destroy()


def test_compile_bf16(cuda_config):
    trainer = Trainer(
        cuda_config("decoder", "trainer.precision=bf16", "parallel.compile=true", "run_name=compiled")
    )
    result = trainer.fit()
    assert result["val_loss"] < result["initial_val_loss"] - 0.5


@pytest.mark.parametrize("model", ["decoder", "encoder", "encoder_decoder"])
def test_document_attention_on_cuda(cuda_config, model):
    """Block-diagonal masks through CUDA SDPA (bool masks: the memory-efficient kernel), bf16."""
    trainer = Trainer(
        cuda_config(model, "trainer.precision=bf16", "data.document_attention=true", f"run_name={model}-docs")
    )
    result = trainer.fit()
    assert result["val_loss"] < result["initial_val_loss"] - 0.5


@pytest.mark.parametrize("extra", [[], ["parallel=fsdp", KEEP_GATHERED]], ids=["single", "fsdp"])
def test_nonfinite_guard_on_the_device(cuda_config, extra):
    """Fused CUDA AdamW skips the poisoned update through found_inf; the loop names the step at its next log."""
    from llmtrain.training.guards import NonFiniteError

    trainer = Trainer(
        cuda_config("decoder", "trainer.precision=bf16", "trainer.max_steps=10", "run_name=nan", *extra)
    )
    assert trainer.guard_on_device
    forward, calls = trainer.forward_model, [0]

    def poisoned(**batch):
        out = forward(**batch)
        calls[0] += 1
        if calls[0] == 4:
            out.loss = out.loss * float("nan")
        return out

    trainer.forward_model = poisoned
    with pytest.raises(NonFiniteError, match="at step 4"):
        trainer.fit()
    assert all(
        torch.isfinite(p.full_tensor() if hasattr(p, "full_tensor") else p).all()
        for p in trainer.model.parameters()
    )


@pytest.mark.parametrize("model", ["decoder", "encoder", "encoder_decoder"])
def test_training_steps_do_not_sync_the_device(cuda_config, model):
    """torch's sync debug mode turns any host-device synchronisation into an error: two bf16 steps (forward,
    backward, clipping, fused AdamW, the non-finite guard) after two warm-up steps must run without one."""
    trainer = Trainer(cuda_config(model, "trainer.precision=bf16", f"run_name={model}-nosync"))
    trainer.train_step()
    trainer.train_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.train_step()
        trainer.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
