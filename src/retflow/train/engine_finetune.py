"""One supervised epoch, and model outputs for evaluation."""

from __future__ import annotations

import math

import numpy as np
import torch

from retflow.settings.stages import Schedule, TaskSettings
from retflow.train.recipe import apply_mixup
from retflow.train.sampling import step_seed
from retflow.train.schedule import apply_lr, lr_at
from retflow.train.targets import to_outputs


def train_one_epoch(model, data_loader, criterion, optimizer, epoch: int, n_batches: int, schedule: Schedule,
                    seed: int, device, mixup=None) -> tuple[float, float]:
    """One epoch of ``n_batches`` steps, the lr set per step from ``schedule`` (the run's
    ``settings.schedule(batch)``), per-step RNG from ``seed``. Returns (mean training loss, last lr)."""
    model.train()
    total, count, lr = 0.0, 0, 0.0
    use_bf16 = device.type == "cuda"
    for b, (imgs, labels) in enumerate(data_loader):
        lr = lr_at(epoch + b / n_batches, schedule.lr, schedule.min_lr, schedule.warmup_epochs, schedule.epochs)
        apply_lr(optimizer, lr)
        step_seed(seed, epoch, b, 0)
        imgs, labels = apply_mixup(mixup, imgs.to(device), labels.to(device))
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = criterion(model(imgs), labels)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise RuntimeError(f"loss is {value} at epoch {epoch} batch {b}; stopping (best checkpoint kept)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += value
        count += 1
    return total / max(1, count), lr


def keep_epoch(epoch: int, score: float, best: float, warmup_epochs: int, epochs: int) -> bool:
    """Model selection: whether epoch ``epoch`` (validation ``score``, higher is better) replaces the
    kept checkpoint (``best``, -inf before any). Only epochs after warm-up compete (an epoch-0 model
    is barely trained, and a small validation set can score it best), the last epoch when warm-up
    fills the run; a tie goes to the later epoch."""
    return epoch >= min(warmup_epochs, epochs - 1) and score >= best


@torch.no_grad()
def _logits(model, dataset, device, batch_size: int = 128):
    model.eval()
    logits, labels = [], []
    for imgs, y in torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False):
        logits.append(model(imgs.to(device)).float().cpu())
        labels.append(y)
    if not logits:
        return torch.zeros((0, 1)), torch.zeros(0)
    return torch.cat(logits), torch.cat(labels)


def predict_outputs(model, dataset, device, task: TaskSettings, scale) -> np.ndarray:
    """Probabilities (or regression values) for every item of ``dataset``."""
    logits, _ = _logits(model, dataset, device)
    return to_outputs(task, logits, scale)


def evaluate_outputs(model, dataset, device, task: TaskSettings, scale, criterion) -> tuple[np.ndarray, float]:
    """(outputs, loss) on a labelled dataset."""
    logits, labels = _logits(model, dataset, device)
    loss = float(criterion(logits, labels)) if len(labels) else float("nan")
    return to_outputs(task, logits, scale), loss
