"""Process group set-up from torchrun's environment: NCCL on CUDA, gloo on CPU, one device per rank."""

from __future__ import annotations

import datetime
import functools
import gc
import importlib
import logging
import os
import pickle
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger("llmtrain")
T = TypeVar("T")


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


# Modules with functions whose default argument is `group=dist.group.WORLD` bind the group that exists when they are
# first imported, and keep it past destroy_process_group: its gloo threads then live into interpreter exit, where
# freeing them can abort a run that ended well ("terminate called without an active exception", SIGABRT).
# init_distributed imports them before it makes the group: the trainer imports the first two (through
# parallelize) before its group, but ZeRO-1 imports torch.distributed.optim after it, and any script whose optimizer
# comes first imports torch._dynamo (and with it torch.distributed.nn.functional) after it.
BIND_WORLD_AT_IMPORT = (
    "torch._dynamo",
    "torch.distributed.nn.functional",
    "torch.distributed.optim",  # ZeroRedundancyOptimizer's _broadcast_object
    "torch.distributed.fsdp",  # ShardedGradScaler
)


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(
    device: str = "auto",
    timeout_minutes: float = 10.0,
    need_group: bool = False,
) -> DistInfo:
    """Join the process group torchrun describes (if any) and pick this rank's device.

    device: auto (CUDA when present, else CPU) | cpu | cuda. need_group: make a one-rank process group when
    not launched by torchrun (FSDP needs a group even on one device). On CUDA the group has a gloo
    backend for CPU tensors beside NCCL: the ranks agree on control flags (a stop request) on the host without
    waiting for the GPU's queue, and FSDP2 CPU offload all-reduces the gradient norm of host-resident shards.
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
        for module in BIND_WORLD_AT_IMPORT:
            importlib.import_module(module)
        backend = "cuda:nccl,cpu:gloo" if use_cuda else "gloo"
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


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """In-place maximum over ranks (a no-op in one process); every rank must call it at the same point."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def rank_zero_first(fn: Callable[[], T], waiting_for: str) -> T:
    """fn() on rank 0, then on the other ranks (which read what rank 0 wrote: a cache, a run directory).

    An error on rank 0 is raised on every rank with its message: the others would otherwise wait in a barrier
    that rank 0's exit breaks, and end with a gloo/NCCL traceback naming nothing. Their wait is bounded by the
    group's timeout (parallel.timeout_minutes); running past it, or rank 0 dying, is named as such."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return fn()
    verdict: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as err:
            verdict[0] = (type(err), str(err))
            try:  # the others rebuild it from its class, which must pickle (a class defined in a function does not)
                pickle.dumps(verdict[0])
            except Exception:
                verdict[0] = (RuntimeError, f"{type(err).__name__}: {err}")
            dist.broadcast_object_list(verdict, src=0)
            raise
        dist.broadcast_object_list(verdict, src=0)
        return result
    try:
        dist.broadcast_object_list(verdict, src=0)
    except Exception as err:  # the wait timed out, or rank 0 went away without a verdict
        from llmtrain.config import ConfigError

        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ConfigError(
            f"rank {dist.get_rank()} gave up waiting for rank 0 to finish {waiting_for} ({first}); if rank 0 was "
            "still at work, raise parallel.timeout_minutes or do that work beforehand (scripts/prepare_data.py "
            "writes data.shards)"
        ) from None
    if verdict[0] is not None:
        kind, message = verdict[0]
        try:
            error = kind(message)
        except Exception:
            error = RuntimeError(message)
        raise error
    return fn()


def destroy() -> None:
    """Destroy every process group; a group's gloo threads still alive after it are logged as a warning (they can
    abort the interpreter at exit; see BIND_WORLD_AT_IMPORT)."""
    if dist.is_initialized():
        dist.destroy_process_group()
        clear_dtensor_caches()
        gc.collect()  # a finished trainer's reference cycles (its DeviceMesh, hooks) still hold groups
        if left := gloo_threads():
            log.warning(
                "%d gloo threads outlived destroy_process_group (something still holds a group: a module "
                "imported after it was made, a cache); the process may abort at exit",
                left,
            )


def clear_dtensor_caches() -> None:
    """Empty the caches of torch.distributed.tensor (sharding propagation, redistribute plans, mesh topology): their
    keys and values hold every DeviceMesh used, and so its groups, for the life of the process. Best effort: these
    are torch internals, and a failure here must not hide the error a failing run is ending with."""
    if "torch.distributed.tensor" not in sys.modules:
        return
    try:
        _clear_dtensor_caches()
    except Exception as err:  # cleanup on the way out
        log.debug("DTensor caches not cleared: %s", err)


def _clear_dtensor_caches() -> None:
    from torch.distributed.tensor import DTensor

    propagator = getattr(getattr(DTensor, "_op_dispatcher", None), "sharding_propagator", None)
    per_thread = getattr(propagator, "propagate_op_sharding", None)
    if hasattr(per_thread, "cache_clear"):
        per_thread.cache_clear()  # a cache per thread: this is the main thread's, where FSDP's ops run on CPU
    for name, module in list(sys.modules.items()):
        if not name.startswith("torch.distributed.tensor") or module is None:
            continue
        for value in list(vars(module).values()):  # cached functions, and classes' cached (static) methods
            members = [getattr(value, attr, None) for attr in vars(value)] if isinstance(value, type) else []
            for member in [value, *members]:
                if isinstance(member, functools._lru_cache_wrapper) and getattr(
                    member, "__module__", ""
                ).startswith("torch.distributed.tensor"):  # not the helpers these modules import
                    member.cache_clear()
    redistribute = sys.modules.get("torch.distributed.tensor._redistribute")
    clear_planners = getattr(redistribute, "clear_redistribute_planner_cache", None) or getattr(
        getattr(redistribute, "_planner_cache", None), "clear", None
    )  # a plain dict (torch 2.11 has no function to clear it)
    if clear_planners:
        clear_planners()
    clear_native = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)  # the C++ fast path's
    if clear_native:
        clear_native()


def gloo_threads() -> int:
    """Threads of this process named by gloo (Linux; 0 where /proc has no thread names)."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return 0
    count = 0
    for task in tasks.iterdir():
        try:
            count += "gloo" in (task / "comm").read_text()
        except OSError:  # a thread that ended while being counted
            continue
    return count
