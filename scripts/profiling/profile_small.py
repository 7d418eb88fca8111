"""Where a decoder_small training step spends its time (torch.profiler, after 1 warm-up step).

    python scripts/profiling/profile_small.py [fp32|bf16] [--windows 2]

Profiles `--windows` windows of 2 steps; prints the top ops of the last window, then each op's smallest self
time per step over the windows and their sum: the least noisy figure on a shared machine, for comparing two
versions of the code (run one with PYTHONPATH pointing at the other's checkout).
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/
from bench import make_trainer
from torch.profiler import ProfilerActivity, profile

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("precision", nargs="?", default="fp32", choices=["fp32", "bf16"])
parser.add_argument("--windows", type=int, default=2)
args = parser.parse_args()
with tempfile.TemporaryDirectory() as out:
    trainer = make_trainer("decoder_small", args.precision, False, "single", None, Path(out))
    trainer.train_step()
    best: dict[str, float] = {}
    for _ in range(args.windows):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                trainer.train_step()
        for event in prof.key_averages():
            ms = event.self_cpu_time_total / 2e3  # per step
            best[event.key] = min(best.get(event.key, ms), ms)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=40))
    top = sorted(best.items(), key=lambda kv: -kv[1])[:8]
    print("smallest self time per step over the windows (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in top))
    print(f"sum over all ops: {sum(best.values()):.1f} ms per step ({args.precision})")
