"""Supervised fine-tuning / linear probing of a ViT on one task, RETFound's recipe.

Fine-tune: timm ViT with global average pooling + fc_norm (or the class token after the final norm:
the model's ``pool``, :class:`~retflow.settings.stages.FinetuneSettings`), initialised from an MAE encoder (or
random / a local weights file in any layout :mod:`retflow.models.checkpoint_layouts` reads),
layer-wise lr decay, drop path, label smoothing, optional RandAugment + random erasing
(``augment: retfound``), mixup/cutmix and class-weighted loss, AdamW with warmup + cosine,
best checkpoint by a validation metric (``select_by``) among the epochs after warm-up
(:func:`~retflow.train.engine_finetune.keep_epoch`). Probes: the three protocols of
:mod:`retflow.train.probe`. Task types: :mod:`retflow.train.targets`. Writes best.pth,
train_log.csv, the internal test predictions, ``settings.json`` (the
:class:`~retflow.settings.stages.FinetuneSettings` it ran with) and ``train_summary.json``
(``best_epoch``; ``chance_loss``: the training loss of the best constant output on the training
labels, ``min_train_loss``: the lowest epoch training loss, both null for probe_logreg;
``trainable_params``, ``total_params``, ``peak_mem_mb``, ``peak_mem_kind``:
:mod:`retflow.train.footprint`). LoRA (protocol ``lora``, :mod:`retflow.train.lora`): the
fine-tuning recipe on a frozen encoder with low-rank adapters; its best.pth holds the merged model.
A volume model (``input: volume``, :mod:`retflow.train.volume`) runs the same protocols on the store's
whole volumes with the 3-D ViT, one prediction per volume under its first B-scan row's ``image_id``;
its best.pth says ``input: volume`` (its ``spec`` is the ``vit3d`` section).
Resumable per epoch from ``<out>/resume/last.pth``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from retflow.atomic import atomic_path, write_json
from retflow.data.dataset import StoreDataset, eval_transform, load_manifest
from retflow.data.splits import fold_split, label_fraction_indices
from retflow.evaluate.metrics import LOWER_IS_BETTER, PRIMARY_METRIC, compute_metrics
from retflow.evaluate.retfound_metrics import retfound_current
from retflow.models.checkpoint_layouts import load_encoder
from retflow.models.lr_decay import param_groups_lrd
from retflow.models.vit import create_vit
from retflow.settings.stages import FinetuneSettings, TaskSettings
from retflow.train.checkpoint import load_state, save_atomic
from retflow.train.resume import run_fingerprint
from retflow.train.distributed import pick_device
from retflow.train.footprint import param_counts, peak_memory, reset_peak
from retflow.train.engine_finetune import classifier_validation, fit, predict_outputs
from retflow.train.lora import add_adapters, merge_adapters
from retflow.train.probe import PROBES, embeddings, fit_logreg, freeze_encoder, probe_optimizer
from retflow.train.recipe import finetune_transform, make_mixup
from retflow.train.volume import VOLUME, per_volume, volume_classifier, volume_datasets
from retflow.train.targets import (
    TargetScale,
    chance_loss,
    class_weights,
    encode_targets,
    make_loss,
    n_outputs,
    stratum,
    to_outputs,
    write_predictions,
)


#: protocols that train with the whole fine-tuning recipe (label smoothing, mixup / cutmix, drop path)
FULL_RECIPE = ("finetune", "lora")


def build_model(s: FinetuneSettings, n_out: int, init_path: str | None):
    """The ViT (encoder loaded from ``init_path`` if given) and its optimizer parameter groups:
    layer-wise lr decay and drop path for fine-tuning; a frozen encoder (drop path off) for probes."""
    probe = s.protocol in PROBES
    drop_path = 0.0 if probe else s.drop_path
    if s.input == VOLUME:  # the 3-D ViT: the same timm names, blocks and heads
        model = volume_classifier(s, n_out, drop_path, init_path)
    else:
        model = create_vit(s.vit.spec(), num_classes=n_out, drop_path_rate=drop_path, global_pool=s.pool)
        if init_path:
            report = load_encoder(model, init_path)
            print(f"loaded encoder from {init_path}: {report.summary()}")
    if probe:
        params = freeze_encoder(model, s.protocol)
        return model, [{"params": params, "weight_decay": s.weight_decay}]
    if s.protocol == "lora":  # frozen encoder + adapters; the head trains (groups: trainable parameters only)
        add_adapters(model, s.lora)
    return model, param_groups_lrd(model, s.weight_decay, model.no_weight_decay(), s.layer_decay)


def training_loss(s: FinetuneSettings, labels: np.ndarray, scale: TargetScale):
    """The run's training loss: label smoothing (fine-tuning only) and class weights (``class_weights``)."""
    smoothing = s.label_smoothing if s.protocol in FULL_RECIPE else 0.0
    return make_loss(s.task, class_weights(s.task, labels, s.class_weights), smoothing, scale)


