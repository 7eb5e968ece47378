"""Metrics for every task type; classification metrics (binary, multiclass, ordinal) live here.

Multilabel and regression metrics live in :mod:`.multilabel_metrics` and
:mod:`.regression_metrics`; :func:`compute_metrics` and :func:`check_inputs` dispatch on the
task type, and ``METRICS_BY_TYPE`` / ``PRIMARY_METRIC`` / ``LOWER_IS_BETTER`` cover all types.

Classification conventions (every value is checked against scikit-learn in the tests):

* ``y_pred`` is the arg-max of the class probabilities (first class on ties).
* ``accuracy`` is top-1 accuracy; ``balanced_accuracy`` is sklearn's (mean recall over the classes
  present in ``y_true``).
* Ranking metrics (``auroc``, ``aupr`` = average precision) of a binary task are of class 1; of a
  multiclass/ordinal task they are macro one-vs-rest averages over the classes *present* in
  ``y_true``. A class missing from the test set is skipped (and listed by
  :func:`absent_classes`) rather than crashing; fewer than two present classes gives NaN. This
  differs from ``average_precision_score(one_hot, probs, average="macro")``, which scores an
  absent class AP 0 and averages it in (the RETFound definitions, :mod:`.retfound_metrics`, keep
  that); the bootstrap replicates (:mod:`.bootstrap`) skip classes absent from the replicate in
  the same way, and the per-class tables hold NaN for them. ``RANKING_CONVENTION`` says so in
  words (metrics.json ``conventions``).
* ``f1`` and ``precision``: of class 1 (binary) or sklearn's macro average (multiclass/ordinal:
  over the classes in ``y_true`` or ``y_pred``, ``zero_division=0``).
* ``sensitivity`` (= recall) and ``specificity``: of class 1 (binary) or macro one-vs-rest
  averages over the classes present in ``y_true`` (multiclass/ordinal).
* ``mcc``: Matthews correlation; ``kappa``: unweighted Cohen's kappa; ``qwk`` (ordinal only):
  quadratic-weighted Cohen's kappa with weights from the grade distance over all K grades.
* ``ece``: expected calibration error of the top-1 prediction with ``ECE_BINS`` = 15 equal-width
  confidence bins ``(0, 1/15], (1/15, 2/15], ..., (14/15, 1]``: with ``conf_i`` the largest class
  probability of case i and ``correct_i`` whether its arg-max is the true class,
  ``ECE = sum_b |B_b| / n * |mean(correct in B_b) - mean(conf in B_b)|``
  ``= (1/n) sum_b |sum_{i in B_b} (correct_i - conf_i)|`` (Guo et al. 2017). Lower is better.
* A metric that is undefined on the data (e.g. AUROC with one class) is ``nan``.

Per-class values (:func:`per_class_metrics`): one-vs-rest AUROC, AUPR, sensitivity, specificity,
precision and F1 of every class, NaN where undefined (absent class, 0/0).
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn import metrics as skm

from . import multilabel_metrics as _ml
from . import regression_metrics as _reg

CLASSIFICATION_TYPES = ("binary", "multiclass", "ordinal")
TASK_TYPES = CLASSIFICATION_TYPES + ("multilabel", "regression")
_COMMON = [
    "accuracy",
    "balanced_accuracy",
    "auroc",
    "aupr",
    "f1",
    "precision",
    "mcc",
    "kappa",
    "sensitivity",
    "specificity",
    "ece",
]
METRICS_BY_TYPE: dict[str, list[str]] = {
    "binary": list(_COMMON),
    "multiclass": list(_COMMON),
    "ordinal": _COMMON + ["qwk"],
    "multilabel": list(_ml.METRICS),
    "regression": list(_reg.METRICS),
}
PRIMARY_METRIC = {
    "binary": "auroc",
    "multiclass": "auroc",
    "ordinal": "qwk",
    "multilabel": _ml.PRIMARY,
    "regression": _reg.PRIMARY,
}
LOWER_IS_BETTER = frozenset({"ece"} | _reg.LOWER_IS_BETTER)
PER_CLASS_METRICS = ["auroc", "aupr", "sensitivity", "specificity", "precision", "f1"]
ECE_BINS = 15
MAX_CURVE_POINTS = 200
_PRESENT = (
    "auroc, aupr (average precision): macro one-vs-rest means over the classes present in the test set; "
    "a class without test cases is left out (not scored AP 0 and averaged in, as sklearn's "
    "average_precision_score(one-hot, average='macro') does), in the value, in every bootstrap replicate "
    "(classes absent from the replicate) and in the per-class table (null)."
)
# how the ranking metrics treat absent classes, per task type (metrics.json "conventions")
RANKING_CONVENTION = {
    "binary": "auroc, aupr (average precision): of class 1; null when the test set (or a bootstrap "
    "replicate) has one class only.",
    "multiclass": _PRESENT,
    "ordinal": _PRESENT,
    "multilabel": _ml.RANKING_CONVENTION,
}


def check_inputs(y_true, probs, task_type: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate and normalise ``(y_true, probs)`` for ``task_type``.

    Classification: ``y_true`` (n,) class indices and ``probs`` (n, K); a 1-D ``probs`` of a
    binary task is P(class 1). Multilabel: both (n, K). Regression: ``probs`` are the (n,)
    predictions.
    """
    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
    if task_type == "multilabel":
        return _ml.check_multilabel_inputs(y_true, probs)
    if task_type == "regression":
        return _reg.check_regression_inputs(y_true, probs)
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


