"""Every strategy computes the same training as one process (CPU, gloo, 2 and 4 ranks under torchrun).

The global batch is the same in every run (micro-batch x ranks x accumulation = 8 windows, the same windows),
and the model a CLM decoder in fp32, so the validation loss after 8 steps must agree to float noise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import ROOT, tiny_overrides
from tests.helpers import (
    final_weights,
    kill_and_resume,
    launch,
    max_weight_difference,
    run_on_ranks,
    step_losses,
)

pytestmark = pytest.mark.distributed
STEPS = 8


def runner(corpus_file, cache_dir, out):
    def go(name: str, nproc: int, micro_batch: int, *extra: str) -> dict:
        overrides = tiny_overrides(corpus_file, cache_dir, out) + [
            f"run_name={name}",
            f"trainer.max_steps={STEPS}",
            f"trainer.micro_batch_size={micro_batch}",
            "trainer.sample_tokens=0",
            "trainer.num_threads=1",
            "trainer.log_interval=1",
            *extra,
        ]
        proc = launch(nproc, overrides)
        result = json.loads((out / name / "result.json").read_text())
        result["log"] = proc.stderr
        result["losses"] = step_losses(out / name)
        result["weights"] = final_weights(out / name)
        return result

    return go


@pytest.fixture
def run(corpus_file, cache_dir, tmp_path):
    return runner(corpus_file, cache_dir, tmp_path)


@pytest.fixture(scope="module")
def reference(corpus_file, cache_dir, tmp_path_factory):
    """The uninterrupted one-process run every layout must reproduce."""
    return runner(corpus_file, cache_dir, tmp_path_factory.mktemp("reference"))("single", 1, 8)


@pytest.mark.parametrize(
    ("name", "nproc", "micro_batch", "extra"),
    [
        ("ddp", 2, 4, ["parallel=ddp"]),
        ("single_under_torchrun", 2, 4, []),  # the default parallel=single becomes DDP on several ranks
        ("ddp_accum", 2, 2, ["parallel=ddp", "trainer.grad_accum_steps=2"]),
        ("ddp_zero1", 2, 4, ["parallel=ddp", "parallel.zero1=true"]),
        ("fsdp", 2, 4, ["parallel=fsdp"]),
        # one process: FSDP wraps only when asked for its own behaviour (`fsdp_wraps`)
        ("fsdp_one_process", 1, 8, ["parallel=fsdp", "parallel.reshard_after_forward=false"]),
        (
            "fsdp_zero2_ckpt",
            2,
            4,
            [
                "parallel=fsdp",
                "parallel.reshard_after_forward=false",
                "parallel.activation_checkpointing=true",
            ],
        ),
        ("fsdp_replicate", 2, 4, ["parallel=fsdp", "parallel.shard_size=1"]),
        ("hsdp", 4, 2, ["parallel=fsdp", "parallel.shard_size=2"]),
        # accumulation: FSDP reduce-scatters every micro-step, HSDP defers only the all-reduce
        ("fsdp_accum", 2, 2, ["parallel=fsdp", "trainer.grad_accum_steps=2"]),
        ("hsdp_accum", 4, 1, ["parallel=fsdp", "parallel.shard_size=2", "trainer.grad_accum_steps=2"]),
    ],
)
def test_strategy_matches_single_process(run, reference, name, nproc, micro_batch, extra):
    """Per-step losses and final weights within 1e-5 of one process on the same global batch."""
    result = run(name, nproc, micro_batch, *extra)
    assert result["steps"] == STEPS and list(result["losses"]) == list(range(1, STEPS + 1))
    for step, loss in reference["losses"].items():
        assert result["losses"][step] == pytest.approx(loss, abs=1e-5), step
    assert max_weight_difference(result["weights"], reference["weights"]) < 1e-5
    assert result["val_loss"] == pytest.approx(reference["val_loss"], abs=1e-5)
    assert result["val_loss"] < reference["initial_val_loss"]
    assert result["tokens"] == reference["tokens"] == STEPS * 8 * 32  # all ranks' input tokens (seq_len 32)
    if name == "single_under_torchrun":  # the run says what it is
        assert "x 2 (ddp, from parallel=single on several ranks)" in result["log"]


def test_full_sharding_holds_about_half_the_state_of_ddp(run):
    """Parameters + gradients + Adam states held by a rank, from its local tensors: FSDP on 2 <= 0.55 x DDP."""
    ddp = run("mem_ddp", 2, 4, "parallel=ddp")["state_bytes_rank0"]
    fsdp = run("mem_fsdp", 2, 4, "parallel=fsdp")["state_bytes_rank0"]
    assert all(ddp[k] > 0 for k in ("parameters", "gradients", "optimizer"))
    assert sum(fsdp.values()) <= 0.55 * sum(ddp.values()), (fsdp, ddp)


ACCUMULATION = textwrap.dedent(
    """
    from types import SimpleNamespace
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from llmtrain.distributed.env import destroy, init_distributed
    from llmtrain.distributed.parallelize import apply_fsdp
    from llmtrain.models import ModelConfig, build_model
    from llmtrain.training.trainer import Trainer

    info = init_distributed("cpu")
    model = build_model(ModelConfig("decoder", vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16))
    full = {name: p.numel() for name, p in model.named_parameters()}
    apply_fsdp(model, init_device_mesh("cpu", (2,), mesh_dim_names=("shard",)), "bf16")
    trainer = SimpleNamespace(fsdp=True, model=model, forward_model=model)
    ids = torch.randint(0, 64, (2, 16))
    with Trainer.gradient_sync(trainer, False):  # the first of two micro-steps
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, ids).loss
        loss.backward()
    # what a rank holds between micro-steps: its shard of each gradient, and no whole (unsharded) gradient
    groups = [m._get_fsdp_state()._fsdp_param_group for m in model.modules() if hasattr(m, "_get_fsdp_state")]
    whole = sum(fp.unsharded_accumulated_grad is not None for g in groups if g for fp in g.fsdp_params)
    print(f"rank {info.rank} whole gradients {whole}", flush=True)
    for name, p in model.named_parameters():
        local = 0 if p.grad is None else p.grad.to_local().numel()
        print(f"rank {info.rank} {name} full {full[name]} local {local}", flush=True)
    destroy()
    """
)


def test_fsdp_accumulation_keeps_gradients_sharded(tmp_path):
    """Between micro-steps of accumulation a rank holds only its shard of each gradient (a whole fp32
    gradient per rank, deferred to the last micro-step, would cost 4 bytes a parameter: more than all the
    sharded states together on a few ranks)."""
    proc = run_on_ranks(tmp_path, ACCUMULATION)
    assert sorted(re.findall(r"rank (\d) whole gradients (\d+)", proc.stdout)) == [("0", "0"), ("1", "0")]
    rows = re.findall(r"rank (\d) (\S+) full (\d+) local (\d+)", proc.stdout)
    assert len(rows) > 10 and {rank for rank, *_ in rows} == {"0", "1"}, proc.stdout
    for rank, name, full, local in rows:
        assert 0 < int(local) <= (int(full) + 1) // 2, (rank, name, full, local)


@pytest.mark.parametrize(
    ("first", "then"),
    [
        ((2, 4, ["parallel=fsdp"]), (1, 8, [])),
        ((2, 4, ["parallel=ddp"]), (2, 4, ["parallel=fsdp"])),
        ((4, 2, ["parallel=fsdp", "parallel.shard_size=2"]), (2, 4, ["parallel=ddp"])),
        ((2, 4, ["parallel=ddp", "parallel.zero1=true"]), (2, 4, ["parallel=ddp", "parallel.zero1=true"])),
    ],
    ids=["fsdp2-to-single", "ddp-to-fsdp", "hsdp4-to-ddp2", "zero1-to-zero1"],
)
def test_checkpoint_resumes_under_another_strategy(run, reference, tmp_path, first, then):
    """A run saves at step 4 of 8 and is stopped; another strategy and world size resumes it and ends
    exactly where the uninterrupted single-process run does (model, Adam states, schedule, data position)."""
    nproc, micro_batch, extra = first
    run("moved", nproc, micro_batch, *extra, "trainer.checkpoint_interval=4")
    shutil.rmtree(tmp_path / "moved" / f"step-{STEPS:07d}")  # as if stopped right after step 4
    nproc, micro_batch, extra = then
    resumed = run("moved", nproc, micro_batch, *extra)
    # steps 5..8 after the move continue the reference's loss curve, and the weights end where its do
    for step in range(STEPS // 2 + 1, STEPS + 1):
        assert resumed["losses"][step] == pytest.approx(reference["losses"][step], abs=1e-5), step
    assert max_weight_difference(resumed["weights"], reference["weights"]) < 1e-5
    assert resumed["state_bytes_rank0"]["optimizer"] > 0  # the resumed rank's own Adam states, counted


def test_fsdp_encoder_decoder_trains_and_generates(corpus_file, cache_dir, tmp_path):
    """Generation calls encode()/decode() directly; under FSDP those gather parameters on every rank too."""
    overrides = tiny_overrides(corpus_file, cache_dir, tmp_path, "encoder_decoder") + [
        "trainer.max_steps=4",
        "trainer.num_threads=1",
        "trainer.sample_tokens=8",
        "parallel=fsdp",
    ]
    proc = launch(2, overrides)
    assert "model:" in proc.stderr and "sample:" in proc.stderr
    assert proc.stderr.count("sample:") == 1  # rank 0 alone logs


def start_torchrun(overrides: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.Popen(
        cmd + [str(ROOT / "scripts" / "train.py"), *overrides],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for_step(proc: subprocess.Popen, run_dir, step: int) -> None:
    deadline = time.monotonic() + 120
    while not ((run_dir / "metrics.jsonl").is_file() and max(step_losses(run_dir), default=0) >= step):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)


def worker_pids(proc: subprocess.Popen) -> list[int]:
    pids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(pids) == 2
    return sorted(map(int, pids))


DDP_LONG = [
    "trainer.num_threads=1",
    "trainer.sample_tokens=0",
    "trainer.log_interval=1",
    "trainer.micro_batch_size=4",
]


def test_sigterm_to_the_ranks_under_torchrun_then_resume_continues_the_curve(
    corpus_file, cache_dir, tmp_path
):
    """SIGTERM to both ranks (as a scheduler kills a job's processes): exit 0 with a complete checkpoint; the
    same command resumes and its per-step losses and final weights match an uninterrupted run within 1e-6."""
    overrides = (
        tiny_overrides(corpus_file, cache_dir, tmp_path) + DDP_LONG + ["trainer.max_steps=40", "parallel=ddp"]
    )
    run_dir = tmp_path / "decoder-test"
    proc = start_torchrun(overrides)
    wait_for_step(proc, run_dir, 5)
    for pid in worker_pids(proc):
        os.kill(pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "outlived destroy_process_group" not in stderr
    stopped = json.loads((run_dir / "result.json").read_text())
    assert stopped["stopped"] == "SIGTERM" and 5 <= stopped["steps"] < 40
    assert (run_dir / f"step-{stopped['steps']:07d}" / "train_state.pt").is_file()
    launch(2, overrides)
    launch(2, overrides + ["run_name=straight"])
    resumed, straight = step_losses(run_dir), step_losses(tmp_path / "straight")
    assert max(resumed) == 40
    for step in range(1, 41):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), step
    assert max_weight_difference(final_weights(run_dir), final_weights(tmp_path / "straight")) < 1e-6


def test_kill_9_under_ddp_then_resume_within_1e6(corpus_file, cache_dir, tmp_path):
    """SIGKILL of the launcher and both ranks at 2 moments (one inside a save), resuming after each."""
    overrides = tiny_overrides(corpus_file, cache_dir, tmp_path) + DDP_LONG
    overrides += [
        "trainer.max_steps=60",
        "parallel=ddp",
        "trainer.checkpoint_interval=1",
        "trainer.keep_last_k=2",
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(ROOT / "scripts" / "train.py"), *overrides]
    kill_and_resume(cmd, tmp_path / "decoder-test", delays=[0.15, 0.0], during_save=1)
    launch(2, overrides)
    launch(2, overrides + ["run_name=straight", "trainer.checkpoint_interval=0"])
    difference = max_weight_difference(
        final_weights(tmp_path / "decoder-test"), final_weights(tmp_path / "straight")
    )
    assert difference < 1e-6


def test_a_signal_to_one_rank_stops_all_ranks_with_a_checkpoint(corpus_file, cache_dir, tmp_path):
    """SIGUSR1 reaches rank 1 alone; the ranks agree at the next step boundary, save together and exit 0."""
    overrides = tiny_overrides(corpus_file, cache_dir, tmp_path) + [
        "trainer.max_steps=2000",
        "trainer.num_threads=1",
        "trainer.sample_tokens=0",
        "trainer.log_interval=5",
        "trainer.micro_batch_size=4",
        "parallel=ddp",
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.Popen(
        cmd + [str(ROOT / "scripts" / "train.py"), *overrides], cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    metrics = tmp_path / "decoder-test" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and '"loss"' in metrics.read_text()):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(sorted(workers, key=int)[-1]), signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "outlived destroy_process_group" not in stderr
    result = json.loads((tmp_path / "decoder-test" / "result.json").read_text())
    assert result["stopped"] in ("SIGUSR1", "SIGUSR1 (another rank)") and result["steps"] < 2000
    assert (tmp_path / "decoder-test" / f"step-{result['steps']:07d}" / "train_state.pt").is_file()


DROPOUT = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist
    from llmtrain.config import to_dataclass
    from llmtrain.distributed.env import destroy
    from llmtrain.training.trainer import Trainer
    from tests.conftest import compose_config

    overrides = sys.argv[1:] if len(sys.argv) > 1 else OVERRIDES
    trainer = Trainer(to_dataclass(compose_config(overrides)))
    dropout = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout))
    masks = []
    dropout.register_forward_hook(lambda module, args, out: masks.append(out == 0))
    trainer.train_step()
    mine = masks[0].flatten().float()
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    if dist.get_rank() == 0:
        print(f"dropped {mine.mean():.3f} identical {bool(torch.equal(everyone[0], everyone[1]))}", flush=True)
        print("mask0", "".join(str(int(v)) for v in everyone[0][:64].tolist()), flush=True)
    destroy()
    """
)


