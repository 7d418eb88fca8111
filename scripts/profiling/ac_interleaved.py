"""Step time with and without activation checkpointing, interleaved in one process (decoder_small, fp32)."""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/
from bench import make_trainer

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("precision", nargs="?", default="fp32", choices=["fp32", "bf16"])
parser.add_argument("reps", nargs="?", type=int, default=4, help="timed steps of each trainer")
args = parser.parse_args()
precision, reps = args.precision, args.reps
with tempfile.TemporaryDirectory() as out:
    plain = make_trainer("decoder_small", precision, False, "single", None, Path(out) / "a")
    ckpt = make_trainer("decoder_small", precision, False, "single", None, Path(out) / "b", ac=True)
    plain.train_step()
    ckpt.train_step()
    times = {"plain": [], "checkpointed": []}
    for _ in range(reps):
        for name, t in (("plain", plain), ("checkpointed", ckpt)):
            start = time.perf_counter()
            t.train_step()
            times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
        print(
            f"{name:13s} {precision} steps (ms): {[round(x * 1e3) for x in ts]} median {statistics.median(ts) * 1e3:.0f} ms"
        )
    ratio = statistics.median(times["checkpointed"]) / statistics.median(times["plain"])
    pairs = [c / p for p, c in zip(times["plain"], times["checkpointed"])]
    print(
        f"checkpointed / plain: {ratio:.2f}x (median of medians); per-pair ratios {[round(r, 2) for r in pairs]}"
    )
