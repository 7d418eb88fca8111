"""bf16 autocast against fp32 on the same shape, in one process: the two trainers step in alternating blocks,
so a slow spell of a shared machine lands on both; prints each block and the median ratio.

    python scripts/profiling/bf16_speedup.py                      # decoder_small (issue 8's CPU target)
    python scripts/profiling/bf16_speedup.py --shape t5_small --reps 7 --steps 2 [--compile]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/
from bench import SHAPES, make_trainer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="decoder_small", choices=sorted(SHAPES))
    parser.add_argument("--reps", type=int, default=5, help="alternating blocks per precision")
    parser.add_argument("--steps", type=int, default=2, help="steps per block")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        trainers = {
            p: make_trainer(args.shape, p, args.compile, "single", None, Path(out)) for p in ("fp32", "bf16")
        }
        for trainer in trainers.values():
            for _ in range(2 if args.compile else 1):
                trainer.train_step()
        times = {p: [] for p in trainers}
        for rep in range(args.reps):
            for precision, trainer in trainers.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    trainer.train_step()
                times[precision].append((time.perf_counter() - start) / args.steps * 1e3)
            print(
                f"block {rep}: fp32 {times['fp32'][-1]:7.1f} ms  bf16 {times['bf16'][-1]:7.1f} ms  "
                f"ratio {times['fp32'][-1] / times['bf16'][-1]:.2f}x",
                flush=True,
            )
        for trainer in trainers.values():
            trainer.guard.check()
        fp32, bf16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
        print(
            f"{args.shape} compile={args.compile}: median step fp32 {fp32:.1f} ms, bf16 {bf16:.1f} ms; "
            f"bf16 tokens/s = {fp32 / bf16:.2f}x fp32"
        )


if __name__ == "__main__":
    main()
