"""Gradient clipping under FSDP2: llmtrain's `clip_grad_norm` (local shards, one all-reduce) against torch's
`clip_grad_norm_` on the DTensor gradients (+ `.full_tensor()`), alternating on the same gradients of a
12-block model wrapped on one rank. Run under torchrun:

    torchrun --standalone --nproc_per_node=1 scripts/profiling/fsdp_clip.py [--calls 30]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/
import bench
from bench import make_trainer

from llmtrain.distributed.parallelize import clip_grad_norm
from llmtrain.models.config import ModelConfig


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()
    bench.SHAPES["fsdp_clip"] = (
        ModelConfig("decoder", d_model=64, n_layers=12, n_heads=2, max_seq_len=64),
        64,
        512,
        2,
    )
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer("fsdp_clip", "bf16", False, "fsdp", None, Path(out), reshard=False)
        trainer.optimizer.step = lambda: None  # keep the gradients
        trainer.optimizer.zero_grad = lambda set_to_none=True: None
        trainer.train_step()
        params = list(trainer.model.parameters())
        variants = {
            "torch clip_grad_norm_ on DTensors": lambda: torch.nn.utils.clip_grad_norm_(
                params, 1e9
            ).full_tensor(),
            "llmtrain clip_grad_norm (local shards)": lambda: clip_grad_norm(params, 1e9),
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.calls):
            for name, clip in variants.items():
                start = time.perf_counter()
                clip()
                times[name].append(time.perf_counter() - start)
        for name, clip in variants.items():
            print(
                f"{name:40s} median {1000 * statistics.median(times[name]):6.2f} ms  norm {float(clip()):.6f}"
            )


if __name__ == "__main__":
    bench.destroying_groups(main)  # the one-rank group make_trainer made
