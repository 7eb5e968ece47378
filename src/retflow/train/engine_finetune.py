"""One supervised epoch, the resumable epoch loop of a supervised run, and model outputs for evaluation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from retflow.atomic import atomic_path
from retflow.settings.stages import Schedule, TaskSettings
from retflow.train.checkpoint import save_atomic
from retflow.train.recipe import apply_mixup
from retflow.train.resume import resume_training
from retflow.train.sampling import loader, repeated_order, step_seed
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


def classifier_validation(val_ds, device, task: TaskSettings, scale, criterion, score):
    """The validation step of a classification / regression run for :func:`fit`: the validation loss
    and ``score(labels, outputs)`` (higher is better) of the current model."""

    def validate(model) -> tuple[float, dict, str]:
        outputs, loss = evaluate_outputs(model, val_ds, device, task, scale, criterion)
        value = score(val_ds.labels, outputs)
        return value, {"val_loss": loss, "val_score": value}, f"val loss {loss:.4f} val score {value:.4f}"

    return validate


def fit(model, optimizer, criterion, train_ds, validate, *, epochs: int, n_batches: int, batch: int,
        schedule: Schedule, seed: int, warmup_epochs: int, num_workers: int, device, meta: dict, out_dir: Path,
        fingerprint: str, mixup=None) -> tuple[float, list, Path]:
    """The epochs of a supervised run (fine-tune, SGD probes, LoRA, fusion, segmentation): resumed from
    ``out_dir/resume/last.pth`` when this run wrote it; each epoch trains, validates
    (``validate(model)`` -> (score, higher is better; its log columns; its words on the epoch line),
    e.g. :func:`classifier_validation`), keeps the best epoch after warm-up (:func:`keep_epoch`) in
    ``resume/best.pth`` (with ``meta``) and writes the resume state; at the end ``train_log.csv``.
    Returns (best score, epoch log, path of the kept checkpoint)."""
    out_dir = Path(out_dir)
    resume_path, best_path = out_dir / "resume" / "last.pth", out_dir / "resume" / "best.pth"
    start, best, log = resume_training(model, optimizer, out_dir, fingerprint)
    for epoch in range(start, epochs):
        train_ds.set_aug_seed(seed * 100003 + epoch)
        order = repeated_order(len(train_ds), n_batches * batch, seed, epoch)
        dl = loader(train_ds, order, batch, 0, num_workers)
        train_loss, lr = train_one_epoch(model, dl, criterion, optimizer, epoch, n_batches, schedule, seed, device,
                                         mixup)
        value, fields, words = validate(model)
        improved = keep_epoch(epoch, value, best, warmup_epochs, epochs)
        if improved:
            best = value
            save_atomic({"model": model.state_dict(), "epoch": epoch, "val_score": value, **meta}, best_path)
        log.append({"epoch": epoch, "train_loss": train_loss, **fields, "lr": lr, "best": improved})
        print(f"epoch {epoch}: train {train_loss:.4f} {words}{' *' if improved else ''}", flush=True)
        save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                     "best": best, "log": log, "fingerprint": fingerprint}, resume_path)
    with atomic_path(out_dir / "train_log.csv") as tmp:
        pd.DataFrame(log).to_csv(tmp, index=False)
    return best, log, best_path