def select_score(y: np.ndarray, outputs: np.ndarray, task_type: str, select_by: str) -> float:
    """Validation score for model selection, higher is better (lower-is-better metrics negated)."""
    metric = PRIMARY_METRIC[task_type] if select_by == "primary" else select_by
    if metric == "retfound_score":
        value = retfound_current(y, outputs, task_type)["score"]
    else:
        value = compute_metrics(y, outputs, task_type).get(metric, float("nan"))
    if metric in LOWER_IS_BETTER:
        value = -value
    return value if math.isfinite(value) else -math.inf


def _split_rows(manifest, task: TaskSettings, targets, valid):
    parts = {}
    for split in ("train", "val", "test"):
        in_split = (manifest["split"] == split).to_numpy()
        excluded = int((in_split & ~valid).sum())
        if excluded:
            print(f"{split}: {excluded} images without a usable '{task.label}' label excluded")
        rows = np.flatnonzero(in_split & valid)
        if len(rows) == 0:
            raise SystemExit(f"task '{task.name}': no labelled images in split '{split}'")
        parts[split] = (rows, targets[rows])
    return parts


def run(s: FinetuneSettings, store: str, init_path: str | None, out_dir: Path) -> int:
    """One fine-tuning / probe run with settings ``s`` (:func:`retflow.settings.build.finetune`);
    writes ``settings.json`` first, then the run's outputs, into ``out_dir``."""
    out_dir = Path(out_dir)
    s.write(out_dir / "settings.json")
    torch.manual_seed(s.seed)
    device = pick_device(s.device)
    reset_peak(device)
    task = s.task
    manifest = load_manifest(store)
    targets, valid = encode_targets(manifest, task)
    if s.fold is not None:  # a cross-validation run: its fold is the test set (retflow.data.splits.fold_split)
        strata = np.where(valid, stratum(task, targets).astype(str), "")
        manifest = manifest.assign(split=fold_split(manifest, s.fold, strata).to_numpy())
    if s.input == VOLUME:  # one row per volume, split as its B-scans (the 2-D run's eyes)
        manifest, targets, valid = per_volume(manifest, targets, valid)
    parts = _split_rows(manifest, task, targets, valid)
    tr_rows, tr_y = parts["train"]
    keep = label_fraction_indices(stratum(task, tr_y), s.fraction, s.seed)
    parts["train"] = (tr_rows[keep], tr_y[keep])
    norm = s.normalize.to_dict()
    if s.input == VOLUME:
        data = volume_datasets(s, store, manifest, parts)
    else:
        data = _image_datasets(s, store, manifest, parts)
    train_ds, val_ds, test_ds = data["train"], data["val"], data["test"]
    scale = TargetScale.fit(task, parts["train"][1])
    model, groups = build_model(s, n_outputs(task), init_path)
    model.to(device)
    counts = param_counts(model)  # as it trains (a lora run: the frozen base + its adapters)
    meta = {"spec": s.vit.to_dict() if s.vit is not None else s.vit3d.to_dict(), "normalize": norm,
            "classes": list(task.classes), "task": task.name, "task_spec": task.to_dict(),
            "target_scale": [scale.mean, scale.std], "probe_head": s.protocol in ("probe_adamw", "probe_lars"),
            "pool": s.pool, **({"input": VOLUME} if s.input == VOLUME else {})}
    select = lambda y, out: select_score(y, out, task.type, s.select_by)  # noqa: E731
    if s.protocol == "probe_logreg":
        summary = _run_logreg(s, model, train_ds, val_ds, scale, select, device, meta, out_dir)
    else:
        fingerprint = run_fingerprint(s, [Path(store) / "manifest.parquet", init_path])
        summary = _run_sgd(s, model, groups, train_ds, val_ds, scale, select, device, meta, out_dir, fingerprint)
    best_state = load_state(out_dir / "best.pth")
    model.load_state_dict(best_state["model"])
    outputs = predict_outputs(model, test_ds, device, task, scale)
    write_predictions(out_dir / "predictions.parquet", task, manifest["image_id"].to_numpy()[parts["test"][0]],
                      test_ds.labels, outputs)
    write_json({"n_train": len(train_ds), "n_val": len(val_ds), "n_test": len(test_ds),
                "best_epoch": best_state["epoch"], **summary, **counts, **peak_memory(device)},
               out_dir / "train_summary.json")
    return 0


