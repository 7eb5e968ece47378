"""Segmentation fine-tuning: ViT encoder + UNETR-style decoder on one segmentation task.

The encoder starts from our MAE pretraining checkpoint, a local weights file (any layout that
:func:`retflow.models.checkpoint_layouts.load_encoder` reads) or random init; the decoder
(:mod:`retflow.models.seg_decoder`) is always new. Training: Dice + cross-entropy
(``monai.losses.DiceCELoss``, Dice over the foreground classes), AdamW with warmup + cosine,
layer-wise lr decay for the encoder (``layer_decay``; 1 turns it off) and the full lr for the
decoder, joint random-resized-crop / flip of image and mask. The label fraction is a seeded,
nested subset of the training *images* (:func:`retflow.data.splits.label_fraction_indices`).
The best epoch by validation Dice (foreground mean) after warm-up is kept
(:func:`~retflow.train.engine_finetune.keep_epoch`: a tie goes to the later epoch).

Writes into ``out_dir`` (the run folder of the fine-tuning layout, so the report finds it):
``best.pth`` (``model``, ``spec``, ``classes``, ``normalize``, ``task``, ``feature_size``,
``kind: "segmentation"``), ``train_log.csv``, ``metrics.json`` (internal test set: Dice / IoU per
class and foreground mean with seeded bootstrap CIs over images; see
:mod:`retflow.evaluate.segmentation_metrics`), ``overlay.png`` (a few test images: image | truth |
prediction), ``train_summary.json`` (with :mod:`retflow.train.footprint`'s parameter counts and
peak memory) and ``settings.json`` (the
:class:`~retflow.settings.stages.SegmentSettings` it ran with). Resumable per epoch from
``<out>/resume/last.pth``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from retflow.atomic import atomic_path, json_safe, write_json
from retflow.data.dataset import load_manifest
from retflow.data.seg_dataset import SegDataset, max_mask_value, seg_eval_transform, seg_train_transform
from retflow.data.splits import fold_split, label_fraction_indices
from retflow.data.store import MASK_SHARD_DIR
from retflow.evaluate.segmentation_metrics import (
    PRIMARY_SEG_METRIC,
    SEG_METRICS,
    bootstrap_segmentation,
    foreground_mean,
    per_image_scores,
    summarize,
)
from retflow.models.lr_decay import param_groups_lrd
from retflow.models.seg_decoder import SegViT
from retflow.settings.stages import SegmentSettings
from retflow.train.checkpoint import load_state, save_atomic
from retflow.train.resume import run_fingerprint
from retflow.train.distributed import pick_device
from retflow.train.footprint import param_counts, peak_memory, reset_peak
from retflow.train.engine_finetune import fit

__all__ = ["build_model", "predict_masks", "run", "main"]

# overlay colours of classes 1.. (class 0 is left unpainted)
PALETTE = np.array([[0, 255, 0], [255, 0, 0], [0, 128, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255]], np.uint8)


def build_model(s: SegmentSettings, n_classes: int, init_path: str | None) -> tuple[SegViT, list[dict]]:
    """The model (encoder weights loaded from ``init_path`` if given) and its optimizer groups: the
    encoder's with layer-wise lr decay (``layer_decay``), the decoder's at the full lr."""
    model = SegViT(s.vit.spec(), n_classes, feature_size=s.feature_size, drop_path_rate=s.drop_path)
    if init_path:
        from retflow.models.checkpoint_layouts import load_encoder

        report = load_encoder(model.encoder, init_path)
        print(f"loaded encoder from {init_path} ({report.layout}): {report.loaded} tensors, "
              f"missing {list(report.missing_keys)}, ignored {report.unexpected + report.dropped} keys", flush=True)
    wd = s.weight_decay
    groups = param_groups_lrd(model.encoder, wd, layer_decay=s.layer_decay)
    decay, no_decay = [], []
    for name, p in model.decoder.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups += [{"params": decay, "weight_decay": wd, "lr_scale": 1.0},
               {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
    return model, [g for g in groups if g["params"]]


@torch.no_grad()
def predict_masks(model: SegViT, dataset: SegDataset, device, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray, float]:
    """(predicted label maps (N, S, S) uint8, true label maps (N, S, S) uint8, mean per-pixel cross-entropy)."""
    model.eval()
    preds, trues, ce, n = [], [], 0.0, 0
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        x = torch.stack([it[0] for it in items]).to(device)
        y = torch.stack([it[1] for it in items]).to(device)
        logits = model(x).float()
        ce += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum")) / y[0].numel()
        n += len(items)
        preds.append(logits.argmax(1).to(torch.uint8).cpu().numpy())
        trues.append(y.to(torch.uint8).cpu().numpy())
    return np.concatenate(preds), np.concatenate(trues), ce / max(1, n)


def _overlay(img: np.ndarray, mask: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    out = img.astype(np.float32)
    for c in range(1, int(mask.max()) + 1):
        sel = mask == c
        out[sel] = (1 - alpha) * out[sel] + alpha * PALETTE[(c - 1) % len(PALETTE)]
    return out.round().astype(np.uint8)


OVERLAY_COLUMNS = ("image", "ground truth", "prediction")


def _column_labels(width: int, n_cols: int, height: int = 24) -> np.ndarray:
    """A white strip (height, width, 3) with :data:`OVERLAY_COLUMNS` centred over the sheet's columns."""
    from PIL import ImageDraw, ImageFont

    strip = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default(size=15)  # 15 px text: readable at 100 % zoom, also when shown a bit smaller
    for j, name in enumerate(OVERLAY_COLUMNS[:n_cols]):
        draw.text(((j + 0.5) * width / n_cols, height / 2), name, fill=(20, 20, 20), font=font, anchor="mm")
    return np.asarray(strip)


