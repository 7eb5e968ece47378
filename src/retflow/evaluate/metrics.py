"""Classification metrics for the evaluation protocol (binary, multiclass and ordinal tasks).

Every metric is computed with scikit-learn. Conventions shared by all task types:

* ``y_pred`` is the arg-max of the class probabilities.
* Ranking metrics (``auroc``, ``aupr``) of a multiclass/ordinal task are macro one-vs-rest
  averages over the classes *present* in ``y_true``; a class missing from the test set is
  skipped rather than crashing, and fewer than two present classes gives NaN.
* ``sensitivity``/``specificity`` are of the positive class (binary) or macro one-vs-rest
  averages over the present classes (multiclass/ordinal).
* A metric that is undefined on the data (e.g. AUROC with one class) is ``nan``.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn import metrics as skm

TASK_TYPES = ("binary", "multiclass", "ordinal")
_COMMON = [
    "accuracy",
    "balanced_accuracy",
    "auroc",
    "aupr",
    "f1",
    "mcc",
    "kappa",
    "sensitivity",
    "specificity",
]
METRICS_BY_TYPE: dict[str, list[str]] = {
    "binary": list(_COMMON),
    "multiclass": list(_COMMON),
    "ordinal": _COMMON + ["qwk"],
}
PRIMARY_METRIC = {"binary": "auroc", "multiclass": "auroc", "ordinal": "qwk"}
MAX_CURVE_POINTS = 200


def check_inputs(y_true, probs, task_type: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate and normalise ``(y_true, probs)``; a 1-D ``probs`` of a binary task is P(class 1)."""
    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
    y_true = np.asarray(y_true).astype(np.int64).ravel()
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim == 1 and task_type == "binary":
        probs = np.column_stack([1.0 - probs, probs])
    if probs.ndim != 2 or probs.shape[0] != y_true.shape[0]:
        raise ValueError(f"probs must be (n, K) with n={y_true.shape[0]}, got {probs.shape}")
    k = probs.shape[1]
    if task_type == "binary" and k != 2:
        raise ValueError(f"binary task needs 2 probability columns, got {k}")
    if k < 2:
        raise ValueError("need at least 2 classes")
    if y_true.size and (y_true.min() < 0 or y_true.max() >= k):
        raise ValueError(f"y_true must lie in [0, {k}), got range [{y_true.min()}, {y_true.max()}]")
    return y_true, probs


def _ovr_mean(score_fn, y_true: np.ndarray, probs: np.ndarray) -> float:
    """Macro mean of a binary ranking score, one-vs-rest over the classes present in y_true."""
    present = np.unique(y_true)
    if present.size < 2:
        return float("nan")
    return float(np.mean([score_fn(y_true == c, probs[:, c]) for c in present]))


def _binary_rank_metric(score_fn, y_true: np.ndarray, p1: np.ndarray) -> float:
    if np.unique(y_true).size < 2:
        return float("nan")
    return float(score_fn(y_true, p1))


def _sens_spec(y_true: np.ndarray, y_pred: np.ndarray, k: int, task_type: str) -> tuple[float, float]:
    """Sensitivity/specificity from sklearn's per-class one-vs-rest confusion matrices."""
    mcm = skm.multilabel_confusion_matrix(y_true, y_pred, labels=np.arange(k))  # (k, 2, 2): [[tn, fp], [fn, tp]]
    tn, fp, fn, tp = (mcm[:, i, j].astype(float) for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)))
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = tp / (tp + fn)
        spec = tn / (tn + fp)
    if task_type == "binary":
        return float(sens[1]), float(spec[1])
    present = np.unique(y_true)
    return float(np.nanmean(sens[present])) if present.size else float("nan"), (
        float(np.mean(spec[present])) if present.size >= 2 else float("nan")
    )


def compute_metrics(y_true, probs, task_type: str) -> dict[str, float]:
    """All metrics of ``METRICS_BY_TYPE[task_type]`` for labels ``y_true`` and (n, K) ``probs``."""
    y_true, probs = check_inputs(y_true, probs, task_type)
    k = probs.shape[1]
    if y_true.size == 0:
        return {name: float("nan") for name in METRICS_BY_TYPE[task_type]}
    y_pred = probs.argmax(axis=1)
    labels = np.arange(k)
    out: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns on absent classes; we define those cases
        out["accuracy"] = float(skm.accuracy_score(y_true, y_pred))
        out["balanced_accuracy"] = float(skm.balanced_accuracy_score(y_true, y_pred))
        if task_type == "binary":
            out["auroc"] = _binary_rank_metric(skm.roc_auc_score, y_true, probs[:, 1])
            out["aupr"] = _binary_rank_metric(skm.average_precision_score, y_true, probs[:, 1])
            out["f1"] = float(skm.f1_score(y_true, y_pred, pos_label=1, average="binary", zero_division=0))
        else:
            out["auroc"] = _ovr_mean(skm.roc_auc_score, y_true, probs)
            out["aupr"] = _ovr_mean(skm.average_precision_score, y_true, probs)
            out["f1"] = float(skm.f1_score(y_true, y_pred, average="macro", zero_division=0))
        out["mcc"] = float(skm.matthews_corrcoef(y_true, y_pred))
        out["kappa"] = float(skm.cohen_kappa_score(y_true, y_pred, labels=labels))
        out["sensitivity"], out["specificity"] = _sens_spec(y_true, y_pred, k, task_type)
        if task_type == "ordinal":
            # labels=arange(K) so quadratic weights use class distances even if a grade is absent
            out["qwk"] = float(skm.cohen_kappa_score(y_true, y_pred, labels=labels, weights="quadratic"))
    return {name: out[name] for name in METRICS_BY_TYPE[task_type]}


def confusion(y_true, y_pred, k: int) -> list[list[int]]:
    """K x K confusion matrix (rows: true class, columns: predicted class) as nested int lists."""
    cm = skm.confusion_matrix(
        np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64), labels=np.arange(k)
    )
    return cm.astype(int).tolist()


def _subsample(fpr: np.ndarray, tpr: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep at most ``max_points`` evenly spaced curve points, always including both ends."""
    if fpr.size <= max_points:
        return fpr, tpr
    idx = np.unique(np.linspace(0, fpr.size - 1, max_points).round().astype(int))
    return fpr[idx], tpr[idx]


def roc_curves(y_true, probs, class_names, max_points: int = MAX_CURVE_POINTS) -> dict[str, dict[str, list[float]]]:
    """ROC curves keyed by class name: the positive class (K=2) or each class present in y_true.

    A curve is ``{"fpr": [...], "tpr": [...]}`` with at most ``max_points`` points; classes whose
    one-vs-rest problem has no positives or no negatives are left out.
    """
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    probs = np.asarray(probs, dtype=np.float64)
    names = [str(c) for c in class_names]
    if len(names) != probs.shape[1]:
        raise ValueError(f"{len(names)} class names for {probs.shape[1]} probability columns")
    classes = [1] if probs.shape[1] == 2 else [int(c) for c in np.unique(y_true)]
    curves = {}
    for c in classes:
        positives = y_true == c
        if positives.all() or not positives.any():
            continue
        fpr, tpr, _ = skm.roc_curve(positives, probs[:, c])
        fpr, tpr = _subsample(fpr, tpr, max_points)
        curves[names[c]] = {"fpr": np.round(fpr, 5).tolist(), "tpr": np.round(tpr, 5).tolist()}
    return curves
