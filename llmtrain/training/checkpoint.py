"""Checkpoints: step-XXXXXXX/ folders in the run directory, complete or absent, loadable at any world size.

Model and optimizer go through torch.distributed.checkpoint (DCP): every rank writes its shard, and a load
reshards, so a checkpoint saved by FSDP on 2 ranks loads in one process, or DDP's under FSDP. The small
training state (step, tokens, schedule, loader position) and each rank's RNG states are torch.save'd and
loaded with weights_only=True. A checkpoint is written under a temporary name and renamed once all ranks
have finished, so a crash mid-save leaves the previous one usable.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from llmtrain.distributed.env import barrier

STEP_DIR = re.compile(r"^step-(\d{7})$")
TRAIN_STATE = "train_state.pt"
ZERO1_OPTIMIZER = "optimizer_zero1.pt"
DCP_METADATA = ".metadata"


class _MetadataUnpickler(pickle.Unpickler):
    """DCP writes its .metadata with pickle; this reads it allowing only DCP's own metadata types, so a
    tampered file cannot run code (the weights_only=True rule, applied to DCP)."""

    SAFE = {
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
    }

    def find_class(self, module: str, name: str):
        if (
            module in ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
            or (module, name) in self.SAFE
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"checkpoint metadata refers to {module}.{name}, which a checkpoint never holds"
        )


class SafeReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        path = Path(self.path) / DCP_METADATA
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as err:
            raise ValueError(
                f"checkpoint {self.path}: {DCP_METADATA} is damaged or not a checkpoint's ({err})"
            ) from None
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor items (optimizer hyper-parameters) are read with weights_only=True too."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)  # plain data only, or an error
        safe = io.BytesIO()
        torch.save(obj, safe)  # what the default planner then reads back is what we just checked
        safe.seek(0)
        super().load_bytes(read_item, safe)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f"step-{step:07d}"


def is_complete(path: Path) -> bool:
    return (path / TRAIN_STATE).is_file() and (path / DCP_METADATA).is_file()


def _step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete step-XXXXXXX/ folders, oldest first (temporary .partial folders never match)."""
    if not run_dir.is_dir():
        return []
    return sorted((p for p in run_dir.iterdir() if STEP_DIR.match(p.name) and is_complete(p)), key=_step_of)


def incomplete_checkpoints(run_dir: Path) -> list[Path]:
    """What a crash mid-save leaves: .partial folders, or step folders without their last file."""
    if not run_dir.is_dir():
        return []
    return sorted(
        p
        for p in run_dir.iterdir()
        if p.is_dir() and (p.name.endswith(".partial") or (STEP_DIR.match(p.name) and not is_complete(p)))
    )


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete step-XXXXXXX/ folder."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: Path, keep_last_k: int) -> list[Path]:
    """Delete all but the newest keep_last_k complete checkpoints (never the newest); returns what went.
    Each is first renamed out of the step-XXXXXXX names (.step-XXXXXXX.pruned), so a process killed while
    deleting leaves a folder no resume takes for a checkpoint (the next save clears it), not a step folder
    that still has its train_state.pt but lacks part of its weights."""
    doomed = complete_checkpoints(run_dir)[: -max(keep_last_k, 1)]
    for path in doomed:
        gone = path.with_name(f".{path.name}.pruned")
        os.replace(path, gone)
        shutil.rmtree(gone, ignore_errors=True)
    return doomed


def _is_zero1(optimizer) -> bool:
    return type(optimizer).__name__ == "ZeroRedundancyOptimizer"


def settle_zero1(optimizer) -> None:
    """After ZeroRedundancyOptimizer.load_state_dict: drop the wrapper's own copy of the loaded states (a run
    that never resumed has none; on a GPU it is a second copy of this rank's Adam moments), and put Adam's
    step counts back on their parameters' device, which fused and capturable AdamW need (ZeRO moves them to
    the CPU, and fused AdamW on CUDA then refuses the step: pytorch/pytorch#124133)."""
    optimizer.state.clear()
    local = optimizer.optim
    for group in local.param_groups:
        if group.get("fused") or group.get("capturable"):
            for p in group["params"]:
                state = local.state.get(p)
                if state and torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to(p.device)