def write_overlay(dataset: SegDataset, preds: np.ndarray, path: Path, n: int = 4, tile: int = 128) -> int:
    """A PNG with one row per test image: image | ground truth | prediction (coloured per class), under
    a header strip that names the columns (:data:`OVERLAY_COLUMNS`)."""
    rows = []
    for i in range(min(n, len(dataset))):
        img, _ = dataset.raw(i)
        size = preds.shape[-1]
        if img.shape[0] != size:
            img = np.asarray(Image.fromarray(img[..., 0] if img.shape[2] == 1 else img).resize((size, size), Image.BILINEAR))
        img = np.repeat(img[..., None], 3, 2) if img.ndim == 2 else (np.repeat(img, 3, 2) if img.shape[2] == 1 else img)
        truth = dataset[i][1].numpy().astype(np.uint8)  # at the model's resolution, like preds
        row = np.concatenate([img, _overlay(img, truth), _overlay(img, preds[i])], 1)
        scale = max(1, tile // size)
        rows.append(np.kron(row, np.ones((scale, scale, 1), np.uint8)))
    if not rows:
        return 0
    sheet = np.concatenate([np.pad(r, ((0, 2), (0, 0), (0, 0)), constant_values=255) for r in rows], 0)
    sheet = np.concatenate([_column_labels(sheet.shape[1], len(OVERLAY_COLUMNS)), sheet], 0)
    with atomic_path(path) as tmp:
        Image.fromarray(sheet).save(tmp, format="PNG")
    return len(rows)


def _split_rows(manifest: pd.DataFrame, name: str, store: str) -> dict[str, np.ndarray]:
    parts = {}
    for split in ("train", "val", "test"):
        rows = np.flatnonzero(manifest["split"].to_numpy() == split)
        if len(rows) == 0:
            raise SystemExit(f"task '{name}': no images in split '{split}' of {store}")
        parts[split] = rows
    return parts


def run(s: SegmentSettings, store: str, init_path: str | None, out_dir: Path) -> int:
    """One segmentation run with settings ``s`` (:func:`retflow.settings.build.segment`); writes
    ``settings.json`` first, then the run's outputs, into ``out_dir``."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    s.write(out_dir / "settings.json")
    torch.manual_seed(s.seed)
    device = pick_device(s.device)
    reset_peak(device)
    spec, task = s.vit.spec(), s.task
    classes = [str(c) for c in task.classes]
    k = len(classes)
    if not (Path(store) / MASK_SHARD_DIR).is_dir():
        raise SystemExit(f"task '{task.name}': {store} has no {MASK_SHARD_DIR}/ (declare the dataset's "
                         f"mask_column, or phantom masks: true, and prepare it again)")
    top = max_mask_value(store)
    if top >= k:
        raise SystemExit(f"task '{task.name}': masks in {store} hold label {top}, but the task has {k} classes "
                         f"{classes} (mask value = class index)")
    manifest = load_manifest(store)
    if s.fold is not None:  # a cross-validation run: its fold is the test set (retflow.data.splits.fold_split)
        manifest = manifest.assign(split=fold_split(manifest, s.fold).to_numpy())
    parts = _split_rows(manifest, task.name, store)
    keep = label_fraction_indices(np.zeros(len(parts["train"]), int), s.fraction, s.seed)
    parts["train"] = parts["train"][keep]
    index = manifest["index"].to_numpy()
    norm = s.normalize.to_dict()
    train_tf = seg_train_transform(spec.img_size, s.crop_scale, s.hflip, norm, spec.in_chans)
    eval_tf = seg_eval_transform(spec.img_size, norm, spec.in_chans)
    train_ds = SegDataset(store, index[parts["train"]], train_tf, spec.in_chans)
    val_ds = SegDataset(store, index[parts["val"]], eval_tf, spec.in_chans)
    test_ds = SegDataset(store, index[parts["test"]], eval_tf, spec.in_chans)

    batch = min(s.batch_size, len(train_ds))
    epochs = s.epochs
    n_batches = max(len(train_ds) // batch, math.ceil(s.min_steps / epochs))
    model, groups = build_model(s, k, init_path)
    model.to(device)
    counts = param_counts(model)
    schedule = s.schedule(batch)
    optimizer = torch.optim.AdamW(groups, lr=schedule.lr)
    from monai.losses import DiceCELoss

    criterion = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
    print(f"segment {task.name}: {len(train_ds)} train (fraction {s.fraction:g}), {len(val_ds)} val, "
          f"{len(test_ds)} test; {k} classes; {epochs} epochs x {n_batches} steps, lr {schedule.lr:.3g}", flush=True)

    fingerprint = run_fingerprint(s, [Path(store) / "manifest.parquet", init_path])
    meta = {"kind": "segmentation", "spec": s.vit.to_dict(), "normalize": norm, "classes": classes,
            "task": task.name, "feature_size": s.feature_size}
    dice_ce = lambda logits, y: criterion(logits.float(), y[:, None])  # noqa: E731  (N,K,S,S) vs (N,S,S)

    def validate(model) -> tuple[float, dict, str]:
        pred, true, val_ce = predict_masks(model, val_ds, device)
        val = summarize(per_image_scores(pred, true, k))
        score = val[PRIMARY_SEG_METRIC] if math.isfinite(val[PRIMARY_SEG_METRIC]) else -math.inf
        return score, {"val_ce": val_ce, "val_dice": val["dice"], "val_iou": val["iou"]}, \
            f"val ce {val_ce:.4f} dice {val['dice']:.4f} iou {val['iou']:.4f}"

    best, _, best_path = fit(model, optimizer, dice_ce, train_ds, validate, epochs=epochs, n_batches=n_batches,
                          batch=batch, schedule=schedule, seed=s.seed, warmup_epochs=s.warmup_epochs,
                          num_workers=s.num_workers, device=device, meta=meta, out_dir=out_dir,
                          fingerprint=fingerprint)
    best_state = load_state(best_path)
    save_atomic(best_state, out_dir / "best.pth")
    model.load_state_dict(best_state["model"])
    pred, true, _ = predict_masks(model, test_ds, device)
    scores = per_image_scores(pred, true, k)
    boot = bootstrap_segmentation(scores, n_boot=s.evaluate.n_boot, seed=s.evaluate.seed)
    n_overlay = write_overlay(test_ds, pred, out_dir / "overlay.png", s.n_overlay)
    images_with = np.isfinite(scores["dice"]).sum(axis=0).astype(int).tolist()
    fg_dice = foreground_mean(scores["dice"])
    result = {
        "task": task.name, "task_type": "segmentation", "protocol": s.protocol,
        "model": s.model, "fraction": s.fraction, "seed": s.seed, "eval_set": "internal",
        "n": int(len(pred)), "primary_metric": PRIMARY_SEG_METRIC, "lower_is_better": [],
        "n_boot": s.evaluate.n_boot, "metrics": boot["metrics"], "classes": classes,
        "class_counts": images_with,
        "absent_classes": [classes[c] for c in range(1, k) if images_with[c] == 0],
        "per_class": {name: {"n_images": images_with[c], **{m: boot["per_class"][m][c] for m in SEG_METRICS}}
                      for c, name in enumerate(classes)},
        "pixel_counts": np.bincount(true.ravel(), minlength=k).astype(int).tolist(),
        "resolution": int(pred.shape[-1]),
        "overlay": "overlay.png" if n_overlay else None,
        "per_image": {"image_id": manifest["image_id"].to_numpy()[parts["test"]].astype(str).tolist(),
                      "dice": [float(v) if math.isfinite(v) else None for v in fg_dice]},
        "definitions": "per-image Dice/IoU per class (undefined where the class is absent from the truth), "
                       "averaged over images per class; dice/iou = mean over foreground classes 1..K-1; "
                       "95% percentile bootstrap over test images",
    }
    write_json(json_safe(result), out_dir / "metrics.json")
    write_json({"n_train": len(train_ds), "n_val": len(val_ds), "n_test": len(test_ds), "epochs": epochs,
                "best_epoch": best_state["epoch"], "best_val_score": best,
                "chance_loss": None, "min_train_loss": None,  # a Dice + CE loss has no simple chance level
                "seconds": round(time.perf_counter() - t0, 1), **counts, **peak_memory(device)},
               out_dir / "train_summary.json")
    m = boot["metrics"][PRIMARY_SEG_METRIC]
    print(f"test dice {m['value']:.4f} [{m['ci_low']:.4f}, {m['ci_high']:.4f}] "
          f"iou {boot['metrics']['iou']['value']:.4f} ({len(pred)} images)", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Fine-tune a ViT encoder + UNETR decoder on one segmentation task.")
    ap.add_argument("--settings", required=True,
                    help="the run's SegmentSettings as JSON (retflow.settings.build.segment(...).to_json())")
    ap.add_argument("--store", required=True)
    ap.add_argument("--init", default="", help="pretrained checkpoint / weights file; empty for random init")
    ap.add_argument("--out-dir", required=True)
    args = ap.parse_args(argv)
    return run(SegmentSettings.from_json(args.settings), args.store, args.init or None, Path(args.out_dir))


if __name__ == "__main__":
    sys.exit(main())