def test_each_rank_draws_its_own_dropout_masks(corpus_file, cache_dir, tmp_path):
    """The weights come from one seed on every rank; dropout then drew the same masks on every rank too (row i
    of each rank's micro-batch masked alike: half the independent masks of one process's global batch).
    Masks are still reproducible: a second launch draws the same ones."""
    overrides = tiny_overrides(corpus_file, cache_dir, tmp_path) + [
        "parallel=ddp",
        "model.dropout=0.1",
        "trainer.micro_batch_size=4",
        "trainer.num_threads=1",
        "trainer.prefetch=0",
    ]
    source = f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nOVERRIDES = {overrides!r}\n" + DROPOUT
    runs = [run_on_ranks(tmp_path, source).stdout for _ in range(2)]
    for out in runs:
        dropped, identical = re.search(r"dropped ([\d.]+) identical (\w+)", out).groups()
        assert 0.05 < float(dropped) < 0.15 and identical == "False", out
    assert re.search(r"mask0 (\d+)", runs[0]).group(1) == re.search(r"mask0 (\d+)", runs[1]).group(1)


def test_an_error_on_rank_0_alone_ends_every_rank_with_it(corpus_file, cache_dir, tmp_path):
    """Rank 0 reads the data (and writes the run directory) while the others wait for it: its DataError left
    them in a barrier that its exit broke, with a gloo traceback ("Connection closed by peer") named as the
    root cause. Every rank now ends with rank 0's one-line error, rc 2."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    overrides = [
        o if not o.startswith("data.paths=") else f"data.paths=[{bad}]"
        for o in tiny_overrides(corpus_file, tmp_path / "fresh-cache", tmp_path)
    ] + ["parallel=ddp", "trainer.num_threads=1"]
    proc = launch(2, overrides, returncode=1)  # torchrun's own code for a failed rank (each exits 2)
    errors = re.findall(
        r"error: data.paths: \S*bad.jsonl: could not be read: line 2 is not valid JSON", proc.stderr
    )
    assert len(errors) == 2, proc.stderr[-3000:]
    assert "Connection closed by peer" not in proc.stderr and "exitcode  : 2" in proc.stderr


ZERO1_GUARD = textwrap.dedent(
    """
    import torch
    from llmtrain.config import to_dataclass
    from llmtrain.distributed.env import destroy
    from llmtrain.training.guards import StopRequest
    from llmtrain.training.trainer import Trainer
    from tests.conftest import compose_config

    reads = [0]
    item = torch.Tensor.item

    def counted(self):
        reads[0] += 1
        return item(self)

    trainer = Trainer(to_dataclass(compose_config(OVERRIDES)))
    forward, calls = trainer.forward_model, [0]

    def poisoned(**batch):  # a NaN loss on the 3rd micro-batch of rank 0
        out = forward(**batch)
        calls[0] += 1
        if calls[0] == 3 and trainer.dist.rank == 0:
            out.loss = out.loss * float("nan")
        return out

    trainer.forward_model = poisoned
    trainer.evaluate = lambda: {}
    torch.Tensor.item = counted
    trainer._loop(StopRequest(), None)
    torch.Tensor.item = item
    finite = all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())
    print(f"rank {trainer.dist.rank} on_device {trainer.guard_on_device} reads {reads[0]} "
          f"skipped {trainer.guard.skipped} finite {finite}", flush=True)
    destroy()
    """
)


def test_zero1_keeps_the_non_finite_verdict_on_the_device(corpus_file, cache_dir, tmp_path):
    """ZeRO-1's wrapper takes no found_inf, so the guard read the loss and gradient norm on the host every
    step; the verdict now goes to the fused AdamW it wraps: 12 steps read a fixed number of values (the final
    log's), and the NaN step is skipped on both ranks."""
    overrides = tiny_overrides(corpus_file, cache_dir, tmp_path) + [
        "parallel=ddp",
        "parallel.zero1=true",
        "trainer.max_steps=12",
        "trainer.log_interval=1000",
        "trainer.checkpoint=false",
        "trainer.stop_check_interval=1000",
        "trainer.nonfinite=skip",
        "trainer.micro_batch_size=4",
        "trainer.num_threads=1",
        "trainer.sample_tokens=0",
    ]
    source = f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nOVERRIDES = {overrides!r}\n" + ZERO1_GUARD
    rows = re.findall(
        r"rank (\d) on_device (\w+) reads (\d+) skipped (\d+) finite (\w+)",
        run_on_ranks(tmp_path, source).stdout,
    )
    assert sorted(r[0] for r in rows) == ["0", "1"], rows
    for _, on_device, reads, skipped, finite in rows:
        assert (on_device, skipped, finite) == ("True", "1", "True") and int(reads) <= 4, rows


RANK_ZERO_FIRST = textwrap.dedent(
    """
    from llmtrain.data import DataError
    from llmtrain.distributed.env import destroy, init_distributed, rank_zero_first

    info = init_distributed("cpu")

    def local_error():
        class Local(Exception):  # a class pickle cannot name
            pass

        raise Local("boom")

    for fn, name in ((lambda: (_ for _ in ()).throw(DataError("bad data")), "data"), (local_error, "local")):
        try:
            rank_zero_first(fn if info.rank == 0 else (lambda: "read"), name)
        except Exception as err:
            print(f"rank {info.rank} {name} {type(err).__name__}: {err}", flush=True)
    print(f"rank {info.rank} both", rank_zero_first(lambda: info.rank, "nothing"), flush=True)
    destroy()
    """
)


def test_rank_zero_first_raises_rank_0s_error_on_every_rank(tmp_path):
    """Rank 0's error reaches the others by class and message; a class pickle cannot name (defined in a
    function) arrives as a RuntimeError naming it, instead of failing rank 0's broadcast and leaving the others
    waiting out the timeout. Without an error each rank runs the function itself, rank 0 first."""
    out = run_on_ranks(tmp_path, RANK_ZERO_FIRST).stdout
    for rank in "01":
        assert f"rank {rank} data DataError: bad data" in out, out
        assert f"rank {rank} both {rank}" in out, out
    assert "rank 0 local Local: boom" in out and "rank 1 local RuntimeError: Local: boom" in out, out


STOP_REASON = textwrap.dedent(
    """
    from llmtrain.distributed.env import destroy, init_distributed
    from llmtrain.training.guards import StopRequest

    info = init_distributed("cpu")
    stop = StopRequest()
    print(f"rank {info.rank} first {stop.agreed()} {stop.reason}", flush=True)
    if info.rank == 1:
        stop.reason = "SIGTERM"  # as the handler sets it
    print(f"rank {info.rank} then {stop.agreed()} {stop.reason}", flush=True)
    stop.restore()
    destroy()
    """
)


def test_the_ranks_agree_on_why_the_run_stops(tmp_path):
    """A stop one rank was asked for (its time limit, a signal) was "another rank" on the others, rank 0
    included: its log and result.json did not say why the run stopped."""
    out = run_on_ranks(tmp_path, STOP_REASON).stdout
    for rank in "01":
        assert f"rank {rank} first False None" in out, out
    assert "rank 0 then True SIGTERM (another rank)" in out and "rank 1 then True SIGTERM" in out, out
