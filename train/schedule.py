"""Learning-rate schedule: linear warmup then cosine decay, stepped once per optimizer step."""
from __future__ import annotations

import math

import torch


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int, lr: float, warmup_lr: float,
                         min_lr: float) -> float:
    """The multiplier of ``lr`` after ``step`` optimizer steps.

    Steps ``[0, warmup_steps)`` rise linearly from ``warmup_lr`` to ``lr``; the rest follow a half cosine
    from ``lr`` down to ``min_lr`` at ``total_steps`` (held there after).
    """
    if lr <= 0:
        return 1.0
    if step < warmup_steps:
        return (warmup_lr + (lr - warmup_lr) * step / warmup_steps) / lr
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return (min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))) / lr


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, lr: float,
                    warmup_lr: float, min_lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :func:`warmup_cosine_factor` (its state dict holds only plain numbers)."""

    def factor(step: int) -> float:
        return warmup_cosine_factor(step, total_steps, warmup_steps, lr, warmup_lr, min_lr)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


__all__ = ["build_scheduler", "warmup_cosine_factor"]
