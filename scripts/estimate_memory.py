"""Memory per device of a training step, from the same configs and overrides as training.

    python scripts/estimate_memory.py model=decoder model.d_model=2048 model.n_layers=24 model.vocab_size=32000 \
        model.max_seq_len=2048 data.seq_len=2048 trainer.micro_batch_size=4 memory.gpu=H100 memory.world_size=8

Prints, per sharding strategy, each component in GiB per device, the peak, and the largest micro-batch that
fits the GPU (with and without activation checkpointing). Options: `memory.*` (llmtrain/measure/options.py).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from llmtrain.config import ConfigError, TrainConfig
from llmtrain.measure.hardware import accelerator
from llmtrain.measure.memory import Setup, estimate_memory, max_micro_batch
from llmtrain.measure.options import (
    MemoryOptions,
    gib,
    human,
    register_script_config,
    section,
    table,
    train_config,
)
from llmtrain.measure.shapes import lengths_for, model_config_for, parameter_count

register_script_config("estimate_memory", memory=MemoryOptions)

ROWS = (
    "weights", "grads", "master", "optimizer", "compute_copies", "activations", "loss_gradients", "recompute",
    "step_temporaries",
)  # fmt: skip


def strategies_to_compare(setup: Setup) -> list[str]:
    names = ["ddp", "zero1", "zero2", "zero3"] + (["hybrid"] if setup.shard_size else [])
    if setup.strategy not in names:
        names.append(setup.strategy)
    return [name for name in names if not (setup.cpu_offload and name == "ddp")]


def describe(cfg: TrainConfig, opts: MemoryOptions, micro_batch: int) -> str:
    model, lengths = model_config_for(cfg), lengths_for(cfg)
    setup = opts.setup(cfg)
    decoder = f", {lengths.targets} decoder tokens" if lengths.targets else ""
    return (
        f"model: {model.family} d_model={model.d_model} n_layers={model.n_layers} n_heads={model.n_heads} "
        f"d_ff={model.ff_dim} vocab={model.vocab_size}: {human(parameter_count(model))} parameters\n"
        f"step: micro-batch {micro_batch} x {lengths.inputs} tokens{decoder} ({cfg.objective.name}), "
        f"precision {setup.precision}, world size {setup.world_size}, "
        f"activation checkpointing {'on' if setup.activation_checkpointing else 'off'}, "
        f"cpu offload {'on' if setup.cpu_offload else 'off'}"
    )


def report(cfg: TrainConfig, opts: MemoryOptions) -> str:
    opts.check(cfg)
    model, lengths = model_config_for(cfg), lengths_for(cfg)
    micro_batch = opts.micro_batch or cfg.trainer.micro_batch_size
    usable = opts.usable_bytes()
    chosen = opts.setup(cfg)
    names = strategies_to_compare(chosen)
    columns = {name: estimate_memory(model, lengths, micro_batch, opts.setup(cfg, name)) for name in names}
    rows = [
        [row.replace("_", " ")] + [gib(est.components()[row]) for est in columns.values()] for row in ROWS
    ]
    rows += [
        ["peak in backward"] + [gib(est.backward_peak) for est in columns.values()],
        ["peak in optimizer step"] + [gib(est.optimizer_peak) for est in columns.values()],
        ["PEAK"] + [gib(est.peak) for est in columns.values()],
        ["on host (offload)"] + [gib(est.states.host) for est in columns.values()],
        ["fits"] + ["yes" if est.peak <= usable else "NO" for est in columns.values()],
    ]
    for checkpointing in (chosen.activation_checkpointing, not chosen.activation_checkpointing):
        label = f"max micro-batch, ckpt {'on' if checkpointing else 'off'}"
        fits = [max_micro_batch(model, lengths, opts.setup(cfg, n, checkpointing), usable) for n in names]
        rows.append([label] + [str(n) for n in fits])
    header = ["GiB per device"] + [f"{n}{'*' if n == chosen.strategy else ''}" for n in names]
    name = opts.gpu if opts.gpu_memory_gib else accelerator(opts.gpu).name
    device = f"{name} ({usable / opts.usable_fraction / 2**30:.1f} GiB, {opts.usable_fraction:.0%} usable)"
    return f"{describe(cfg, opts, micro_batch)}\nfitting: {device}\n\n{table(header, rows)}"


@hydra.main(version_base="1.3", config_path="../configs", config_name="estimate_memory")
def main(dict_cfg: DictConfig) -> None:
    try:
        print(report(train_config(dict_cfg, "memory"), section(dict_cfg, "memory")))
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
