"""Process group set-up from torchrun's environment: NCCL on CUDA, gloo on CPU, one device per rank."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(
    device: str = "auto",
    timeout_minutes: float = 10.0,
    need_group: bool = False,
    cpu_collectives: bool = False,
) -> DistInfo:
    """Join the process group torchrun describes (if any) and pick this rank's device.

    device: auto (CUDA when present, else CPU) | cpu | cuda. need_group: make a one-rank process group when
    not launched by torchrun (FSDP needs a group even on one device). cpu_collectives: on CUDA, also give the
    group a gloo backend for CPU tensors (FSDP2 CPU offload keeps sharded gradients on the host, and the
    gradient norm's all-reduce runs on them; NCCL alone has no CPU backend).
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but no CUDA device is available; allowed here: auto, cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    torchrun = launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1
    if not (torchrun or need_group):
        return DistInfo(device=dev)
    if not dist.is_initialized():
        backend = ("cuda:nccl,cpu:gloo" if cpu_collectives else "nccl") if use_cuda else "gloo"
        if use_cuda:  # surface NCCL errors as exceptions instead of hangs
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        kwargs = {} if launched_by_torchrun() else {"store": dist.HashStore(), "rank": 0, "world_size": 1}
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=dev if use_cuda else None,
            **kwargs,
        )
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op in one process); every rank must call it at the same point."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
