"""Process-group set-up under torchrun, with the CUDA and NCCL calls stood in for (this machine has no GPU)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from llmtrain.distributed import env


def test_cuda_ranks_get_a_cpu_backend_beside_nccl(monkeypatch):
    """Host tensors are all-reduced on CUDA ranks: the stop-request flag (over NCCL, reading it would wait for
    the step's kernels) and FSDP2 CPU offload's gradient norm. NCCL alone fails there ("No backend type
    associated with device type cpu")."""
    calls = []
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.append(("init", kwargs)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    info = env.init_distributed("cuda")
    assert info.device == torch.device("cuda", 1) and (info.rank, info.world_size) == (1, 2)
    assert calls[0] == ("set_device", torch.device("cuda", 1))
    assert calls[1][1]["backend"] == "cuda:nccl,cpu:gloo" and calls[1][1]["device_id"] == torch.device(
        "cuda", 1
    )


def test_cpu_ranks_use_gloo(monkeypatch):
    calls = []
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    env.init_distributed("cpu")
    assert calls[0]["backend"] == "gloo" and calls[0]["device_id"] is None
