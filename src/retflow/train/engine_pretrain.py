"""One MAE pretraining epoch: per-step lr schedule, gradient accumulation, bf16 on CUDA."""

from __future__ import annotations

import math
import time

import torch

from retflow.train.sampling import step_seed
from retflow.train.schedule import apply_lr, lr_at


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


def train_one_epoch(model, data_loader, optimizer, epoch: int, start_batch: int, n_batches: int,
                    cfg: dict, device, rank: int, on_step=None) -> dict:
    """Train one epoch from batch ``start_batch``; ``on_step(batch_index)`` may request a stop.

    Returns {'loss': mean loss over the steps run, 'lr': last lr, 'steps': n, 'stopped': bool}.
    """
    model.train()
    accum = cfg["accum_iter"]
    total, count, lr, stopped = 0.0, 0, 0.0, False
    t0 = time.time()
    optimizer.zero_grad(set_to_none=True)
    use_bf16 = device.type == "cuda"
    for b, (imgs, _) in enumerate(data_loader, start=start_batch):
        if b % accum == 0:
            lr = lr_at(epoch + b / n_batches, cfg["lr"], cfg["min_lr"], cfg["warmup_epochs"], cfg["epochs"])
            apply_lr(optimizer, lr)
        imgs = imgs.to(device, non_blocking=True)
        step_seed(cfg["seed"], epoch, b, rank)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss, _, _ = model(imgs, mask_ratio=cfg["mask_ratio"])
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLoss(f"loss is {value} at epoch {epoch} batch {b}; stopping (last good checkpoint kept)")
        (loss / accum).backward()
        if (b + 1) % accum == 0:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        total += value
        count += 1
        if on_step is not None and on_step(b + 1):
            stopped = True
            break
    return {"loss": total / max(1, count), "lr": lr, "steps": count, "stopped": stopped,
            "seconds": time.time() - t0}