def _sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    if optimizer is None or _is_zero1(optimizer):
        return {"model": get_model_state_dict(model)}
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state}


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_state: dict[str, Any],
    rank_state: dict[str, Any],
    rank: int = 0,
    keep_last_k: int = 0,
) -> Path:
    """Collective: every rank calls it at the same step. keep_last_k > 0 prunes older complete checkpoints.
    A folder already at this step (an incomplete one, or a resumed run's older save) is moved aside before the
    new one moves in, and deleted after."""
    final = checkpoint_dir(run_dir, step)
    tmp = run_dir / f".{final.name}.partial"
    if rank == 0:
        stale = [
            *run_dir.glob(".step-*.partial"),
            *run_dir.glob(".step-*.replaced"),
            *run_dir.glob(".step-*.pruned"),
        ]  # left by a crashed save
        for folder in stale:
            shutil.rmtree(folder, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    with warnings.catch_warnings():  # one process without a process group is a supported case
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
        dcp.save(_sharded_state(model, optimizer), checkpoint_id=str(tmp))
    if _is_zero1(optimizer):  # ZeRO-1 states are gathered on rank 0 and saved whole beside the DCP model
        optimizer.consolidate_state_dict(to=0)
        if rank == 0:
            torch.save(optimizer.state_dict(), tmp / ZERO1_OPTIMIZER)
        optimizer._all_state_dicts = []  # the gathered copy (every rank's Adam states) would stay on rank 0
    torch.save(rank_state, tmp / f"rank{rank}.pt")
    barrier()
    if rank == 0:  # written last: a folder with train_state.pt has everything else
        torch.save(train_state, tmp / TRAIN_STATE)
        replaced = run_dir / f".{final.name}.replaced"
        if final.exists():
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        elif keep_last_k:  # room first: never more than keep_last_k complete, even if killed here
            prune_checkpoints(run_dir, keep_last_k - 1)
        os.replace(tmp, final)
        shutil.rmtree(replaced, ignore_errors=True)
    barrier()
    return final


def read_train_state(path: Path) -> dict[str, Any]:
    return torch.load(path / TRAIN_STATE, map_location="cpu", weights_only=True)


def read_rank_state(path: Path, rank: int) -> dict[str, Any] | None:
    """This rank's RNG states, or None when the checkpoint came from a smaller world."""
    file = path / f"rank{rank}.pt"
    return torch.load(file, map_location="cpu", weights_only=True) if file.is_file() else None


class _DropRecordsFrom(logging.Filter):
    """Drops the log records of the modules under one path: their failure reaches the user as our error."""

    def __init__(self, path_part: str):
        super().__init__()
        self.path_part = path_part

    def filter(self, record: logging.LogRecord) -> bool:
        return self.path_part not in record.pathname


@contextlib.contextmanager
def _filtered(logger: logging.Logger, log_filter: logging.Filter):
    logger.addFilter(log_filter)
    try:
        yield
    finally:
        logger.removeFilter(log_filter)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load model (and optimizer) state in place, whatever the world size and strategy that saved it.

    Exception: ZeRO-1 optimizer states (saved whole, not through DCP) resume only under ZeRO-1.
    """
    zero1_file = path / ZERO1_OPTIMIZER
    if optimizer is not None and zero1_file.is_file() != _is_zero1(optimizer):
        saved, now = (
            ("parallel.zero1=true", "another strategy")
            if zero1_file.is_file()
            else ("another strategy", "ZeRO-1")
        )
        raise ValueError(
            f"checkpoint {path} holds optimizer states of {saved}; they cannot resume under {now}. "
            "Resume with the saving run's parallel settings, or start a new run_name"
        )
    if optimizer is not None and _is_zero1(optimizer):
        # mmap: each rank copies its own shard out of the file, not every rank's states into its memory
        optimizer.load_state_dict(torch.load(zero1_file, map_location="cpu", weights_only=True, mmap=True))
        settle_zero1(optimizer)
        optimizer = None  # only the model is left for DCP
    state = _sharded_state(model, optimizer)
    root = logging.getLogger()  # DCP logs a failed metadata read there, traceback included, before it raises
    quiet = _DropRecordsFrom(f"{os.sep}distributed{os.sep}checkpoint{os.sep}")
    with warnings.catch_warnings(), _filtered(root, quiet):
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        try:
            reader = SafeReader(str(path))
            reader.read_metadata()  # its own error: torch 2.11's dcp.load reports only "metadata is None"
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner())
        except (Exception, CheckpointException) as err:  # DCP wraps each rank's failure: keep the reason
            reasons = [line for line in str(err).splitlines() if "checkpoint " in line or "Error" in line]
            reason = (reasons or [str(err)])[-1]
            if "Weights only load failed" in reason:  # not torch's advice to retry with weights_only=False
                reason = "a file is damaged or holds what a checkpoint does not (refused by the weights-only loader)"
            raise ValueError(f"checkpoint {path} could not be loaded: {reason[:400]}") from None
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
