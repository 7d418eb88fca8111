"""Single-process checkpoints: step-XXXXXXX/ folders in the run directory, complete or absent.

A checkpoint is written under a temporary name and renamed once whole, so a crash mid-save leaves the
previous one usable. Loaded with weights_only=True: nothing in a checkpoint can run code.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

STEP_DIR = re.compile(r"^step-(\d{7})$")
STATE_FILE = "state.pt"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f"step-{step:07d}"


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any]) -> Path:
    final = checkpoint_dir(run_dir, step)
    tmp = run_dir / f".{final.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(state, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete step-XXXXXXX/ folder (temporary folders never match)."""
    if not run_dir.is_dir():
        return None
    found = [p for p in run_dir.iterdir() if STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return max(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)), default=None)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(path / STATE_FILE, map_location=map_location, weights_only=True)