def ece_bin_index(confidence: np.ndarray, n_bins: int = ECE_BINS) -> np.ndarray:
    """Bin of each confidence among ``n_bins`` equal-width bins ``(lo, hi]`` (0 goes to bin 0)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.searchsorted(edges[1:-1], np.asarray(confidence, dtype=np.float64), side="left")


def expected_calibration_error(y_true, probs, n_bins: int = ECE_BINS) -> float:
    """Top-1 expected calibration error with ``n_bins`` equal-width bins (module docstring)."""
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    probs = np.asarray(probs, dtype=np.float64)
    if y_true.size == 0:
        return float("nan")
    conf = probs.max(axis=1)
    gap = (probs.argmax(axis=1) == y_true).astype(float) - conf
    per_bin = np.bincount(ece_bin_index(conf, n_bins), weights=gap, minlength=n_bins)
    return float(np.abs(per_bin).sum() / y_true.size)


def compute_metrics(y_true, probs, task_type: str) -> dict[str, float]:
    """All metrics of ``METRICS_BY_TYPE[task_type]``.

    Classification: labels ``y_true`` and (n, K) ``probs``; multilabel: (n, K) 0/1 and (n, K)
    sigmoid probabilities; regression: targets and predictions, both (n,).
    """
    if task_type == "multilabel":
        return _ml.compute_multilabel_metrics(y_true, probs)
    if task_type == "regression":
        return _reg.compute_regression_metrics(y_true, probs)
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
            out["precision"] = float(
                skm.precision_score(y_true, y_pred, pos_label=1, average="binary", zero_division=0)
            )
        else:
            out["auroc"] = _ovr_mean(skm.roc_auc_score, y_true, probs)
            out["aupr"] = _ovr_mean(skm.average_precision_score, y_true, probs)
            out["f1"] = float(skm.f1_score(y_true, y_pred, average="macro", zero_division=0))
            out["precision"] = float(skm.precision_score(y_true, y_pred, average="macro", zero_division=0))
        out["mcc"] = float(skm.matthews_corrcoef(y_true, y_pred))
        out["kappa"] = float(skm.cohen_kappa_score(y_true, y_pred, labels=labels))
        out["sensitivity"], out["specificity"] = _sens_spec(y_true, y_pred, k, task_type)
        out["ece"] = expected_calibration_error(y_true, probs)
        if task_type == "ordinal":
            # labels=arange(K) so quadratic weights use class distances even if a grade is absent
            out["qwk"] = float(skm.cohen_kappa_score(y_true, y_pred, labels=labels, weights="quadratic"))
    return {name: out[name] for name in METRICS_BY_TYPE[task_type]}


def per_class_metrics(y_true, probs, task_type: str) -> dict[str, list[float]]:
    """Per-class (per-sign) metrics ``{metric: [value of class 0, ..., class K-1]}``.

    Classification: one-vs-rest ``PER_CLASS_METRICS`` of every class (NaN where undefined, e.g.
    AUROC of a class absent from ``y_true``); multilabel: per-sign metrics of
    :mod:`.multilabel_metrics`; regression: ``{}``.
    """
    if task_type == "regression":
        check_inputs(y_true, probs, task_type)
        return {}
    if task_type == "multilabel":
        return _ml.per_sign_metrics(y_true, probs)
    y_true, probs = check_inputs(y_true, probs, task_type)
    k = probs.shape[1]
    y_pred = probs.argmax(axis=1)
    out: dict[str, list[float]] = {"auroc": [], "aupr": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for c in range(k):
            pos = y_true == c
            both = 0 < pos.sum() < y_true.size
            out["auroc"].append(float(skm.roc_auc_score(pos, probs[:, c])) if both else float("nan"))
            out["aupr"].append(float(skm.average_precision_score(pos, probs[:, c])) if both else float("nan"))
    mcm = skm.multilabel_confusion_matrix(y_true, y_pred, labels=np.arange(k))
    tn, fp, fn, tp = (mcm[:, i, j].astype(float) for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)))
    with np.errstate(invalid="ignore", divide="ignore"):
        out["sensitivity"] = (tp / (tp + fn)).tolist()
        out["specificity"] = (tn / (tn + fp)).tolist()
        out["precision"] = (tp / (tp + fp)).tolist()
        out["f1"] = (2 * tp / (2 * tp + fp + fn)).tolist()
    return {name: out[name] for name in PER_CLASS_METRICS}


def absent_classes(y_true, probs, task_type: str) -> list[int]:
    """Classes (multilabel: signs) without a single positive case in ``y_true``; [] for regression."""
    if task_type == "regression":
        return []
    y_true, probs = check_inputs(y_true, probs, task_type)
    if task_type == "multilabel":
        return _ml.absent_signs(y_true)
    counts = np.bincount(y_true, minlength=probs.shape[1])
    return [int(c) for c in np.flatnonzero(counts == 0)]


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
    one-vs-rest problem has no positives or no negatives are left out. A 2-D ``y_true``
    (multilabel, (n, K) of 0/1) gives one curve per sign.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    names = [str(c) for c in class_names]
    if len(names) != probs.shape[1]:
        raise ValueError(f"{len(names)} class names for {probs.shape[1]} probability columns")
    if y_true.ndim == 2:
        problems = [(j, y_true[:, j] == 1) for j in range(probs.shape[1])]
    else:
        y_true = y_true.ravel()
        classes = [1] if probs.shape[1] == 2 else [int(c) for c in np.unique(y_true)]
        problems = [(c, y_true == c) for c in classes]
    curves = {}
    for c, positives in problems:
        if positives.all() or not positives.any():
            continue
        fpr, tpr, _ = skm.roc_curve(positives, probs[:, c])
        fpr, tpr = _subsample(fpr, tpr, max_points)
        curves[names[c]] = {"fpr": np.round(fpr, 5).tolist(), "tpr": np.round(tpr, 5).tolist()}
    return curves
