"""Step time with and without activation checkpointing, interleaved in one process (decoder_small, fp32)."""

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/
from bench import make_trainer

precision = sys.argv[1] if len(sys.argv) > 1 else "fp32"
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 4
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
