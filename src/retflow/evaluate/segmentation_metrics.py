"""Segmentation metrics: Dice and IoU per class and their mean, with bootstrap CIs over images.

Definitions (the same as ``monai.metrics.DiceMetric`` / ``MeanIoU`` with ``include_background=True``,
``ignore_empty=True`` and ``reduction="mean_batch"``; the tests check this):

* per image ``i`` and class ``c`` (one-hot of the label maps): ``Dice = 2|P ∩ G| / (|P| + |G|)``,
  ``IoU = |P ∩ G| / |P ∪ G|``; **undefined (NaN) when the image has no pixel of class c in the
  ground truth** (whatever was predicted), so such images do not count for that class;
* per class: the mean over the images where it is defined (NaN if it is defined on none: the
  class is reported in ``absent_classes``);
* ``dice`` / ``iou``: the mean of the per-class values over the **foreground** classes
  ``1 .. K-1`` (class 0 = background), skipping undefined ones.

Bootstrap: the test *images* are resampled with replacement (the seeded draws of
:func:`retflow.evaluate.bootstrap.resample_counts`, so two models on the same test set see the
same replicates); each replicate recomputes the per-class means from count-weighted per-image
scores, then the foreground mean. Percentile ``1 - alpha`` intervals, NaN with fewer than 10
valid replicates (as the classification metrics).
"""

from __future__ import annotations

import numpy as np

from .bootstrap import _ci, resample_counts

__all__ = ["SEG_METRICS", "PRIMARY_SEG_METRIC", "confusion_counts", "per_image_scores", "foreground_mean", "summarize",
           "segmentation_metrics", "bootstrap_segmentation"]

SEG_METRICS = ("dice", "iou")
PRIMARY_SEG_METRIC = "dice"


def _check(pred, target, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred)
    target = np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from the target's {target.shape}")
    if pred.ndim == 2:
        pred, target = pred[None], target[None]
    if n_classes < 2:
        raise ValueError(f"need at least 2 classes, got {n_classes}")
    for name, arr in (("prediction", pred), ("target", target)):
        if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
            raise ValueError(f"{name} labels outside 0..{n_classes - 1}: {arr.min()}..{arr.max()}")
    return pred.reshape(len(pred), -1).astype(np.int64), target.reshape(len(target), -1).astype(np.int64)


def confusion_counts(pred, target, n_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image and class ``(tp, pred_count, target_count)``, each int (N, K).

    ``pred`` and ``target`` are label maps (N, H, W) (or one (H, W) map) with values in 0..K-1.
    """
    p, t = _check(pred, target, n_classes)
    n, k = p.shape[0], n_classes
    offset = (np.arange(n) * k)[:, None]
    tp = np.bincount((offset + t)[p == t], minlength=n * k).reshape(n, k)
    pc = np.bincount((offset + p).ravel(), minlength=n * k).reshape(n, k)
    tc = np.bincount((offset + t).ravel(), minlength=n * k).reshape(n, k)
    return tp, pc, tc


def per_image_scores(pred, target, n_classes: int) -> dict[str, np.ndarray]:
    """``{"dice": (N, K), "iou": (N, K)}``; NaN where the image has no ground truth of the class."""
    tp, pc, tc = confusion_counts(pred, target, n_classes)
    present = tc > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(present, 2.0 * tp / (pc + tc), np.nan)
        iou = np.where(present, tp / (pc + tc - tp), np.nan)
    return {"dice": dice, "iou": iou}


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    valid = np.isfinite(x)
    count = valid.sum(axis=axis)
    total = np.where(valid, x, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def foreground_mean(scores: np.ndarray) -> np.ndarray:
    """Per image, the mean of a (N, K) score over the defined foreground classes (NaN if none)."""
    return _nanmean(np.asarray(scores, np.float64)[:, 1:], axis=1)


def summarize(scores: dict[str, np.ndarray]) -> dict:
    """Per-class means over images and the foreground mean, from :func:`per_image_scores`."""
    out: dict = {"per_class": {}}
    for name, s in scores.items():
        per_class = _nanmean(s, axis=0)
        out["per_class"][name] = per_class
        out[name] = float(_nanmean(per_class[None, 1:], axis=1)[0])
    return out


def segmentation_metrics(pred, target, n_classes: int) -> dict:
    """``{"dice", "iou"}`` (foreground means) and ``per_class`` (arrays of K) for label maps."""
    return summarize(per_image_scores(pred, target, n_classes))


def bootstrap_segmentation(scores: dict[str, np.ndarray], n_boot: int = 1000, seed: int = 0,
                           alpha: float = 0.05) -> dict:
    """Point values and percentile-bootstrap CIs over images from per-image ``scores``.

    Returns ``{"metrics": {metric: {"value", "ci_low", "ci_high"}}, "per_class": {metric: [ci per
    class]}}`` (the same shape as :func:`retflow.evaluate.bootstrap.bootstrap_all`).
    """
    point = summarize(scores)
    n, k = next(iter(scores.values())).shape
    reps = {name: [] for name in scores}
    reps_pc = {name: [] for name in scores}
    for counts in resample_counts(n, n_boot, seed):
        w = counts.astype(np.float64)
        for name, s in scores.items():
            valid = np.isfinite(s)
            num = w @ np.where(valid, s, 0.0)
            den = w @ valid.astype(np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                pc = np.where(den > 0, num / np.maximum(den, 1e-300), np.nan)  # (b, K)
            reps_pc[name].append(pc)
            reps[name].append(_nanmean(pc[:, 1:], axis=1))
    metrics, per_class = {}, {}
    for name in scores:
        r = np.concatenate(reps[name]) if reps[name] else np.empty(0)
        r_pc = np.concatenate(reps_pc[name]) if reps_pc[name] else np.empty((0, k))
        metrics[name] = _ci(point[name], r, alpha)
        per_class[name] = [_ci(float(v), r_pc[:, c], alpha) for c, v in enumerate(point["per_class"][name])]
    return {"metrics": metrics, "per_class": per_class}
