"""AdamW with weight decay on matrices only, and warmup + cosine / linear / constant schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from llmtrain.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices (linear weights, embeddings) decay; vectors (norm weights, biases) do not."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()  # a tied weight once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, device_type: str, zero1: bool = False, fused: bool = True
) -> torch.optim.Optimizer:
    """AdamW (fp32 states); zero1 shards its states over the data-parallel ranks (ZeroRedundancyOptimizer).

    fused=False takes the foreach kernels: FSDP2 with fp16's sharded loss scaler, where fused AdamW fails
    applying the scaler's found_inf (shape [1]) to its DTensor step counts (shape []) (H100, torch 2.11)."""
    # fused kernels on CUDA and CPU (on this 2-core CPU 10 ms vs foreach's 68 ms for 23M parameters)
    fast = {"fused": True} if fused and device_type in ("cuda", "cpu") else {"foreach": True}
    groups = param_groups(model, cfg.weight_decay)
    kwargs = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps, **fast}
    if not zero1:
        return torch.optim.AdamW(groups, **kwargs)
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, **kwargs)


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of cfg.lr at `step` (0-based): linear warmup to just below the peak (nanoGPT's
    (step + 1) / (warmup + 1)), the peak at step `warmup_steps` (the first step without warmup), then the
    chosen decay, whose last step (max_steps - 1) trains at min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - 1 - cfg.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_steps))


def apply_settings(optimizer: torch.optim.Optimizer, scheduler, cfg: OptimConfig, step: int) -> None:
    """This run's settings over a resumed optimizer's: its param_groups (learning rate, decay, betas, eps) and
    the scheduler's base rates come back with the checkpoint. Sets the rate `step` trains at by the
    scheduler's own schedule (its max_steps), as a run started with these settings would have it."""
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    lr = cfg.lr * scheduler.lr_lambdas[0](step)
    decays = (cfg.weight_decay, 0.0)  # param_groups' order: matrices, then vectors
    for group, decay in zip(optimizer.param_groups, decays, strict=True):
        group.update(lr=lr, initial_lr=cfg.lr, weight_decay=decay, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    scheduler._last_lr = [lr] * len(optimizer.param_groups)
