"""What FSDP2 on one device adds to a step, in one process: the plain model, parallel=fsdp as it runs on one
device by default (unwrapped, `fsdp_wraps`), and FSDP wrapped (keeping gathered parameters to backward, and
resharding after forward) step in alternating blocks, so a slow spell lands on all of them. A model with 12
blocks but tiny matmuls, so the step is mostly the per-block work the framework and FSDP do on the host,
which is what a GPU step waits for when the host falls behind. Run under torchrun (one rank: gloo on a CPU,
NCCL on a GPU):

    torchrun --standalone --nproc_per_node=1 scripts/profiling/fsdp_overhead.py [--precision fp32] [--family encoder]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/
import bench
from bench import make_trainer

from llmtrain.models.config import ModelConfig


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--family", default="decoder", choices=["decoder", "encoder", "encoder_decoder"])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--reps", type=int, default=8, help="alternating blocks per variant")
    parser.add_argument("--steps", type=int, default=3, help="steps per block")
    args = parser.parse_args()
    model = ModelConfig(args.family, d_model=64, n_layers=args.layers, n_heads=2, max_seq_len=64)
    bench.SHAPES["fsdp_overhead"] = (model, 64, 512, 2)
    with tempfile.TemporaryDirectory() as out:
        # on one device FSDP wraps only with resharding set (`fsdp_wraps`): both settings, against the plain model
        trainers = {
            f"fsdp reshard={reshard}": make_trainer(
                "fsdp_overhead", args.precision, False, "fsdp", None, Path(out), reshard=reshard
            )
            for reshard in (False, True)
        }
        trainers["fsdp auto"] = make_trainer("fsdp_overhead", args.precision, False, "fsdp", None, Path(out))
        trainers["plain"] = make_trainer("fsdp_overhead", args.precision, False, "single", None, Path(out))
        times: dict[str, list[float]] = {name: [] for name in trainers}
        for trainer in trainers.values():
            for _ in range(3):
                trainer.train_step()
        for _ in range(args.reps):
            for name, trainer in trainers.items():
                for _ in range(args.steps):
                    start = time.perf_counter()
                    trainer.train_step()
                    times[name].append(time.perf_counter() - start)
    plain = statistics.median(times["plain"])
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"{args.family} {args.precision} {name:19s} median {1000 * median:7.2f} ms  min "
            f"{1000 * min(values):7.2f} ms  median / plain {median / plain:.2f}x"
        )


if __name__ == "__main__":
    bench.destroying_groups(main)  # the one-rank group make_trainer made