def _image_datasets(s: FinetuneSettings, store: str, manifest, parts) -> dict[str, StoreDataset]:
    """``{split: StoreDataset}`` of a 2-D run (``parts``: split -> (manifest rows, targets)): the recipe's
    training augmentation (probe_logreg: embeddings of the un-augmented images), the evaluation transform."""
    spec, index = s.vit.spec(), manifest["index"].to_numpy()
    eval_tf = eval_transform(spec.img_size, normalize=s.normalize.to_dict(), in_chans=spec.in_chans)
    train_tf = eval_tf if s.protocol == "probe_logreg" else finetune_transform(s)
    return {split: StoreDataset(store, index[rows], labels, train_tf if split == "train" else eval_tf, spec.in_chans)
            for split, (rows, labels) in parts.items()}


def _run_logreg(s: FinetuneSettings, model, train_ds, val_ds, scale, select, device, meta, out_dir) -> dict:
    task = s.task
    train_x, val_x = embeddings(model, train_ds, device), embeddings(model, val_ds, device)
    score_fn = lambda y, logits: select(y, to_outputs(task, logits, scale))  # noqa: E731
    ty = (train_ds.labels - scale.mean) / scale.std if task.type == "regression" else train_ds.labels
    info = fit_logreg(model, train_x, ty, val_x, val_ds.labels, task, score_fn, s.seed)
    print(f"logistic regression on {train_x.shape} embeddings: {info}", flush=True)
    with atomic_path(out_dir / "train_log.csv") as tmp:
        pd.DataFrame(info["grid"]).to_csv(tmp, index=False)
    save_atomic({"model": model.state_dict(), "epoch": 0, "val_score": max(r["val_score"] for r in info["grid"]),
                 **meta}, out_dir / "best.pth")
    return {"epochs": 0, "best_C": info["best_C"], "chance_loss": None, "min_train_loss": None}


def _run_sgd(s: FinetuneSettings, model, groups, train_ds, val_ds, scale, select, device, meta, out_dir,
             fingerprint) -> dict:
    task = s.task
    batch = min(s.batch_size, len(train_ds))
    # small label fractions: repeat the training set within an epoch to reach min_steps in total
    n_batches = max(len(train_ds) // batch, math.ceil(s.min_steps / s.epochs))
    schedule = s.schedule(batch)
    if s.protocol in PROBES:
        optimizer = probe_optimizer(s.protocol, groups[0]["params"], schedule.lr, s.weight_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=schedule.lr)
    criterion = training_loss(s, train_ds.labels, scale)
    mixup = make_mixup(s) if s.protocol in FULL_RECIPE else None
    print(f"{s.protocol} {task.name}: {len(train_ds)} train (fraction {s.fraction:g}), "
          f"{len(val_ds)} val; {s.epochs} epochs x {n_batches} steps, lr {schedule.lr:.3g}", flush=True)

    best, log, best_path = fit(model, optimizer, criterion, train_ds,
                               classifier_validation(val_ds, device, task, scale, criterion, select),
                               epochs=s.epochs, n_batches=n_batches, batch=batch, schedule=schedule, seed=s.seed,
                               warmup_epochs=s.warmup_epochs, num_workers=s.num_workers, device=device,
                               meta=meta, out_dir=out_dir, fingerprint=fingerprint, mixup=mixup)
    best_state = load_state(best_path)
    if s.protocol == "lora":  # best.pth: the merged, plain timm model (no peft needed to read it)
        model.load_state_dict(best_state["model"])
        best_state["model"] = merge_adapters(model).state_dict()
    save_atomic(best_state, out_dir / "best.pth")
    return {"epochs": s.epochs, "best_val_score": best,
            "chance_loss": chance_loss(task, criterion, train_ds.labels),
            "min_train_loss": min(row["train_loss"] for row in log)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Fine-tune or linear-probe a ViT on one task.")
    ap.add_argument("--settings", required=True,
                    help="the run's FinetuneSettings as JSON (retflow.settings.build.finetune(...).to_json())")
    ap.add_argument("--store", required=True)
    ap.add_argument("--init", default="", help="pretrained checkpoint; empty for random init")
    ap.add_argument("--out-dir", required=True)
    args = ap.parse_args(argv)
    return run(FinetuneSettings.from_json(args.settings), args.store, args.init or None, Path(args.out_dir))


if __name__ == "__main__":
    sys.exit(main())
