"""One self-supervised pretraining epoch: per-step lr schedule, gradient accumulation, bf16 on CUDA.

Method-agnostic: ``batch_loss`` turns a loader batch into the method's loss (MAE and the 3-D MAE:
one view -- images or volumes -- and a mask ratio; SimCLR / DINO / MoCo-v3: a list of views; token reconstruction: one view); after each
optimizer step the method's momentum teacher, if any, is updated.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext

import torch

from retflow.settings.stages import PretrainSettings, Schedule
from retflow.train.sampling import step_seed
from retflow.train.schedule import apply_lr, lr_at


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


def to_device(batch, device, augment=None):
    """Move a batch (a tensor or a list of views) to ``device``; apply the batch augmentation."""
    if isinstance(batch, (list, tuple)):
        return [to_device(v, device, augment) for v in batch]
    batch = batch.to(device, non_blocking=True)
    return augment(batch) if augment is not None else batch


def batch_loss(model, views, s: PretrainSettings) -> torch.Tensor:
    """The method's scalar loss for one batch (through the DDP wrapper, so gradients sync)."""
    if s.is_mae:  # mae, mae3d (volumes)
        return model(views, mask_ratio=s.run_mask_ratio)[0]
    return model(views if isinstance(views, list) else [views])


def train_one_epoch(model, data_loader, optimizer, epoch: int, start_batch: int, n_batches: int,
                    s: PretrainSettings, schedule: Schedule, device, rank: int, on_step=None, augment=None,
                    after_update=None) -> dict:
    """Train one epoch from batch ``start_batch``; ``on_step(next_batch)`` may request a stop.

    ``s``: the run's settings (method, mask ratio, accumulation, seed, clipping); ``schedule``: its
    learning rate over the run (``s.schedule(effective batch)``).

    ``augment``: batch augmentation run on ``device`` (uint8 loader batches); ``after_update(progress)``
    runs after every optimizer step with the share of the whole run done (momentum teachers).
    Returns {'loss': mean loss over the steps run, 'lr': last lr, 'steps': n, 'stopped': bool, 'seconds'}.
    """
    model.train()
    accum = s.accum_iter
    total, count, lr, stopped = 0.0, 0, 0.0, False
    t0 = time.time()
    optimizer.zero_grad(set_to_none=True)
    use_bf16 = device.type == "cuda"
    for b, (batch, _) in enumerate(data_loader, start=start_batch):
        if b % accum == 0:
            lr = lr_at(epoch + b / n_batches, schedule.lr, schedule.min_lr, schedule.warmup_epochs, schedule.epochs)
            apply_lr(optimizer, lr)
        step_seed(s.seed, epoch, b, rank)
        views = to_device(batch, device, augment)
        last_micro = (b + 1) % accum == 0 or b + 1 == n_batches
        # gradient accumulation under DDP: all-reduce only on the micro-batch that steps
        sync = nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = batch_loss(model, views, s)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise NonFiniteLoss(f"loss is {value} at epoch {epoch} batch {b}; stopping (last good checkpoint kept)")
            (loss / accum).backward()
        if last_micro:
            if s.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if after_update is not None:
                after_update((epoch + (b + 1) / n_batches) / schedule.epochs)
        total += value
        count += 1
        if on_step is not None and on_step(b + 1):
            stopped = True
            break
    return {"loss": total / max(1, count), "lr": lr, "steps": count, "stopped": stopped,
            "seconds": time.time() - t0}
