"""Optimiser and learning-rate schedule: SGD, linear warm-up then cosine decay, per step."""

from __future__ import annotations

import math

import torch
from torch import nn

from ascl.training.config import OptimConfig


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the base lr at ``step``: linear 0 -> 1 over warm-up, then cosine 1 -> 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def base_lr(cfg: OptimConfig, batch_size: int) -> float:
    """The linear scaling rule: lr_per_256 x global batch / 256."""
    return cfg.lr_per_256 * batch_size / 256


def build_optimizer(model: nn.Module, cfg: OptimConfig, batch_size: int) -> torch.optim.SGD:
    """SGD over the parameters that train (momentum twins are frozen and skipped)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=base_lr(cfg, batch_size), momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR over ``warmup_cosine`` (its state is just the step count)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total_steps, warmup_steps))
