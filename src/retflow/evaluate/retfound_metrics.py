"""The two metric definitions of the RETFound code, so results can be compared with the papers.

Both take labels ``y_true`` (n,) and class probabilities ``probs`` (n, K) of a binary,
multiclass or ordinal task (``y_pred`` = arg-max) and return a dict of floats. They were
re-implemented from the public RETFound code (rmaphoh/RETFound_MAE), not copied.

``retfound_v1`` -- paper-era code (``misc_measures`` + ``evaluate`` of RETFound_MAE's original
``engine_finetune.py``, 2023). From sklearn's per-class one-vs-rest confusion matrices
(``multilabel_confusion_matrix(y_true, y_pred, labels=range(K))``) it takes, for every class
c = 1..K-1 (**class 0 is skipped**), the binary measures with TP/FP/FN/TN of "class c vs rest":

* ``acc``         = (TP + TN) / n, the binary accuracy of class c;
* ``sensitivity`` = TP / (TP + FN);   ``specificity`` = TN / (TN + FP);
* ``precision``   = TP / (TP + FP);   ``g_mean`` = sqrt(sensitivity * specificity);
* ``f1``          = 2 precision sensitivity / (precision + sensitivity), as the code computes it: it
  is 0/0 (undefined) whenever TP = 0, since precision and sensitivity are then 0 or undefined
  (``2 TP / (2 TP + FP + FN)`` would give 0 there);
* ``mcc``         = (TP TN - FP FN) / sqrt((TN+FP)(TN+FN)(TP+FN)(TP+FP));

and reports each as the arithmetic mean over c = 1..K-1 of the classes where it is defined (the
original ``np.mean`` turns any 0/0 class into a NaN result; here that class is skipped, so e.g.
``f1`` is the mean over the classes with TP > 0). So for a binary task they are the measures of
class 1, and ``acc`` of a multiclass task is the mean one-vs-rest binary accuracy, *not* top-1
accuracy (it is higher). The ranking metrics are *not* restricted to classes 1..K-1: the code
passes one-hot labels and the softmax to ``roc_auc_score(..., average="macro")`` and
``average_precision_score(..., average="macro")``, i.e. ``auroc`` / ``aupr`` are the macro means
of the one-vs-rest AUROC / average precision over **all** K classes, class 0 included (for a
binary task ``auroc`` equals the class-1 AUROC, while ``aupr`` is the mean of the class-0 and
class-1 average precisions).

``retfound_current`` -- the current RETFound code (``evaluate`` of the rewritten
``engine_finetune.py`` in today's RETFound_MAE repository, which also serves RETFound-DINOv2):

* ``accuracy``  = top-1 accuracy;
* ``f1``, ``precision``, ``recall`` = sklearn macro averages over the one-hot columns of all K
  classes with ``zero_division=0`` (a class absent from the test set and never predicted counts
  as 0);
* ``kappa``     = unweighted Cohen's kappa of ``y_true`` vs ``y_pred``;
* ``auroc``, ``aupr`` = macro one-vs-rest AUROC / average precision over the one-hot columns of
  all K classes, as in v1;
* ``score``     = (``f1`` + ``auroc`` + ``kappa``) / 3, the model-selection score of that code.

A class absent from ``y_true`` (listed by ``absent_classes`` of :mod:`.metrics`), in both
definitions:

* ``aupr`` is exactly the code's ``average_precision_score(one_hot, probs, average="macro")`` as
  current scikit-learn computes it: the absent class has AP 0 (sklearn warns "No positive class
  found") and is averaged in over all K classes. This is *not* retflow's own ``aupr``, which
  leaves absent classes out; older scikit-learn (e.g. the 0.24 the paper-era code pinned)
  returned NaN here.
* ``auroc`` averages over the classes present in ``y_true`` (the code's ``roc_auc_score`` raises
  or returns NaN for an absent class); fewer than two present classes give NaN.

Those are the only deviations from the code: ``auroc`` where the original crashes or is NaN, and
the v1 means that skip 0/0 classes where the original mean is NaN.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn import metrics as skm

from .metrics import CLASSIFICATION_TYPES, check_inputs

V1_KEYS = ["acc", "sensitivity", "specificity", "precision", "g_mean", "f1", "mcc", "auroc", "aupr"]
CURRENT_KEYS = ["accuracy", "f1", "precision", "recall", "kappa", "auroc", "aupr", "score"]
# what metrics.json says of these definitions (its "conventions"); the module docstring has the detail
CONVENTIONS = {
    "retfound_v1": "RETFound's paper-era misc_measures, means over classes 1..K-1 that leave out a class "
    "whose value is 0/0 (the original's mean is NaN then; f1 = 2PR/(P+R) is 0/0 whenever TP = 0); "
    "auroc: macro over the classes present; aupr: sklearn's average_precision_score(one-hot, average='macro') "
    "over all K classes, an absent class counting as AP 0.",
    "retfound_current": "RETFound's current evaluate: f1/precision/recall macro over all K classes with "
    "zero_division=0; auroc: macro over the classes present; aupr: over all K classes, an absent class "
    "counting as AP 0 (sklearn's convention, as that code computes it).",
}


def _validate(y_true, probs, task_type):
    if task_type is None:
        task_type = "binary" if np.ndim(probs) == 1 or np.shape(probs)[1] == 2 else "multiclass"
    if task_type not in CLASSIFICATION_TYPES:
        raise ValueError(f"RETFound metrics are defined for {CLASSIFICATION_TYPES}, got {task_type!r}")
    return check_inputs(y_true, probs, task_type)


def _nanmean(values) -> float:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


def _ovr_rank_means(y_true: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """Macro one-vs-rest AUROC over the classes present in ``y_true`` (NaN below two) and the
    code's macro average precision over all K one-hot columns (an absent class has AP 0)."""
    present = np.unique(y_true)
    onehot = np.eye(probs.shape[1], dtype=np.int64)[y_true]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No positive class found": sklearn's AP 0 is the convention kept
        ap = float(skm.average_precision_score(onehot, probs, average="macro"))
        if present.size < 2:
            return float("nan"), ap
        auc = [skm.roc_auc_score(y_true == c, probs[:, c]) for c in present]
    return float(np.mean(auc)), ap


