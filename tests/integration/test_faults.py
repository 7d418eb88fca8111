"""Fault injection on CPU: preemption signals, kill -9 at any moment, crashes mid-save, NaN losses, bad ids."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llmtrain.config import ConfigError, validate
from llmtrain.data import Corpus
from llmtrain.training import checkpoint as checkpoint_module
from llmtrain.training.checkpoint import (
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    read_train_state,
)
from llmtrain.training.guards import NonFiniteError, StopRequest
from llmtrain.training.trainer import Trainer
from tests.conftest import ROOT, tiny_overrides
from tests.helpers import final_weights, kill_and_resume, wait_for

LONG = ["trainer.max_steps=400", "trainer.log_interval=5", "trainer.sample_tokens=0", "trainer.num_threads=1"]


def start_train(overrides: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *overrides],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    return max(
        (json.loads(line).get("step", 0) for line in path.read_text().splitlines() if '"loss"' in line),
        default=0,
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_signal_stops_with_checkpoint_and_resume_matches(corpus_file, cache_dir, tmp_path, sig):
    base = tiny_overrides(corpus_file, cache_dir, tmp_path, "decoder") + LONG + ["trainer.max_steps=60"]
    run_dir = tmp_path / "decoder-test"
    proc = start_train(base)
    wait_for(lambda: logged_steps(run_dir) >= 10)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["stopped"] == signal.Signals(sig).name and 10 <= result["steps"] < 60
    assert latest_checkpoint(run_dir).name == f"step-{result['steps']:07d}"
    # the same command continues from there and ends where an uninterrupted run ends
    resumed = subprocess.run(
        [sys.executable, "scripts/train.py", *base], cwd=ROOT, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir / latest_checkpoint(run_dir).name}" not in resumed.stderr  # it moved on
    assert "resumed from" in resumed.stderr
    straight = subprocess.run(
        [sys.executable, "scripts/train.py", *base, "run_name=straight"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert straight.returncode == 0
    finished = json.loads((run_dir / "result.json").read_text())
    reference = json.loads((tmp_path / "straight" / "result.json").read_text())
    assert finished["steps"] == 60 and finished["val_loss"] == pytest.approx(reference["val_loss"], abs=1e-5)


def test_time_limit_stops_like_a_signal(tiny_config):
    trainer = Trainer(tiny_config("decoder", "trainer.max_steps=100000", "trainer.time_limit_minutes=0.02"))
    result = trainer.fit()
    assert result["stopped"] == "time limit" and result["steps"] < 100000
    assert latest_checkpoint(trainer.run_dir).name == f"step-{result['steps']:07d}"


def test_kill_9_at_five_moments_then_resume_is_bitwise(corpus_file, cache_dir, tmp_path):
    """SIGKILL at 5 points (one inside a checkpoint save), resuming after each: the final weights equal an
    uninterrupted run's bit for bit (one fp32 process)."""
    base = tiny_overrides(corpus_file, cache_dir, tmp_path, "decoder") + LONG
    base += ["trainer.max_steps=80", "trainer.checkpoint_interval=1", "trainer.keep_last_k=2"]
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *base]
    run_dir = tmp_path / "decoder-test"
    kill_and_resume(cmd, run_dir, delays=[0.05, 0.21, 0.0, 0.37, 0.12], during_save=2)
    assert len(complete_checkpoints(run_dir)) <= 2
    for extra in ([], ["run_name=straight"]):
        done = subprocess.run(cmd + extra, cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    resumed, straight = final_weights(run_dir), final_weights(tmp_path / "straight")
    assert read_train_state(latest_checkpoint(run_dir))["step"] == 80
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_crash_mid_save_keeps_the_previous_checkpoint(tiny_config, monkeypatch):
    trainer = Trainer(tiny_config("decoder", "trainer.max_steps=4", "trainer.sample_tokens=0"))
    trainer.fit()
    good = latest_checkpoint(trainer.run_dir)
    real_save = torch.save

    def crash_on_train_state(obj, path, *a, **k):
        if isinstance(path, (str, os.PathLike)) and Path(path).name == checkpoint_module.TRAIN_STATE:
            raise OSError("disk full")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(checkpoint_module.torch, "save", crash_on_train_state)
    trainer.step += 1
    with pytest.raises(OSError, match="disk full"):
        trainer.save()
    monkeypatch.undo()
    assert latest_checkpoint(trainer.run_dir) == good
    assert list(trainer.run_dir.glob(".step-*.partial"))
    trainer.save()  # the next save clears the leftover
    assert not list(trainer.run_dir.glob(".step-*.partial"))
    assert latest_checkpoint(trainer.run_dir).name == "step-0000005"


def test_keep_last_k(tiny_config):
    trainer = Trainer(
        tiny_config(
            "decoder", "trainer.max_steps=6", "trainer.checkpoint_interval=1", "trainer.keep_last_k=2"
        )
    )
    trainer.fit()
    assert [p.name for p in complete_checkpoints(trainer.run_dir)] == ["step-0000005", "step-0000006"]


def test_a_kill_while_pruning_or_saving_leaves_at_most_k_whole_checkpoints(tiny_config, monkeypatch):
    """keep_last_k=2 with a save every step. Killed inside the deletion of an old checkpoint: that folder is no
    longer a step folder (no resume takes a half-deleted one for the newest), and the next save clears it.
    Killed just before the new checkpoint moves in: the old ones are already down to k - 1."""
    trainer = Trainer(
        tiny_config(
            "decoder", "trainer.max_steps=3", "trainer.checkpoint_interval=1", "trainer.keep_last_k=2"
        )
    )
    trainer.fit()
    run_dir = trainer.run_dir
    real_rmtree, real_replace = checkpoint_module.shutil.rmtree, checkpoint_module.os.replace

    def killed_while_deleting(path, *a, **k):
        if str(path).endswith(".pruned"):
            (Path(path) / "__0_0.distcp").unlink()  # part of it gone, then the process dies
            raise KeyboardInterrupt
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", killed_while_deleting)
    trainer.step += 1
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step-0000003"]
    assert latest_checkpoint(run_dir).name == "step-0000003" and (run_dir / ".step-0000002.pruned").is_dir()
    monkeypatch.undo()

    def killed_before_moving_in(src, dst):
        if Path(src).name.endswith(".partial"):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    trainer.save()  # step 4 (clears the leftover), then step 5 killed before it moves in
    assert not list(run_dir.glob(".step-*.pruned"))
    monkeypatch.setattr(checkpoint_module.os, "replace", killed_before_moving_in)
    trainer.step += 1
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step-0000004"]


def nan_at(trainer: Trainer, bad_calls: set[int]) -> None:
    """Make the training forward return a NaN loss on the given (1-based) calls."""
    forward, calls = trainer.forward_model, [0]

    def poisoned(**batch):
        out = forward(**batch)
        calls[0] += 1
        if calls[0] in bad_calls:
            out.loss = out.loss * float("nan")
        return out

    trainer.forward_model = poisoned


def test_nan_loss_stops_naming_the_step(tiny_config):
    """The verdict stays on the device (fused AdamW skips the update itself) and is read at the next log: the
    run stops there naming step 4, with the weights of step 3 (no update from step 4 on was applied)."""
    trainer = Trainer(tiny_config("decoder", "trainer.max_steps=10", "trainer.checkpoint=false"))
    assert trainer.guard_on_device
    nan_at(trainer, {4})
    with pytest.raises(NonFiniteError, match="at step 4"):
        trainer.fit()
    clean = Trainer(
        tiny_config("decoder", "trainer.max_steps=3", "trainer.checkpoint=false", "run_name=clean")
    )
    clean.fit()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    for a, b in zip(trainer.model.parameters(), clean.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_host_side_guard_stops_at_the_step(tiny_config, monkeypatch):
    """An optimizer without found_inf (here: the guard told so) decides on the host, at the step itself."""
    trainer = Trainer(tiny_config("decoder", "trainer.max_steps=10", "trainer.checkpoint=false"))
    trainer.guard_on_device = False
    nan_at(trainer, {4})
    with pytest.raises(NonFiniteError, match="at step 4"):
        trainer.fit()
    assert trainer.step == 3


def test_training_steps_do_not_read_device_values(tiny_config, monkeypatch):
    """No host sync per step: the training code reads tensors back only when it logs, evaluates or saves, so
    5 and 15 steps with one log at the end read the same number of values."""
    import llmtrain.training as training_package

    folder = str(Path(training_package.__file__).parent)
    reads = [0]

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(folder):
                reads[0] += 1
            return original(self, *args, **kwargs)

        return wrapper

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    counts = []
    for steps in (5, 15):
        trainer = Trainer(
            tiny_config(
                "decoder",
                f"trainer.max_steps={steps}",
                "trainer.log_interval=1000",
                "trainer.checkpoint=false",
                f"run_name=reads{steps}",
            )
        )
        trainer.evaluate = lambda: {}  # evaluation reads values by design; the loop is what is counted
        reads[0] = 0
        trainer._loop(StopRequest(), None)
        counts.append(reads[0])
    assert counts[0] == counts[1] and counts[0] > 0, counts


# ops whose CUDA kernels make the host wait for the device: a result size that depends on values, or a value read
_SYNCING_OPS = {
    torch.ops.aten.nonzero.default,
    torch.ops.aten._local_scalar_dense.default,  # .item(), bool(), float(), int()
    torch.ops.aten.masked_select.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
    torch.ops.aten.repeat_interleave.Tensor,
    torch.ops.aten._unique2.default,
    torch.ops.aten.unique_consecutive.default,
}
_INDEXING_OPS = {  # syncing when indexed by a boolean mask (nonzero inside)
    torch.ops.aten.index.Tensor,
    torch.ops.aten.index_put.default,
    torch.ops.aten.index_put_.default,
    torch.ops.aten._index_put_impl_.default,
}


@pytest.mark.parametrize("model", ["decoder", "encoder", "encoder_decoder"])
def test_a_training_step_runs_no_op_that_would_make_a_cuda_device_sync(tiny_config, model):
    """Every op of a training step (forward, backward, clipping, AdamW, the non-finite guard; with document
    attention and gradient accumulation), recorded at the dispatcher on the CPU: none of them is one whose CUDA
    form waits for the device (nonzero, boolean-mask indexing, a value read back). Before the MLM objective
    passed label_positions, the encoder's head selection made 3 such calls per micro-batch."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.syncing: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            masks = [
                t
                for t in tree_leaves((args, kwargs))[1:]
                if isinstance(t, torch.Tensor) and t.dtype == torch.bool
            ]
            if func in _SYNCING_OPS or (func in _INDEXING_OPS and masks):
                self.syncing.append(str(func))
            return func(*args, **kwargs)

    trainer = Trainer(
        tiny_config(
            model,
            "trainer.checkpoint=false",
            "data.document_attention=true",
            "trainer.micro_batch_size=2",
            "trainer.grad_accum_steps=2",
        )
    )
    trainer.train_step()  # the first step builds the optimizer's states
    with Recorder() as recorder:
        trainer.train_step()
        trainer.train_step()
    assert recorder.syncing == [], recorder.syncing
    # an evaluation reads its sums back once at the end, and its micro-batches sync no more than the steps
    with Recorder() as recorder:
        trainer.evaluate()
    assert [op for op in recorder.syncing if "_local_scalar_dense" not in op] == [], recorder.syncing
    # the recorder sees what it looks for: the same model fed without the objective's positions
    batch = trainer.objective(trainer.val_loader.next_batch(), torch.Generator().manual_seed(0))
    batch.pop("label_positions", None)
    with Recorder() as recorder:
        trainer.model(**batch)
    assert (recorder.syncing != []) == (model == "encoder"), recorder.syncing


def test_nan_loss_skipped_then_stopped(tiny_config):
    trainer = Trainer(
        tiny_config(
            "decoder",
            "trainer.max_steps=12",
            "trainer.nonfinite=skip",
            "trainer.max_skips=2",
            "trainer.checkpoint=false",
        )
    )
    nan_at(trainer, {3, 5})
    result = trainer.fit()  # two skips are allowed
    assert result["steps"] == 12 and trainer.guard.skipped == 2
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    trainer2 = Trainer(
        tiny_config("decoder", "trainer.nonfinite=skip", "trainer.max_skips=2", "run_name=again")
    )
    nan_at(trainer2, {2, 3, 4})
    with pytest.raises(NonFiniteError, match="more than trainer.max_skips=2"):
        trainer2.fit()


def test_token_ids_beyond_the_vocabulary_are_named(tiny_config):
    cfg = tiny_config("decoder")
    reference = Trainer(cfg)
    tokens = np.array(reference.corpus.train, dtype=np.uint16)
    tokens[100] = 60000
    bad = Corpus(reference.corpus.tokenizer, tokens, reference.corpus.val, reference.corpus.tokenizer_path)
    with pytest.raises(ConfigError, match="hold id 60000, beyond model.vocab_size=400"):
        Trainer(tiny_config("decoder", "run_name=bad"), corpus=bad)


def test_global_batch_must_divide(tiny_config):
    with pytest.raises(
        ConfigError, match=r"trainer.global_batch_size=20 is not divisible by .*micro_batch_size=8"
    ):
        validate(tiny_config("decoder", "trainer.global_batch_size=20"))
    cfg = tiny_config("decoder", "trainer.global_batch_size=32")
    validate(cfg)
    assert cfg.trainer.grad_accum_steps == 4
    with pytest.raises(ConfigError, match="keep_last_k=1"):
        validate(tiny_config("decoder", "trainer.keep_last_k=1"))


def test_corrupt_data_file_is_named(cache_dir, tmp_path):
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    proc = subprocess.run(
        [sys.executable, "scripts/train.py", *tiny_overrides(bad, cache_dir, tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert any(
        line.startswith("error:") and str(bad) in line and "could not be read" in line
        for line in proc.stderr.splitlines()
    )


def test_secrets_never_reach_logs_or_saved_configs(corpus_file, cache_dir, tmp_path):
    secret = "0123456789abcdef-not-a-real-key-0123456789"
    overrides = tiny_overrides(corpus_file, cache_dir, tmp_path) + [
        "trainer.max_steps=3",
        "logger.wandb=offline",
    ]
    proc = subprocess.run(
        [sys.executable, "scripts/train.py", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_API_KEY": secret},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert secret not in proc.stdout + proc.stderr
    for path in (tmp_path / "decoder-test").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


class _Payload:
    """What a tampered checkpoint would smuggle in: code that runs when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_tampered_or_truncated_checkpoint_is_refused_clearly(tiny_config, tmp_path, caplog):
    import pickle
    import shutil

    trainer = Trainer(tiny_config("decoder", "trainer.max_steps=2", "trainer.sample_tokens=0"))
    trainer.fit()
    good = latest_checkpoint(trainer.run_dir)
    marker = tmp_path / "code-ran"

    tampered = shutil.copytree(good, tmp_path / "tampered")
    (tampered / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    caplog.clear()
    with (
        caplog.at_level("WARNING"),
        pytest.raises(
            ValueError, match=r"could not be loaded: .*\.metadata is damaged or not a checkpoint's"
        ),
    ):
        load_checkpoint(tampered, trainer.model, trainer.optimizer)
    assert not marker.exists()
    # DCP's own warnings with their tracebacks are not shown beside the error
    shown = [r.getMessage() for r in caplog.records if r.name == "root" and "checkpoint" in r.pathname]
    assert shown == [], shown

    truncated = shutil.copytree(good, tmp_path / "truncated")
    data = next(truncated.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"checkpoint {truncated} could not be loaded"):
        load_checkpoint(truncated, trainer.model, trainer.optimizer)

    flipped = shutil.copytree(good, tmp_path / "flipped")  # a damaged tensor file: torch's own advice is
    data = next(flipped.glob("*.distcp"))  # to load it with weights_only=False, which is never safe here
    raw = bytearray(data.read_bytes())
    raw[0] ^= 0xFF  # the first byte of the first stored object
    data.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"checkpoint {flipped} could not be loaded") as refused:
        load_checkpoint(flipped, trainer.model, trainer.optimizer)
    assert "weights_only" not in str(refused.value), refused.value


def test_a_signal_during_the_final_evaluation_lets_the_run_finish(corpus_file, cache_dir, tmp_path):
    """SIGTERM after the last step (here: during the final evaluation) must not kill the run before its
    checkpoint: the handlers stay installed until the run ends, and the final checkpoint comes first."""
    overrides = tiny_overrides(corpus_file, cache_dir, tmp_path, "decoder") + [
        "trainer.max_steps=4",
        "trainer.sample_tokens=0",
    ]
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from llmtrain.config import to_dataclass
from llmtrain.training.trainer import Trainer
from tests.conftest import compose_config
trainer = Trainer(to_dataclass(compose_config({overrides!r})))
evaluate, calls = trainer.evaluate, []
def signalled_final_evaluation():
    calls.append(1)
    if len(calls) == 2:  # the first evaluation is the initial one
        os.kill(os.getpid(), signal.SIGTERM)
    return evaluate()
trainer.evaluate = signalled_final_evaluation
trainer.fit()
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "decoder-test"
    assert latest_checkpoint(run_dir).name == "step-0000004"
    assert json.loads((run_dir / "result.json").read_text())["steps"] == 4


def test_saving_again_at_a_saved_step_keeps_the_checkpoint(tiny_config):
    """A stop right after a periodic save, or a finished run started again, saves at a step that has a
    complete checkpoint: it stays as it is (replacing it left no complete copy while the new one moved in)."""
    trainer = Trainer(tiny_config("decoder", "trainer.max_steps=3", "trainer.sample_tokens=0"))
    trainer.fit()
    final = latest_checkpoint(trainer.run_dir)
    inode = final.stat().st_ino
    assert trainer.save() == final
    assert final.stat().st_ino == inode and latest_checkpoint(trainer.run_dir) == final


def test_a_step_folder_without_its_metadata_is_saved_again(tiny_config):
    """A step folder that lacks DCP's .metadata is incomplete (resume skips it): the run trains back to that
    step and must save it again, whole, not take the folder for done."""
    overrides = ("trainer.max_steps=3", "trainer.sample_tokens=0")
    Trainer(tiny_config("decoder", *overrides)).fit()
    step = checkpoint_module.checkpoint_dir(Trainer(tiny_config("decoder", *overrides)).run_dir, 3)
    (step / ".metadata").unlink()
    again = Trainer(tiny_config("decoder", *overrides))
    assert again.step == 0  # nothing complete to resume from
    again.fit()
    assert latest_checkpoint(again.run_dir) == step and (step / ".metadata").is_file()
    assert not list(again.run_dir.glob(".step-*"))  # no leftover partial or replaced folder


def test_skipped_updates_count_across_a_resume(tiny_config):
    """trainer.max_skips counts the whole run: the skips before a checkpoint come back with it."""
    overrides = ("trainer.nonfinite=skip", "trainer.max_skips=2", "trainer.sample_tokens=0")
    first = Trainer(tiny_config("decoder", "trainer.max_steps=6", *overrides))
    nan_at(first, {3})
    first.fit()
    assert first.guard.skipped == 1
    resumed = Trainer(tiny_config("decoder", "trainer.max_steps=12", *overrides))
    assert resumed.step == 6 and resumed.guard.skipped == 1
