"""One supervised epoch and one validation pass."""

from __future__ import annotations

import math

import torch

from retflow.train.sampling import step_seed
from retflow.train.schedule import apply_lr, lr_at


def train_one_epoch(model, data_loader, criterion, optimizer, epoch: int, n_batches: int, cfg: dict,
                    device) -> tuple[float, float]:
    """Returns (mean training loss, last lr)."""
    model.train()
    total, count, lr = 0.0, 0, 0.0
    use_bf16 = device.type == "cuda"
    for b, (imgs, labels) in enumerate(data_loader):
        lr = lr_at(epoch + b / n_batches, cfg["lr"], cfg["min_lr"], cfg["warmup_epochs"], cfg["epochs"])
        apply_lr(optimizer, lr)
        step_seed(cfg["seed"], epoch, b, 0)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = criterion(model(imgs.to(device)), labels.to(device))
        value = float(loss.detach())
        if not math.isfinite(value):
            raise RuntimeError(f"loss is {value} at epoch {epoch} batch {b}; stopping (best checkpoint kept)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += value
        count += 1
    return total / max(1, count), lr
