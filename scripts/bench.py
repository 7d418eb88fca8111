"""Training throughput and MFU of the real training step, for each family at a few sizes.

    python scripts/bench.py                                   # tiny + small shapes, fp32 and bf16, this device
    python scripts/bench.py --shapes gpt2_124m bert_base t5_base --precisions bf16 --compile

Synthetic tokens feed the real Trainer (objective, model, optimizer, precision, parallel wrapping), so the step
timed is the step that trains. MFU is reported against the matmul peak measured in the same run (the honest
figure on a CPU) and, on a known GPU, against its datasheet peak. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from llmtrain.cli import number
from llmtrain.config import TrainConfig
from llmtrain.data import Corpus
from llmtrain.distributed.env import destroy
from llmtrain.measure.flops import forward_flops, measure_matmul_peak
from llmtrain.measure.hardware import accelerator_of_device
from llmtrain.measure.memory import Setup, estimate_memory
from llmtrain.measure.options import strategy_of
from llmtrain.measure.shapes import lengths_for
from llmtrain.models import ModelConfig, count_parameters
from llmtrain.training.trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def preset_model(name: str) -> ModelConfig:
    """The architecture of configs/model/<name>.yaml (its `model:` fields, read as data)."""
    return ModelConfig(**OmegaConf.to_container(OmegaConf.load(CONFIGS / "model" / f"{name}.yaml"))["model"])


# (family, model shape, seq_len, vocab, micro-batch); the published shapes are the presets' architectures
GPT2 = dict(norm="layernorm", mlp="gelu", position="learned", bias=True)
SHAPES: dict[str, tuple[ModelConfig, int, int, int]] = {
    "decoder_tiny": (ModelConfig("decoder", d_model=128, n_layers=2, n_heads=4, max_seq_len=128), 128, 4096, 16),
    "decoder_small": (ModelConfig("decoder", d_model=384, n_layers=6, n_heads=6, max_seq_len=256), 256, 4096, 16),
    "encoder_small": (ModelConfig("encoder", d_model=384, n_layers=6, n_heads=6, max_seq_len=256, **GPT2), 256, 4096, 16),
    "t5_small": (ModelConfig("encoder_decoder", d_model=384, n_layers=4, n_heads=6, max_seq_len=256), 256, 4096, 16),
    "gpt2_124m": (ModelConfig("decoder", d_model=768, n_layers=12, n_heads=12, max_seq_len=1024, **GPT2), 1024, 50304, 16),
    "bert_base": (preset_model("bert"), 512, 30528, 32),  # post-norm, token types, MLM head transform
    "t5_base": (preset_model("t5"), 512, 32128, 32),  # T5 v1.1: relative bias, GEGLU, untied head
}  # fmt: skip
OBJECTIVE = {"decoder": "clm", "encoder": "mlm", "encoder_decoder": "span_corruption"}


class SyntheticTokenizer:
    """What the trainer needs of a tokenizer, for a vocabulary of any size, without training one."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.pad_id, self.bos_id, self.eos_id, self.unk_id, self.mask_id = range(5)
        self.sentinel_ids = list(range(5, 105))
        self.special_ids = list(range(105))
        self.bytes_exact = True  # 4 bytes a token, by definition (no text behind the ids)

    def token_bytes(self) -> torch.Tensor:
        lengths = torch.full((self.vocab_size,), 4, dtype=torch.long)
        lengths[: len(self.special_ids)] = 0
        return lengths

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


@dataclass
class Result:
    shape: str
    precision: str
    compile: bool
    parallel: str
    params_m: float
    micro_batch: int
    step_ms: float
    tokens_per_s: float
    tflops: float
    mfu_measured_peak: float
    mfu_datasheet: float | None
    peak_memory_gib: float
    """CUDA: this row's peak allocated tensor memory. CPU: the process's peak resident set so far, which cannot
    be reset, so it includes the rows before (and the matmul probes); --track-memory gives this row's tensors."""
    data_wait_fraction: float
    """Share of the step the training thread spent blocked waiting for the prefetched batch."""
    activation_checkpointing: bool = False
    estimated_peak_gib: float = 0.0
    """llmtrain.measure.memory's estimate of the step's peak tensor memory."""
    tracked_peak_gib: float | None = None
    """--track-memory: peak tensor bytes of one step seen by MemTracker (CPU; counts tensors, not the heap)."""
    reshard_after_forward: bool | None = None
    """parallel.reshard_after_forward (--reshard-after-forward; null: auto)."""
    runs: str = ""
    """What ran (the trainer's strategy name): parallel=fsdp on one device is the plain model unless resharding
    is set (`fsdp_wraps`)."""


