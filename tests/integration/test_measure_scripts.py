"""scripts/estimate_memory.py and scripts/plan.py run as a user runs them, with training overrides."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def run(script: str, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, f"scripts/{script}", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_estimate_memory_prints_a_table_per_strategy_for_any_family():
    result = run(
        "estimate_memory.py",
        "model=encoder_decoder",
        "model.d_model=512",
        "data.seq_len=512",
        "model.max_seq_len=512",
        "trainer.micro_batch_size=8",
        "memory.gpu=A100",
        "memory.world_size=8",
        "parallel=fsdp",  # the training config's strategy: FSDP sharded over 4 of 8 ranks is hybrid
        "parallel.shard_size=4",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "model: encoder_decoder d_model=512" in out
    assert "micro-batch 8 x 512 tokens, 114 decoder tokens (span_corruption)" in out
    for word in (
        "ddp",
        "zero1",
        "zero2",
        "zero3",
        "hybrid*",
        "activations",
        "PEAK",
        "max micro-batch, ckpt on",
    ):
        assert word in out
    assert "A100-" not in out and "fitting: A100 (80.0 GiB, 90% usable)" in out


def test_estimate_memory_rejects_a_bad_option_clearly():
    result = run("estimate_memory.py", "memory.strategy=zero9")
    assert result.returncode == 2 and "strategy='zero9'" in result.stderr
    # FSDP's shard_size without parallel=fsdp: a DDP table, silently (train.py refuses it)
    result = run("estimate_memory.py", "memory.world_size=8", "parallel.shard_size=4")
    assert result.returncode == 2
    assert "error: parallel.shard_size=4 needs parallel.strategy=fsdp, not single" in result.stderr


def test_plan_from_a_budget_gives_both_optima_a_shape_and_time():
    result = run("plan.py", "plan.pf_days=100", "plan.devices=64", "plan.device=H100", "memory.strategy=fsdp")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "64 x H100-SXM at 989 TFLOP/s" in out
    for row in ("20 tokens/param", "fitted-law optimum", "8.49 B", "predicted loss", "model shape", "time"):
        assert row in out
    assert "memory per device: fsdp, bf16, micro-batch 16 x 256 tokens" in out
    # each shape is timed by its own FLOPs on the plan's tokens: 8.69e21 / (64 x 989e12 FLOP/s x 0.4)
    assert row_of(out, "FLOPs (from shapes, clm)")[0] == "8.69e+21"
    assert row_of(out, "time")[0] == f"{8.69e21 / (64 * 989e12 * 0.4) / 86400:.1f} days" == "4.0 days"


def row_of(out: str, label: str) -> list[str]:
    """The values of a plan table row, one per column."""
    line = next(line for line in out.splitlines() if line.startswith(label + "  "))
    return re.split(r"\s{2,}", line[len(label) :].strip())


def test_plan_times_an_encoder_decoder_budget_by_its_shapes():
    """6ND counts a decoder; a T5 runs about half its parameters per corpus token. The budget's time was the
    budget's 6ND (3.7 days here) while the reverse path timed the same model and tokens from its shapes
    (46.7 h); both now take the shapes' count."""
    args = ("model=t5", "data.seq_len=512", "model.vocab_size=32128", "plan.devices=8", "plan.device=H100")
    budget = run("plan.py", *args, "plan.flops=1e21")
    assert budget.returncode == 0, budget.stderr
    flops, time = (
        row_of(budget.stdout, "FLOPs (from shapes, span_corruption)")[0],
        row_of(budget.stdout, "time")[0],
    )
    assert 0.4e21 < float(flops) < 0.7e21
    assert time == f"{float(flops) / (8 * 989e12 * 0.4) / 3600:.1f} h"


def test_plan_takes_a_device_outside_the_table_with_its_peak():
    """plan.device=TPUv5 with plan.peak_tflops: a plan with no memory verdict (memory.gpu, set from it, was
    refused as not in the table)."""
    result = run("plan.py", "plan.device=TPUv5", "plan.peak_tflops=197", "plan.flops=1e20")
    assert result.returncode == 0, result.stderr
    assert "8 x TPUv5 at 197 TFLOP/s" in result.stdout
    memory = row_of(result.stdout, "memory per device")
    assert all(value.endswith("GiB") for value in memory)  # no "(fits ...)"
    unknown = run("plan.py", "plan.device=TPUv5", "plan.flops=1e20")
    assert unknown.returncode == 2 and "plan.device='TPUv5'" in unknown.stderr


def test_plan_reverse_costs_gpt3_and_the_configured_model():
    gpt3 = run("plan.py", "plan.params=175e9", "plan.tokens=300e9")
    assert gpt3.returncode == 0, gpt3.stderr
    assert "3646" in gpt3.stdout  # petaFLOP/s-days (Brown et al.: ~3,640)
    t5 = run("plan.py", "model=t5", "model.vocab_size=32128", "data.seq_len=512", "plan.tokens=34e9")
    assert t5.returncode == 0, t5.stderr
    assert "d_model 768 x 12 layers" in t5.stdout and "248 M" in t5.stdout  # T5 v1.1 base
    assert "FLOPs (from shapes, span_corruption)" in t5.stdout


