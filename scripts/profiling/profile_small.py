"""Where an fp32 decoder_small training step spends its time (torch.profiler, 2 steps after 1 warm-up)."""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/
from bench import make_trainer
from torch.profiler import ProfilerActivity, profile

precision = sys.argv[1] if len(sys.argv) > 1 else "fp32"
with tempfile.TemporaryDirectory() as out:
    trainer = make_trainer("decoder_small", precision, False, "single", None, Path(out))
    trainer.train_step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            trainer.train_step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=40)
    print(table)