def retfound_v1(y_true, probs, task_type: str | None = None) -> dict[str, float]:
    """RETFound paper-era metrics (module docstring): per-class measures over classes 1..K-1."""
    y_true, probs = _validate(y_true, probs, task_type)
    if y_true.size == 0:
        return {key: float("nan") for key in V1_KEYS}
    k = probs.shape[1]
    mcm = skm.multilabel_confusion_matrix(y_true, probs.argmax(axis=1), labels=np.arange(k))[1:]
    tn, fp, fn, tp = (mcm[:, i, j].astype(float) for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)))
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = tp / (tp + fn)
        spec = tn / (tn + fp)
        precision = tp / (tp + fp)
        per_class = {
            "acc": (tp + tn) / y_true.size,
            "sensitivity": sens,
            "specificity": spec,
            "precision": precision,
            "g_mean": np.sqrt(sens * spec),
            "f1": 2 * precision * sens / (precision + sens),  # the code's formula: 0/0 when TP = 0
            "mcc": (tp * tn - fp * fn) / np.sqrt((tn + fp) * (tn + fn) * (tp + fn) * (tp + fp)),
        }
    out = {key: _nanmean(values) for key, values in per_class.items()}
    out["auroc"], out["aupr"] = _ovr_rank_means(y_true, probs)
    return {key: out[key] for key in V1_KEYS}


def retfound_current(y_true, probs, task_type: str | None = None) -> dict[str, float]:
    """Current RETFound metrics (module docstring), including the selection ``score``."""
    y_true, probs = _validate(y_true, probs, task_type)
    if y_true.size == 0:
        return {key: float("nan") for key in CURRENT_KEYS}
    k = probs.shape[1]
    y_pred = probs.argmax(axis=1)
    labels = np.arange(k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {
            "accuracy": float(skm.accuracy_score(y_true, y_pred)),
            "f1": float(skm.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
            "precision": float(skm.precision_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
            "recall": float(skm.recall_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
            "kappa": float(skm.cohen_kappa_score(y_true, y_pred)),
        }
    out["auroc"], out["aupr"] = _ovr_rank_means(y_true, probs)
    out["score"] = (out["f1"] + out["auroc"] + out["kappa"]) / 3
    return {key: out[key] for key in CURRENT_KEYS}