def test_plan_bad_input_is_a_clear_error():  # the other bad inputs: tests/unit/test_measure_planning.py
    zero = run("plan.py", "plan.flops=0")
    assert zero.returncode == 2 and "plan.flops=0.0 must be > 0" in zero.stderr
    endless = run("plan.py", "plan.pf_days=inf")
    assert endless.returncode == 2 and "plan.pf_days=inf must be > 0 and finite" in endless.stderr


def test_plan_and_estimate_memory_name_an_out_of_range_setting():
    """plan.mfu=0 divided by zero; memory.micro_batch=0 fell back to trainer.micro_batch_size silently."""
    mfu = run("plan.py", "plan.mfu=0")
    assert mfu.returncode == 2 and "error: plan.mfu=0.0 must be in (0, 1]" in mfu.stderr, mfu.stderr[-2000:]
    batch = run("estimate_memory.py", "memory.micro_batch=0")
    assert batch.returncode == 2 and "error: memory.micro_batch=0 must be >= 1" in batch.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch", "-2"], "argument --batch: -2 is not allowed; allowed: >= 1"),
        (["--steps", "0"], "argument --steps: 0 is not allowed; allowed: >= 1"),
        (["--steps", "-3"], "argument --steps: -3 is not allowed; allowed: >= 1"),
        (["--warmup", "x"], "argument --warmup: 'x' is not an integer"),
        (["--json", "."], "argument --json: . is a folder"),
        (
            ["--reshard-after-forward", "true"],
            "--reshard-after-forward: true applies to --parallel fsdp, not single",
        ),
    ],
)
def test_bench_arguments_are_checked_before_any_work(args, message, capsys):
    """--batch -2 allocated until killed, --steps 0 divided by zero, --steps -3 printed negative tok/s."""
    with pytest.raises(SystemExit) as exit_:
        bench_script().parse_args(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert bench_script().parse_args(["--steps", "1", "--warmup", "0", "--batch", "2"]).steps == 1


@functools.cache
def bench_script():
    spec = importlib.util.spec_from_file_location("bench_script", ROOT / "scripts" / "bench.py")
    module = sys.modules["bench_script"] = importlib.util.module_from_spec(spec)  # its dataclasses look it up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "scripts" / "profiling").glob("*.py")))
def test_profiling_scripts_answer_help_without_running(script):
    """Four of them read sys.argv by hand: `--help` ran the benchmark with precision "--help" (the Trainer took
    the name), or failed on a tokenizer path "--help"."""
    result = run(f"profiling/{script}", "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage:") and "steps (ms)" not in result.stdout


def test_the_trainer_refuses_a_precision_it_does_not_know():
    from llmtrain.config import ConfigError
    from llmtrain.training.trainer import resolve_precision

    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    with pytest.raises(ConfigError, match="trainer.precision='--help' is not allowed; allowed: auto, bf16"):
        resolve_precision("--help", torch.device("cpu"))


def test_bench_published_shapes_are_the_presets_they_are_named_after():
    """bert_base was a pre-norm GPT-2-style encoder and t5_base a rotary/SwiGLU/tied encoder-decoder (222.9M):
    their MFU figures did not measure the recipes. They are the presets' architectures now, at the published
    sizes (T5 v1.1 base: 247,577,856 parameters, as HF's untied T5 counts)."""
    from dataclasses import replace

    from llmtrain.measure.shapes import parameter_count

    shapes = bench_script().SHAPES
    counts = {name: parameter_count(replace(shapes[name][0], vocab_size=shapes[name][2])) for name in shapes}
    assert counts["t5_base"] == 247_577_856 and counts["gpt2_124m"] == 124_475_904
    bert, t5 = shapes["bert_base"][0], shapes["t5_base"][0]
    assert (bert.norm_position, bert.n_token_types, bert.head_transform, bert.embedding_norm) == (
        "post",
        2,
        True,
        True,
    )
    assert (t5.position, t5.mlp, t5.tie_embeddings) == ("relative", "geglu", False)


def test_bench_probes_the_matmul_peak_on_this_ranks_gpu(monkeypatch):
    """Under torchrun every rank probed torch's current device, GPU 0 until the Trainer selects the rank's own:
    eight ranks timing one GPU at once made its peak low and MFU(measured) high. CUDA is stood in for."""
    bench = bench_script()
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    selected, probed = [], []
    monkeypatch.setattr(torch.cuda, "set_device", selected.append)
    monkeypatch.setattr(
        bench, "measure_matmul_peak", lambda dtype, device, *a, **k: probed.append(device) or 1e15
    )

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(bench, "bench", stop)
    with pytest.raises(Stop):
        bench.benchmark(bench.parse_args(["--shapes", "gpt2_124m"]))
    assert selected == [torch.device("cuda", 3)] and probed == [torch.device("cuda", 3)] * 2


def test_bench_runs_a_step_of_each_family_end_to_end(tmp_path):
    """No test ran bench.py past its arguments: its stand-in tokenizer lacked what the trainer came to read
    (bytes_exact), and every bench, profiling and GPU-check command failed at the Trainer."""
    out = tmp_path / "bench.json"
    shapes = ["decoder_tiny", "encoder_small", "t5_small"]
    args = ["--shapes", *shapes, "--precisions", "fp32", "--steps", "1", "--warmup", "0", "--batch", "1"]
    result = run("bench.py", *args, "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["shape"] for r in rows] == shapes
    assert all(
        r["tokens_per_s"] > 0 and 0 < r["mfu_measured_peak"] and r["estimated_peak_gib"] > 0 for r in rows
    )
