"""Where a CUDA training step spends its time: the top kernels by device time, and the step's idle gaps.

    python scripts/profiling/profile_gpu.py --shapes gpt2_124m [--compile] [--steps 3]

For each shape (bench.py's): warm-up steps (compilation included), then `--steps` profiled steps. Prints the
step's wall time, the summed device time of its kernels (the rest is the GPU waiting on the host), and the
top kernels by device time, grouped into matmuls, attention, and the rest (elementwise, norms, loss, AdamW).
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/
from bench import SHAPES, make_trainer
from torch.profiler import ProfilerActivity, profile


def kind(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "matmul")):
        return "matmul"
    if any(k in n for k in ("flash", "fmha", "attention", "efficient_attention")):
        return "attention"
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=["gpt2_124m"], choices=sorted(SHAPES))
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=18)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (torch.cuda.is_available() is False)")
    for shape in args.shapes:
        with tempfile.TemporaryDirectory() as out:
            trainer = make_trainer(shape, "bf16", args.compile, "single", None, Path(out))
            for _ in range(args.warmup):
                trainer.train_step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                start = time.perf_counter()
                for _ in range(args.steps):
                    trainer.train_step()
                torch.cuda.synchronize()
                wall = (time.perf_counter() - start) / args.steps * 1e3
            kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
            kernels = [e for e in kernels if e.self_device_time_total > 0]
            device_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / args.steps
            by_kind: dict[str, float] = {}
            for e in kernels:
                by_kind[kind(e.key)] = (
                    by_kind.get(kind(e.key), 0.0) + e.self_device_time_total / 1e3 / args.steps
                )
            print(
                f"== {shape} compile={args.compile}: step {wall:.1f} ms wall, kernels {device_ms:.1f} ms "
                f"({device_ms / wall:.0%} busy); "
                + ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])),
                flush=True,
            )
            for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[: args.top]:
                print(
                    f"  {e.self_device_time_total / 1e3 / args.steps:7.2f} ms  x{e.count // args.steps:<4d} "
                    f"{kind(e.key):9s} {e.key[:110]}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
