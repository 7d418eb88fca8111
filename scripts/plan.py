"""Plan a run from a compute budget, or cost a given model: the same configs and overrides as training.

    python scripts/plan.py plan.pf_days=100                                  # budget -> N, D, shape, time
    python scripts/plan.py plan.hours=24 plan.devices=64 plan.device=A100 plan.mfu=0.45
    python scripts/plan.py model.d_model=1024 model.n_layers=16 plan.tokens=2e10   # reverse: model -> cost
    python scripts/plan.py plan.params=175e9 plan.tokens=300e9                # GPT-3: ~3,640 PF-days

A budget gives compute-optimal parameters and tokens two ways (Chinchilla's 20 tokens per parameter, and the
optimum of its fitted loss), the loss that law predicts, a concrete shape of the configured model family
near that size, the wall-clock time on plan.devices x plan.device at plan.mfu, and the memory per device of
that shape under the `memory.*` options (as scripts/estimate_memory.py computes it; the device and the
data-parallel world size are plan.device and plan.devices). Give either a budget (plan.flops, plan.pf_days or
plan.hours) or plan.params / plan.tokens to cost, not both: a budget fixes the parameters and tokens itself.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import hydra
from omegaconf import DictConfig

from llmtrain.config import ConfigError, TrainConfig
from llmtrain.measure.flops import training_flops_per_token
from llmtrain.measure.hardware import accelerator
from llmtrain.measure.memory import estimate_memory
from llmtrain.measure.options import (
    MemoryOptions,
    PlanOptions,
    gib,
    human,
    register_script_config,
    section,
    table,
    train_config,
)
from llmtrain.measure.planning import (
    CHINCHILLA_TOKENS_PER_PARAM,
    Plan,
    model_shape_for,
    plan_for_budget,
    plan_for_model,
    training_seconds,
)
from llmtrain.measure.shapes import lengths_for, model_config_for, parameter_count
from llmtrain.models.config import ModelConfig

register_script_config("plan", plan=PlanOptions, memory=MemoryOptions)


def duration(seconds: float) -> str:
    if seconds >= 2 * 86_400:
        return f"{seconds / 86_400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def fit_verdict(peak_bytes: float, memory: MemoryOptions) -> str:
    try:
        usable = memory.usable_bytes()
    except ValueError:  # a device not in the table, without memory.gpu_memory_gib: no verdict
        return ""
    return f" ({'fits' if peak_bytes <= usable else 'does NOT fit'} {memory.gpu})"


def describe_shape(model: ModelConfig) -> str:
    return f"d_model {model.d_model} x {model.n_layers} layers, {model.n_heads} heads"


def plan_column(
    plan: Plan, model: ModelConfig, cfg: TrainConfig, opts: PlanOptions, memory: MemoryOptions
) -> dict[str, str]:
    """One column of the plan table, by row label: the plan, and `model` (a shape of the configured family)
    costed from its shapes on the plan's tokens. The time is that cost's: 6ND is a decoder's count, and an
    encoder-decoder runs about half its parameters per corpus token (trainer.max_flops buys it more tokens)."""
    micro_batch = memory.micro_batch or cfg.trainer.micro_batch_size
    lengths = lengths_for(cfg)
    estimate = estimate_memory(model, lengths, micro_batch, memory.setup(cfg))
    exact = training_flops_per_token(model, lengths) * plan.n_tokens
    return {
        "parameters": human(plan.n_params),
        "tokens": human(plan.n_tokens),
        "tokens per parameter": f"{plan.tokens_per_param:.1f}",
        "FLOPs (6ND)": f"{plan.flops:.3g}",
        "petaFLOP/s-days": f"{plan.pf_days:.4g}",
        "predicted loss": f"{plan.loss:.3f}",
        "model shape": describe_shape(model),
        "shape's parameters": human(parameter_count(model)),
        f"FLOPs (from shapes, {cfg.objective.name})": f"{exact:.3g}",
        "time": duration(training_seconds(exact, opts.devices, opts.peak_flops(), opts.mfu)),
        "memory per device": f"{gib(estimate.peak)} GiB{fit_verdict(estimate.peak, memory)}",
    }


def report_budget(flops: float, cfg: TrainConfig, opts: PlanOptions, memory: MemoryOptions) -> str:
    """Compute-optimal N and D both ways, each with a shape of the configured family near N."""
    base = model_config_for(cfg)
    columns = {}
    for rule, title in (("chinchilla", "20 tokens/param"), ("fitted", "fitted-law optimum")):
        plan = plan_for_budget(flops, rule)
        model = model_shape_for(plan.n_params, base, aspect_ratio=opts.aspect_ratio)
        columns[title] = plan_column(plan, model, cfg, opts, memory)
    labels = next(iter(columns.values()))
    rows = [[label] + [column[label] for column in columns.values()] for label in labels]
    return table([f"budget {flops:.3g} FLOPs", *columns], rows)


def report_model(cfg: TrainConfig, opts: PlanOptions, memory: MemoryOptions) -> str:
    """The reverse: the configured model (or plan.params) on plan.tokens (default 20 per parameter)."""
    model = model_config_for(cfg)
    n_params = opts.params or parameter_count(model)
    n_tokens = opts.tokens or CHINCHILLA_TOKENS_PER_PARAM * n_params
    plan = plan_for_model(n_params, n_tokens)
    column = plan_column(plan, model, cfg, opts, memory)
    if opts.params is not None:  # a bare parameter count has no shape: 6ND, and no memory
        shaped = ("model shape", "shape's parameters", f"FLOPs (from shapes, {cfg.objective.name})")
        for label in (*shaped, "memory per device"):
            del column[label]
        column["time"] = duration(training_seconds(plan.flops, opts.devices, opts.peak_flops(), opts.mfu))
    return table(["given model", ""], [[label, value] for label, value in column.items()])


def report(cfg: TrainConfig, opts: PlanOptions, memory: MemoryOptions) -> str:
    opts.check()
    memory = replace(memory, gpu=opts.device, world_size=opts.devices)
    # plan.check() has checked plan.device (another name needs plan.peak_tflops, and gets no memory verdict)
    memory.check(cfg, world="plan.devices", device=None)
    peak = opts.peak_flops()
    setup = memory.setup(cfg)
    name = opts.device if opts.peak_tflops else accelerator(opts.device).name
    flops = opts.budget(peak)
    body = report_model(cfg, opts, memory) if flops is None else report_budget(flops, cfg, opts, memory)
    micro_batch = memory.micro_batch or cfg.trainer.micro_batch_size
    return (
        f"hardware: {opts.devices} x {name} at {peak / 1e12:.0f} TFLOP/s ({opts.dtype}), MFU {opts.mfu:.0%}\n"
        f"memory per device: {setup.strategy}, {setup.precision}, micro-batch {micro_batch} x "
        f"{cfg.data.seq_len} tokens\n\n{body}"
    )


@hydra.main(version_base="1.3", config_path="../configs", config_name="plan")
def main(dict_cfg: DictConfig) -> None:
    try:
        print(
            report(
                train_config(dict_cfg, "plan", "memory"),
                section(dict_cfg, "plan"),
                section(dict_cfg, "memory"),
            )
        )
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
