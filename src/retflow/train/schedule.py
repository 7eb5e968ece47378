"""Learning-rate schedule: linear warmup then half-cycle cosine (MAE/RETFound), set per iteration."""
from __future__ import annotations

import math

from torch.optim import Optimizer

__all__ = ["lr_at", "apply_lr"]


def lr_at(epoch_float: float, base_lr: float, min_lr: float, warmup_epochs: float, total_epochs: float) -> float:
    """Learning rate at fractional epoch ``epoch_float``.

    ``base_lr * e / warmup`` during warmup, then cosine from ``base_lr`` at
    ``warmup_epochs`` down to ``min_lr`` at ``total_epochs`` (held at
    ``min_lr`` beyond it).
    """
    if epoch_float < warmup_epochs:
        return base_lr * epoch_float / warmup_epochs
    span = total_epochs - warmup_epochs
    if span <= 0:
        return base_lr if epoch_float <= warmup_epochs else min_lr
    progress = min(1.0, (epoch_float - warmup_epochs) / span)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_lr(optimizer: Optimizer, lr: float) -> float:
    """Set every group's ``lr`` to ``lr * group.get('lr_scale', 1.0)``; returns ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr
