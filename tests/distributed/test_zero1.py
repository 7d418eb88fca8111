"""ZeRO-1 checkpoints in one process (a one-rank gloo group): what a save and a resume leave behind.

A save gathers every rank's Adam states on rank 0; a resume loads the whole file on every rank and keeps
only its own shard. Neither may leave a second copy of the states, and the resumed step counts must sit
where fused AdamW reads them.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from llmtrain.config import OptimConfig
from llmtrain.distributed.env import destroy
from llmtrain.models import ModelConfig, build_model
from llmtrain.training.checkpoint import load_checkpoint, save_checkpoint
from llmtrain.training.optim import build_optimizer

pytestmark = pytest.mark.distributed


@pytest.fixture
def one_rank():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        destroy()


def trained(device: str):
    model = build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16), device)
    optimizer = build_optimizer(model, OptimConfig(), device, zero1=True)
    ids = torch.randint(0, 64, (2, 16), device=device)
    model(ids, ids).loss.backward()
    optimizer.step()
    return model, optimizer


def save_and_resume(tmp_path, device: str) -> None:
    """Save a ZeRO-1 run, load it into another, check what is held, step on (fused AdamW on CUDA reads its
    step counts on the parameters' device: pytorch/pytorch#124133)."""
    model, optimizer = trained(device)
    path = save_checkpoint(tmp_path, 1, model, optimizer, {"step": 1}, {}, 0)
    assert optimizer._all_state_dicts == []  # the gathered copy is not kept for the rest of the run
    saved = sorted(s["exp_avg"].sum().item() for s in optimizer.optim.state.values())

    model, optimizer = trained(device)  # another run's states, replaced by the checkpoint's
    load_checkpoint(path, model, optimizer)
    assert len(optimizer.state) == 0  # the wrapper holds no copy; a run that never resumed has none either
    local = optimizer.optim.state
    assert len(local) == len(saved) == len(list(model.parameters()))
    for p, state in local.items():
        assert state["exp_avg"].device == p.device and float(state["step"]) == 1.0
        if optimizer.optim.param_groups[0].get("fused"):
            assert state["step"].device == p.device
    assert sorted(s["exp_avg"].sum().item() for s in local.values()) == pytest.approx(saved)
    ids = torch.randint(0, 64, (2, 16), device=device)
    model(ids, ids).loss.backward()
    optimizer.step()  # and it steps on
    assert all(float(s["step"]) == 2.0 for s in local.values())


def test_a_zero1_save_and_resume_keep_one_copy_of_the_states(one_rank, tmp_path):
    save_and_resume(tmp_path, "cpu")


def test_the_guard_verdict_reaches_zero1s_wrapped_adamw(one_rank):
    """The trainer keeps the non-finite verdict on the device by handing fused AdamW a found_inf; under ZeRO-1
    it gives it to the wrapped AdamW that steps the rank's part (the wrapper has no found_inf, so the guard had
    read the loss and gradient norm on the host every step). found_inf 1 skips the update; 0 applies it."""
    model, optimizer = trained("cpu")
    assert getattr(optimizer.optim, "_step_supports_amp_scaling", False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 64, (2, 16))
    model(ids, ids).loss.backward()
    optimizer.optim.found_inf = torch.tensor(1.0)  # the guard's flag: a 0-d float
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    optimizer.optim.found_inf = torch.tensor(0.0)
    optimizer.step()
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())
