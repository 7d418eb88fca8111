"""Where llmtrain's and HF's T5 step (bench_hf default shape; fp32, or bf16 as argv[1]) spend time: top ops by
self CPU time."""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/
from bench_hf import HFStep, llmtrain_trainer
from torch.profiler import ProfilerActivity, profile

args = argparse.Namespace(layers=4, width=256, seq=128, batch=8, compile=False, compile_hf=False)
parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("precision", nargs="?", default="fp32", choices=["fp32", "bf16"])
precision = parser.parse_args().precision
with tempfile.TemporaryDirectory() as out:
    trainer = llmtrain_trainer("t5", precision, args, Path(out))
    hf = HFStep("t5", precision, trainer, args)
    for name, step in (("llmtrain", trainer.train_step), ("hf", hf.train_step)):
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                step()
        print(f"== {name}")
        print(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=36)
        )
