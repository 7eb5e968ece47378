"""Metrics of multilabel tasks (one sigmoid per sign, e.g. OCT key signs).

Inputs: ``y_true`` (n, K) of 0/1 and ``probs`` (n, K) of independent per-sign probabilities.
A sign is predicted present when its probability is >= ``THRESHOLD`` (0.5).

Summary metrics (``METRICS``), each computed with scikit-learn:

* ``auroc``, ``aupr``: macro averages of the per-sign AUROC / average precision over the signs
  with both positive and negative cases in ``y_true`` (others are undefined and skipped, where
  sklearn's ``average="macro"`` over all signs would score a sign without positives AP 0);
  bootstrap replicates skip them the same way (``RANKING_CONVENTION``);
* ``f1``, ``precision``, ``sensitivity`` (recall): macro averages at the 0.5 threshold over the
  signs with at least one positive case (a sign never predicted has precision 0);
* ``specificity``: macro average of TN / (TN + FP) over the signs with at least one negative case;
* ``subset_accuracy``: fraction of cases with every sign right (sklearn ``accuracy_score``);
* ``hamming_accuracy``: fraction of (case, sign) decisions that are right, 1 - Hamming loss.

A sign without positive cases in the test set is reported in ``absent_classes`` rather than
crashing; a metric is NaN when no sign qualifies for it.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn import metrics as skm

THRESHOLD = 0.5
METRICS = [
    "auroc",
    "aupr",
    "f1",
    "precision",
    "sensitivity",
    "specificity",
    "subset_accuracy",
    "hamming_accuracy",
]
PRIMARY = "auroc"
PER_CLASS = ["auroc", "aupr", "f1", "precision", "sensitivity", "specificity"]
RANKING_CONVENTION = (
    "auroc, aupr (average precision): macro means over the signs with both positive and negative test "
    "cases; other signs are left out (not scored AP 0 as sklearn's average='macro' over all signs does), "
    "in the value, in every bootstrap replicate and in the per-sign table (null)."
)


def check_multilabel_inputs(y_true, probs) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``y_true`` (n, K) in {0, 1} and ``probs`` (n, K) in [0, 1]."""
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 2 or p.ndim != 2 or y.shape != p.shape:
        raise ValueError(f"multilabel y_true and probs must both be (n, K); got {y.shape} and {p.shape}")
    if p.shape[1] < 1:
        raise ValueError("multilabel task needs at least one sign")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("multilabel y_true must be 0/1")
    if p.size and (not np.isfinite(p).all() or p.min() < 0 or p.max() > 1):
        raise ValueError("multilabel probs must be finite and lie in [0, 1]")
    return y.astype(np.int64), p


def predict_labels(probs: np.ndarray) -> np.ndarray:
    """0/1 decisions at ``THRESHOLD``."""
    return (np.asarray(probs) >= THRESHOLD).astype(np.int64)


def absent_signs(y_true: np.ndarray) -> list[int]:
    """Indices of signs with no positive case."""
    return [int(j) for j in np.flatnonzero(np.asarray(y_true).sum(axis=0) == 0)]


def _counts(y: np.ndarray, pred: np.ndarray):
    tp = (y & pred).sum(axis=0).astype(float)
    fp = ((1 - y) & pred).sum(axis=0).astype(float)
    fn = (y & (1 - pred)).sum(axis=0).astype(float)
    tn = ((1 - y) & (1 - pred)).sum(axis=0).astype(float)
    return tp, fp, fn, tn


def per_sign_metrics(y_true, probs) -> dict[str, list[float]]:
    """Per-sign ``PER_CLASS`` metrics; NaN where a sign's metric is undefined (0/0, one class)."""
    y, p = check_multilabel_inputs(y_true, probs)
    pred = predict_labels(p)
    tp, fp, fn, tn = _counts(y, pred)
    out: dict[str, list[float]] = {name: [] for name in PER_CLASS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for j in range(y.shape[1]):
            both = 0 < y[:, j].sum() < y.shape[0]
            out["auroc"].append(float(skm.roc_auc_score(y[:, j], p[:, j])) if both else float("nan"))
            out["aupr"].append(float(skm.average_precision_score(y[:, j], p[:, j])) if both else float("nan"))
    with np.errstate(invalid="ignore", divide="ignore"):
        out["f1"] = (2 * tp / (2 * tp + fp + fn)).tolist()
        out["precision"] = (tp / (tp + fp)).tolist()
        out["sensitivity"] = (tp / (tp + fn)).tolist()
        out["specificity"] = (tn / (tn + fp)).tolist()
    return out


def compute_multilabel_metrics(y_true, probs) -> dict[str, float]:
    """All ``METRICS`` of a multilabel task (see the module docstring for definitions)."""
    y, p = check_multilabel_inputs(y_true, probs)
    if y.shape[0] == 0:
        return {name: float("nan") for name in METRICS}
    pred = predict_labels(p)
    npos = y.sum(axis=0)
    present = np.flatnonzero(npos > 0)
    has_neg = np.flatnonzero(npos < y.shape[0])
    both = np.flatnonzero((npos > 0) & (npos < y.shape[0]))
    nan = float("nan")
    out: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if both.size:
            out["auroc"] = float(skm.roc_auc_score(y[:, both], p[:, both], average="macro"))
            out["aupr"] = float(skm.average_precision_score(y[:, both], p[:, both], average="macro"))
        else:
            out["auroc"] = out["aupr"] = nan
        if present.size:
            yp, pp = y[:, present], pred[:, present]
            out["f1"] = float(skm.f1_score(yp, pp, average="macro", zero_division=0))
            out["precision"] = float(skm.precision_score(yp, pp, average="macro", zero_division=0))
            out["sensitivity"] = float(skm.recall_score(yp, pp, average="macro", zero_division=0))
        else:
            out["f1"] = out["precision"] = out["sensitivity"] = nan
        if has_neg.size:
            _, fp, _, tn = _counts(y[:, has_neg], pred[:, has_neg])
            out["specificity"] = float(np.mean(tn / (tn + fp)))
        else:
            out["specificity"] = nan
        out["subset_accuracy"] = float(skm.accuracy_score(y, pred))
        out["hamming_accuracy"] = float(1.0 - skm.hamming_loss(y, pred))
    return {name: out[name] for name in METRICS}
