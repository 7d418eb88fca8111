"""What several test files run (scripts/train.py, alone or under torchrun) and read back from a finished run
directory."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from llmtrain.models import ModelConfig, build_model
from llmtrain.training.checkpoint import latest_checkpoint, load_checkpoint, read_train_state
from tests.conftest import ROOT

TORCH_ENDS_GROUPS = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 13)
"""torch 2.11 keeps fully_shard's DeviceMesh, and its gloo threads, past every cache clear (a holder gc does not
show), so there a thread may outlive destroy()."""


def launch(
    nproc: int, overrides: list[str], timeout: int = 240, returncode: int = 0
) -> subprocess.CompletedProcess:
    """scripts/train.py in one process (nproc=1) or under torchrun; it must end with `returncode` and leave no
    gloo thread alive into interpreter exit (llmtrain.distributed.env.destroy warns of one)."""
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "scripts" / "train.py")]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd.append(str(ROOT / "scripts" / "train.py"))
    proc = subprocess.run(cmd + overrides, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == returncode, proc.stderr[-4000:]
    if TORCH_ENDS_GROUPS:  # threads that can abort the exit (test_exit)
        assert "outlived destroy_process_group" not in proc.stderr
    return proc


def run_on_ranks(tmp_path: Path, source: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """A fresh interpreter per rank under torchrun, running `source`; it must end with return code 0."""
    script = tmp_path / "on_ranks.py"
    script.write_text(source)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(script),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def step_losses(run_dir: Path) -> dict[int, float]:
    """Training loss per logged step (run with trainer.log_interval=1 for every step)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The newest checkpoint's weights, loaded whole into one process (whatever saved them)."""
    path = latest_checkpoint(run_dir)
    model = build_model(ModelConfig(**read_train_state(path)["model_config"]))
    load_checkpoint(path, model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_weight_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def descendants(pid: int) -> list[int]:
    """Every live process below `pid`, from the parent ids in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, parent = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError):
            continue
        if state != "Z":
            children.setdefault(int(parent), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launched run and everything it started. torchrun starts each rank in a session of its own,
    so killing the launcher's process group leaves the ranks running (and writing) as orphans; they are
    found before the launcher dies, then waited for."""
    victims = [proc.pid, *descendants(proc.pid)]
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()

    def gone(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except (OSError, IndexError):
            return True

    wait_for(lambda: all(gone(pid) for pid in victims), timeout=30)


def kill_and_resume(launch_cmd: list[str], run_dir: Path, delays: list[float], during_save: int) -> None:
    """Start the run (it resumes from the newest complete checkpoint), SIGKILL it at each moment in turn;
    the kill number `during_save` waits for a save in progress first. After every kill, the newest
    complete checkpoint must load whole."""
    for i, delay in enumerate(delays):
        proc = subprocess.Popen(
            launch_cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        before = latest_checkpoint(run_dir)
        wait_for(lambda before=before: latest_checkpoint(run_dir) not in (None, before))
        if i == during_save:
            wait_for(lambda: any(run_dir.glob(".step-*.partial")))
        else:
            time.sleep(delay)
        assert proc.poll() is None, "the run finished before it could be killed"
        kill_tree(proc)  # the launcher and every rank
        proc.wait()
        latest = latest_checkpoint(run_dir)
        assert read_train_state(latest)["step"] == int(latest.name[5:])
        final_weights(run_dir)  # loads whole