def make_trainer(
    name: str,
    precision: str,
    compile_: bool,
    parallel: str,
    batch: int | None,
    out: Path,
    ac: bool = False,
    documents: int = 0,
    reshard: bool | None = None,
) -> Trainer:
    """documents > 0: an EOS every `documents` tokens and data.document_attention=true (block-diagonal masks).
    reshard: parallel.reshard_after_forward (set, FSDP wraps on one device too)."""
    model, seq_len, vocab, micro_batch = SHAPES[name]
    cfg = TrainConfig()
    cfg.model = replace(model, vocab_size=vocab)
    cfg.objective.name = OBJECTIVE[model.family]
    cfg.data.seq_len = seq_len
    cfg.trainer.micro_batch_size = batch or micro_batch
    cfg.trainer.precision, cfg.trainer.progress, cfg.trainer.checkpoint = precision, False, False
    cfg.trainer.max_steps, cfg.trainer.eval_batches = 10**6, 1
    cfg.parallel.strategy, cfg.parallel.compile = parallel, compile_
    cfg.parallel.activation_checkpointing = ac
    cfg.parallel.reshard_after_forward = reshard
    cfg.logger.wandb, cfg.logger.jsonl = "disabled", False
    cfg.output_dir, cfg.run_name = str(out), f"{name}-{precision}-{compile_}-{parallel}"
    rng = np.random.default_rng(0)
    tokens = rng.integers(105, vocab, size=4_000_000, dtype=np.int64).astype(np.uint32)
    tokenizer = SyntheticTokenizer(vocab)
    if documents:
        tokens[documents - 1 :: documents] = tokenizer.eos_id
        cfg.data.document_attention = True
    corpus = Corpus(tokenizer, tokens, tokens[:200_000], Path("synthetic"))
    return Trainer(cfg, corpus=corpus)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tracked_step_peak(trainer: Trainer) -> int:
    """Peak tensor bytes of one training step, as torch's MemTracker sees them (parameters, gradients,
    optimizer states, activations and temporaries of the training thread)."""
    import warnings

    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(trainer.model, trainer.optimizer)
    with warnings.catch_warnings(), tracker:
        warnings.simplefilter("ignore")
        trainer.train_step()
    return max(device["Total"] for device in tracker.get_tracker_snapshot("peak").values())


def bench(
    name: str, precision: str, compile_: bool, parallel: str, steps: int, warmup: int, batch, peaks, out,
    ac: bool = False, track_memory: bool = False, documents: int = 0, reshard: bool | None = None,
):  # fmt: skip
    trainer = make_trainer(name, precision, compile_, parallel, batch, out, ac, documents, reshard)
    device = trainer.device
    for _ in range(warmup):
        trainer.train_step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    waited = trainer.batches.wait_seconds
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    trainer.guard.check()  # a non-finite step: raise, as a run would at its next log
    sequences = trainer.cfg.trainer.micro_batch_size * trainer.cfg.trainer.grad_accum_steps
    flops = forward_flops(trainer.cfg.model, lengths_for(trainer.cfg)).training * sequences / seconds
    peak_key = "bf16" if precision == "bf16" else "fp32"
    sheet = accelerator_of_device(peaks.get("device", "")) if device.type == "cuda" else None
    datasheet = sheet.peak_flops("bf16") if sheet else None  # the trainer's table (H100 PCIe: 756, not 989)
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated(device)
    else:
        import resource

        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    strategy, shard = strategy_of(trainer.cfg.parallel, trainer.dist.world_size, trainer.precision)
    setup = Setup(
        strategy=strategy,
        world_size=trainer.dist.world_size,
        shard_size=shard,
        precision=trainer.precision,
        activation_checkpointing=ac,
        grad_accum_steps=trainer.cfg.trainer.grad_accum_steps,
        optimizer="fused",  # llmtrain uses fused AdamW on CUDA and CPU
        device=trainer.device.type,
    )
    estimate = estimate_memory(
        trainer.cfg.model, lengths_for(trainer.cfg), trainer.cfg.trainer.micro_batch_size, setup
    )
    tracked = tracked_step_peak(trainer) if track_memory else None
    return Result(
        shape=name,
        precision=precision,
        compile=compile_,
        parallel=parallel,
        params_m=count_parameters(trainer.model) / 1e6,
        micro_batch=trainer.cfg.trainer.micro_batch_size,
        step_ms=seconds * 1e3,
        tokens_per_s=sequences * trainer.objective.seq_len / seconds,
        tflops=flops / 1e12,
        mfu_measured_peak=flops / peaks[peak_key],
        mfu_datasheet=flops / datasheet if datasheet and precision == "bf16" else None,
        peak_memory_gib=memory / 2**30,
        data_wait_fraction=(trainer.batches.wait_seconds - waited) / steps / seconds,
        activation_checkpointing=ac,
        estimated_peak_gib=estimate.peak / 2**30,
        tracked_peak_gib=tracked / 2**30 if tracked is not None else None,
        reshard_after_forward=reshard,
        runs=trainer.strategy_name,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shapes", nargs="+", default=["decoder_tiny", "decoder_small"], choices=sorted(SHAPES)
    )
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile each block")
    parser.add_argument(
        "--parallel", default="single", choices=["single", "ddp", "fsdp"], help="also under torchrun"
    )
    parser.add_argument(
        "--reshard-after-forward",
        choices=["auto", "true", "false"],
        default="auto",
        help="parallel.reshard_after_forward; true or false makes fsdp wrap on one device too (auto: it does not)",
    )
    parser.add_argument("--steps", type=number(int, minimum=1), default=10, help="timed steps (>= 1)")
    parser.add_argument("--warmup", type=number(int, minimum=0), default=3, help="untimed steps first (>= 0)")
    parser.add_argument(
        "--batch", type=number(int, minimum=1), default=None, help="micro-batch (>= 1; default: per shape)"
    )
    parser.add_argument(
        "--activation-checkpointing", action="store_true", help="recompute each block in backward"
    )
    parser.add_argument(
        "--track-memory", action="store_true", help="also run one step under MemTracker (peak tensor bytes)"
    )
    parser.add_argument(
        "--document-attention",
        type=number(int, minimum=0),
        default=0,
        metavar="N",
        help="documents of N tokens (an EOS every N) with data.document_attention=true (0: off)",
    )
    parser.add_argument("--json", default="bench.json")
    args = parser.parse_args(argv)
    if args.reshard_after_forward != "auto" and args.parallel != "fsdp":
        parser.error(
            f"argument --reshard-after-forward: {args.reshard_after_forward} applies to --parallel fsdp, "
            f"not {args.parallel}"
        )
    if Path(args.json).is_dir():  # found now, not after the benchmark
        parser.error(f"argument --json: {args.json} is a folder; give the file to write")
    return args


