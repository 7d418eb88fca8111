"""scripts/train.py as a user runs it: a subprocess with Hydra overrides."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, tiny_overrides


def run_train(*overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *overrides],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.mark.parametrize("model", ["decoder", "encoder", "encoder_decoder"])
def test_script_trains_each_family(corpus_file, cache_dir, tmp_path, model):
    overrides = tiny_overrides(corpus_file, cache_dir, tmp_path, model) + ["trainer.max_steps=12"]
    proc = run_train(*overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / f"{model}-test"
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == 12 and result["val_loss"] < result["initial_val_loss"]
    assert "bits per byte" in proc.stderr and "sample:" in proc.stderr
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["model"]["family"] == model and saved["model"]["d_model"] == 32


def test_misspelled_override_names_the_key(tmp_path):
    proc = run_train("trainer.max_stepz=5", f"output_dir={tmp_path}")
    assert proc.returncode != 0
    assert "max_stepz" in proc.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("rank", ["0", "1"])
def test_only_rank_zero_logs_info(rank):
    """Under torchrun the other ranks log their warnings and errors only (the README: only rank 0 writes logs)."""
    code = (
        "import logging; from llmtrain.cli import setup_logging; setup_logging(); "
        "logging.getLogger('llmtrain').info('an info line'); logging.getLogger('llmtrain').warning('a warning')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "RANK": rank},
    )
    assert "a warning" in proc.stderr and ("an info line" in proc.stderr) == (rank == "0"), proc.stderr


def test_wrong_type_names_the_key(tmp_path):
    proc = run_train("trainer.max_steps=many", f"output_dir={tmp_path}")
    assert proc.returncode != 0 and "max_steps" in proc.stderr


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("model.family=transformer", "model.family='transformer'"),
        ("model.d_model=250", "model.d_model=250 is not divisible by model.n_heads=4"),
        ("data.seq_len=512", "data.seq_len=512 is longer than the position table model.max_seq_len=64"),
        ("model.n_kv_heads=3", "model.n_kv_heads=3 does not divide model.n_heads"),
        ("objective=mlm", "objective.name=mlm trains the encoder family but model.family=decoder"),
        ("trainer.precision=fp16", "trainer.precision=fp16 needs a CUDA device"),
        ("parallel.zero1=true", "parallel.zero1=true needs parallel.strategy=ddp, not single"),
        ("parallel=fsdp", "parallel.cpu_offload=true offloads CUDA shards"),
        (
            "parallel=ddp",
            "parallel.zero1=true shards the optimizer states over data-parallel ranks; this is one",
        ),
    ],
)
def test_bad_settings_fail_early_with_one_line(corpus_file, cache_dir, tmp_path, override, named):
    out = tmp_path / "runs"
    overrides = tiny_overrides(corpus_file, cache_dir, out) + ["model.n_heads=4", override]
    if override == "parallel=fsdp":
        overrides.append("parallel.cpu_offload=true")
    if override == "parallel=ddp":  # ZeRO-1 in one process
        overrides.append("parallel.zero1=true")
    proc = run_train(*overrides)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and named in lines[0], proc.stderr[-2000:]
    assert not out.exists(), "nothing may be written before the config is known to be sound"


def test_unknown_model_config_name(tmp_path):
    proc = run_train("model=transformer", f"output_dir={tmp_path}")
    assert proc.returncode != 0
    assert "model" in proc.stderr and "transformer" in proc.stderr
    assert "decoder" in proc.stderr  # Hydra lists the available options


@pytest.mark.parametrize("problem", ["missing", "empty"])
def test_bad_data_file_is_named(cache_dir, tmp_path, problem):
    path = tmp_path / "data.jsonl"
    if problem == "empty":
        path.write_text("")
    out = tmp_path / "runs"
    proc = run_train(*tiny_overrides(path, cache_dir, out))
    assert proc.returncode == 2
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert (
        len(error) == 1
        and str(path) in error[0]
        and ("matches no file" if problem == "missing" else "empty") in error[0]
    )
    assert not out.exists()


def test_wandb_offline_writes_run_files(corpus_file, cache_dir, tmp_path):
    pytest.importorskip("wandb")
    overrides = tiny_overrides(corpus_file, cache_dir, tmp_path) + [
        "trainer.max_steps=3",
        "logger.wandb=offline",
    ]
    proc = run_train(*overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "decoder-test" / "wandb").glob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir())


def test_a_diverging_run_stops_with_one_error_line(corpus_file, cache_dir, tmp_path):
    """The non-finite guard's stop is the run's outcome, not a crash: an `error:` line naming the step."""
    overrides = tiny_overrides(corpus_file, cache_dir, tmp_path) + [
        "optim.lr=1e30",
        "optim.warmup_steps=0",
        "trainer.max_steps=6",
        "trainer.log_interval=1",
        "trainer.sample_tokens=0",
    ]
    proc = run_train(*overrides)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "non-finite loss or gradient norm at step" in lines[0], proc.stderr[-2000:]


def test_a_sweep_whose_jobs_share_a_run_name_is_refused(corpus_file, cache_dir, tmp_path):
    """`-m optim.lr=1e-3,3e-3` with the default run_name: job #1 resumed job #0's finished run, trained nothing,
    reported its numbers and rewrote its config.json with lr 3e-3. Now refused, naming the fix; a sweep whose
    run_name carries the swept setting runs every job."""
    overrides = tiny_overrides(corpus_file, cache_dir, tmp_path, "decoder") + [
        "trainer.max_steps=1",
        "trainer.sample_tokens=0",
        "trainer.eval_batches=1",
    ]
    proc = run_train("-m", *overrides, "optim.lr=1e-3,3e-3")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        f"error: job #1 of this sweep would write {tmp_path / 'decoder-test'}, as job #0 did" in proc.stderr
    )
    assert json.loads((tmp_path / "decoder-test" / "config.json").read_text())["optim"]["lr"] == 1e-3
    proc = run_train("-m", *overrides, "optim.lr=1e-3,3e-3", "run_name=lr${optim.lr}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {p.name for p in tmp_path.glob("lr*")} == {"lr0.001", "lr0.003"}


def test_hydra_run_dir_is_refused_naming_where_runs_go(tmp_path):
    """hydra.run.dir was accepted and ignored: the run went to runs/<run_name>, with no word."""
    proc = run_train(f"hydra.run.dir={tmp_path / 'elsewhere'}", f"output_dir={tmp_path / 'runs'}")
    assert proc.returncode == 2
    assert (
        f"error: hydra.run.dir={tmp_path / 'elsewhere'} is not used: llmtrain writes each run" in proc.stderr
    )
    assert not (tmp_path / "runs").exists()


def test_a_signal_during_start_up_stops_the_run_at_its_first_step(corpus_file, cache_dir, tmp_path):
    """The stop handlers came after the first evaluation: SIGUSR1 (a scheduler's warning) while the data was
    being tokenized killed the process (its default action), with no checkpoint. Now the run stops after one
    step with a checkpoint, exit 0."""
    import signal

    overrides = tiny_overrides(corpus_file, cache_dir, tmp_path, "decoder") + ["trainer.sample_tokens=0"]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *overrides],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stderr:  # the Trainer is being built: the data, then the first evaluation
        if "tokenizer:" in line:
            proc.send_signal(signal.SIGUSR1)
            break
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, stderr[-3000:]
    result = json.loads((tmp_path / "decoder-test" / "result.json").read_text())
    assert (result["stopped"], result["steps"]) == ("SIGUSR1", 1)
    assert (tmp_path / "decoder-test" / "step-0000001" / "train_state.pt").is_file()


def test_a_signal_stops_a_sweep_not_just_its_job(corpus_file, cache_dir, tmp_path):
    """SIGTERM during job #0 of a `-m` sweep stopped that job with its checkpoint, and job #1 then started (to be
    killed by the scheduler that sent the signal). The process now exits 0 after job #0's checkpoint."""
    import signal

    overrides = tiny_overrides(corpus_file, cache_dir, tmp_path, "decoder") + [
        "trainer.max_steps=300",
        "trainer.sample_tokens=0",
        "optim.lr=1e-3,2e-3",
        "run_name=lr${optim.lr}",
    ]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "-m", *overrides],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    for line in proc.stderr:
        if "step 10:" in line:
            proc.send_signal(signal.SIGTERM)
            break
    stderr = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, stderr[-3000:]
    assert "the jobs after it are not started" in stderr
    assert json.loads((tmp_path / "lr0.001" / "result.json").read_text())["stopped"] == "SIGTERM"
    assert not (tmp_path / "lr0.002").exists()