def main() -> None:
    destroying_groups(lambda: benchmark(parse_args()))


def destroying_groups(run: Callable[[], None]) -> None:
    """run(), then destroy the process groups it made (also after a failure): a group alive at interpreter exit
    can abort it. The profiling scripts built on make_trainer end the same way."""
    try:
        run()
    finally:
        destroy()


def benchmark(args: argparse.Namespace) -> None:
    # under torchrun each rank probes its own GPU (the Trainer selects it later: the probes ran on GPU 0)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else None
    if device is not None:
        torch.cuda.set_device(device)
    device = device or torch.device("cpu")
    peaks = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "fp32": measure_matmul_peak(torch.float32, device),
        "bf16": measure_matmul_peak(torch.bfloat16, device),
    }
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 reports (figures are per rank)
    say = print if main_rank else (lambda *a, **k: None)
    say(
        f"device: {peaks['device']}; matmul peak fp32 {peaks['fp32'] / 1e12:.2f}, bf16 {peaks['bf16'] / 1e12:.2f} TFLOP/s"
    )
    results = []
    with tempfile.TemporaryDirectory() as out:
        for name in args.shapes:
            for precision in args.precisions:
                r = bench(
                    name, precision, args.compile, args.parallel, args.steps, args.warmup, args.batch, peaks, Path(out),
                    args.activation_checkpointing, args.track_memory, args.document_attention,
                    {"auto": None, "true": True, "false": False}[args.reshard_after_forward],
                )  # fmt: skip
                results.append(r)
                sheet = f"{r.mfu_datasheet:6.1%}" if r.mfu_datasheet is not None else "     -"
                say(
                    f"{r.shape:14s} {r.precision:5s} compile={r.compile!s:5s} {r.parallel:6s} {r.params_m:7.1f}M "
                    f"b={r.micro_batch:<3d} {r.step_ms:9.1f} ms {r.tokens_per_s:10.0f} tok/s {r.tflops:8.3f} TFLOP/s "
                    f"MFU(measured) {r.mfu_measured_peak:6.1%} MFU(datasheet) {sheet} "
                    f"{'mem' if device.type == 'cuda' else 'max RSS so far'} {r.peak_memory_gib:6.2f} GiB data {r.data_wait_fraction:5.1%} ac={r.activation_checkpointing!s:5s} "
                    f"estimated peak {r.estimated_peak_gib:.3f} GiB"
                    + (
                        f" tracked peak {r.tracked_peak_gib:.3f} GiB"
                        if r.tracked_peak_gib is not None
                        else ""
                    ),
                    flush=True,
                )
                if r.runs != r.parallel or r.reshard_after_forward is not None:
                    say(f"  ran: {r.runs}, reshard_after_forward={r.reshard_after_forward}", flush=True)
                if r.mfu_measured_peak > 1:
                    say(
                        "  note: MFU(measured) above 100%: the matmul probe ran slower than this step's matmuls "
                        "(a busy or throttled machine while it ran); compare against a quiet run",
                        flush=True,
                    )
    if main_rank:
        Path(args.json).write_text(
            json.dumps({"peaks": peaks, "results": [asdict(r) for r in results]}, indent=1)
        )


if __name__ == "__main__":
    main()
