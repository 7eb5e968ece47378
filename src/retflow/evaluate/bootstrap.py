"""Percentile-bootstrap confidence intervals for every evaluation metric, all task types.

A bootstrap replicate resamples the test cases with replacement. Each replicate is represented
by its case *counts* (how often each original case was drawn); the draws depend only on
``(n, n_boot, seed)``, so two models scored on the same test set with the same seed see the same
replicates (paired, used by :mod:`.compare`).

All metrics are computed for a block of replicates at once from those counts, rather than
calling sklearn once per replicate and metric:

* label metrics (accuracy, kappa, MCC, F1, ECE, ...) from count-weighted confusion matrices and
  count-weighted per-case sums;
* AUROC/AUPR from the cases sorted once by score, with tied scores grouped, so a replicate's
  weighted rank statistics are cumulative sums.

These vectorised formulas reproduce :func:`retflow.evaluate.metrics.compute_metrics` (sklearn)
on the resampled data exactly (up to float rounding); the tests check this. Regression metrics
use count-weighted sums too (Spearman from the replicate's average ranks of tied groups).
"""

from __future__ import annotations

import warnings

import numpy as np

from . import multilabel_metrics as _ml
from . import regression_metrics as _reg
from .metrics import (
    ECE_BINS,
    METRICS_BY_TYPE,
    check_inputs,
    compute_metrics,
    ece_bin_index,
    per_class_metrics,
)

MIN_VALID = 10
_BLOCK_ELEMENTS = 2_000_000  # replicates x cases per vectorised block (bounds memory)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _label_metrics(cm: np.ndarray, task_type: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Label-based metrics of a stack of confusion matrices ``cm`` (B, K, K): (summary, per class)."""
    k = cm.shape[1]
    t = cm.sum(axis=2)  # true counts per class
    p = cm.sum(axis=1)  # predicted counts per class
    d = np.diagonal(cm, axis1=1, axis2=2)
    n = t.sum(axis=1)
    present = t > 0
    out = {"accuracy": d.sum(axis=1) / n}
    recall = _safe_div(d, t)
    precision = _safe_div(d, p)
    f1 = _safe_div(2 * d, t + p)
    spec_c = _safe_div(n[:, None] - t - p + d, n[:, None] - t)
    out["balanced_accuracy"] = np.nanmean(np.where(present, recall, np.nan), axis=1)
    if task_type == "binary":
        out["f1"] = np.nan_to_num(f1[:, 1], nan=0.0)
        out["precision"] = np.nan_to_num(precision[:, 1], nan=0.0)
        out["sensitivity"] = recall[:, 1]
        out["specificity"] = spec_c[:, 1]
    else:
        used = (t + p) > 0  # sklearn's macro F1/precision average over labels seen in y_true or y_pred
        out["f1"] = np.nanmean(np.where(used, f1, np.nan), axis=1)
        out["precision"] = np.nanmean(np.where(used, np.nan_to_num(precision, nan=0.0), np.nan), axis=1)
        out["sensitivity"] = out["balanced_accuracy"].copy()
        enough = present.sum(axis=1) >= 2
        spec = np.nanmean(np.where(present, spec_c, np.nan), axis=1)
        out["specificity"] = np.where(enough, spec, np.nan)
    cov_tp = d.sum(axis=1) * n - (t * p).sum(axis=1)
    cov_pp = n**2 - (p * p).sum(axis=1)
    cov_tt = n**2 - (t * t).sum(axis=1)
    den = cov_pp * cov_tt
    out["mcc"] = np.where(den > 0, cov_tp / np.sqrt(np.where(den > 0, den, 1)), 0.0)
    idx = np.arange(k)
    weight_sets = {"kappa": (idx[:, None] != idx[None, :]).astype(float)}
    if task_type == "ordinal":
        weight_sets["qwk"] = (idx[:, None] - idx[None, :]).astype(float) ** 2
    expected = t[:, :, None] * p[:, None, :] / n[:, None, None]
    for name, w in weight_sets.items():
        observed = (cm * w).sum(axis=(1, 2))
        chance = (expected * w).sum(axis=(1, 2))
        out[name] = 1.0 - _safe_div(observed, chance)
    per_class = {"sensitivity": recall, "specificity": spec_c, "precision": precision, "f1": f1}
    return out, per_class


class _RankTables:
    """Score order and tie groups of the original cases for binary ranking problems, computed once.

    ``problems`` is a list of ``(positive mask (n,), scores (n,))``.
    """

    def __init__(self, problems):
        self.entries = []
        for pos, score in problems:
            order = np.argsort(-score, kind="stable")
            s = score[order]
            starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
            self.entries.append((order, starts, np.asarray(pos)[order]))

    def scores(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Weighted AUROC, AP and positive weight per problem: arrays (B, n_problems)."""
        auc, ap, npos = [], [], []
        for order, starts, pos in self.entries:
            ws = w[:, order]
            gp = np.add.reduceat(np.where(pos, ws, 0.0), starts, axis=1)  # positives per tie group
            gn = np.add.reduceat(np.where(pos, 0.0, ws), starts, axis=1)  # negatives per tie group
            cp, cn = np.cumsum(gp, axis=1), np.cumsum(gn, axis=1)
            tp, tn = cp[:, -1], cn[:, -1]
            below = tn[:, None] - cn  # negatives scoring strictly lower (groups sorted descending)
            auc.append(_safe_div((gp * (below + 0.5 * gn)).sum(axis=1), tp * tn))
            precision = _safe_div(cp, cp + cn)
            ap.append(_safe_div((gp * np.nan_to_num(precision)).sum(axis=1), tp))
            npos.append(tp)
        if not self.entries:
            empty = np.empty((w.shape[0], 0))
            return empty, empty, empty
        return np.stack(auc, axis=1), np.stack(ap, axis=1), np.stack(npos, axis=1)


def _masked_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Row means of ``values`` over ``mask`` (NaN for rows with nothing selected)."""
    if values.shape[1] == 0:
        return np.full(values.shape[0], np.nan)
    return np.nanmean(np.where(mask, values, np.nan), axis=1)


def _classification_replicates(y_true, probs, task_type, w):
    k = probs.shape[1]
    y_pred = probs.argmax(axis=1)
    onehot = np.zeros((y_true.size, k * k))
    onehot[np.arange(y_true.size), y_true * k + y_pred] = 1.0
    cm = (w @ onehot).reshape(-1, k, k)
    out, per_class = _label_metrics(cm, task_type)
    # expected calibration error from count-weighted per-bin sums of (correct - confidence)
    conf = probs.max(axis=1)
    gap = np.zeros((y_true.size, ECE_BINS))
    gap[np.arange(y_true.size), ece_bin_index(conf)] = (y_pred == y_true) - conf
    out["ece"] = np.abs(w @ gap).sum(axis=1) / w.sum(axis=1)
    # ranking metrics: every class present in the original data (others are NaN throughout)
    classes = [int(c) for c in np.unique(y_true)]
    auc, ap, npos = _RankTables([(y_true == c, probs[:, c]) for c in classes]).scores(w)
    total = w.sum(axis=1, keepdims=True)
    both = (npos > 0) & (npos < total)
    if task_type == "binary":
        col = classes.index(1) if 1 in classes else None
        for name, vals in (("auroc", auc), ("aupr", ap)):
            out[name] = np.where(both[:, col], vals[:, col], np.nan) if col is not None else np.full(len(w), np.nan)
    else:
        enough = (npos > 0).sum(axis=1) >= 2
        for name, vals in (("auroc", auc), ("aupr", ap)):
            out[name] = np.where(enough, _masked_mean(vals, npos > 0), np.nan)
    for name, vals in (("auroc", auc), ("aupr", ap)):
        full = np.full((len(w), k), np.nan)
        full[:, classes] = np.where(both, vals, np.nan)
        per_class[name] = full
    return out, per_class


def _multilabel_replicates(y, p, w):
    pred = _ml.predict_labels(p)
    yf, pf = y.astype(float), pred.astype(float)
    tp, fp = w @ (yf * pf), w @ ((1 - yf) * pf)
    fn, tn = w @ (yf * (1 - pf)), w @ ((1 - yf) * (1 - pf))
    npos, nneg = tp + fn, fp + tn
    total = w.sum(axis=1)
    f1 = _safe_div(2 * tp, 2 * tp + fp + fn)
    precision = _safe_div(tp, tp + fp)
    recall = _safe_div(tp, npos)
    spec = _safe_div(tn, nneg)
    auc, ap, _ = _RankTables([(y[:, j] == 1, p[:, j]) for j in range(y.shape[1])]).scores(w)
    both = (npos > 0) & (nneg > 0)
    auc, ap = np.where(both, auc, np.nan), np.where(both, ap, np.nan)
    present = npos > 0
    out = {
        "auroc": _masked_mean(auc, both),
        "aupr": _masked_mean(ap, both),
        "f1": _masked_mean(f1, present),
        "precision": _masked_mean(np.nan_to_num(precision, nan=0.0), present),
        "sensitivity": _masked_mean(recall, present),
        "specificity": _masked_mean(spec, nneg > 0),
        "subset_accuracy": (w @ (pred == y).all(axis=1).astype(float)) / total,
        "hamming_accuracy": (w @ (pred == y).mean(axis=1)) / total,
    }
    per_class = {"auroc": auc, "aupr": ap, "f1": f1, "precision": precision, "sensitivity": recall, "specificity": spec}
    return out, per_class


def _replicates(y_true, probs, task_type, w):
    """(summary, per class) metric arrays of weighted replicates (already validated inputs)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of all-NaN rows -> NaN
        if task_type == "multilabel":
            out, per_class = _multilabel_replicates(y_true, probs, w)
        elif task_type == "regression":
            out, per_class = _reg.replicate_regression_metrics(y_true, probs, w), {}
        else:
            out, per_class = _classification_replicates(y_true, probs, task_type, w)
    return {name: out[name] for name in METRICS_BY_TYPE[task_type]}, per_class


def replicate_metrics(y_true, probs, task_type: str, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Metrics of weighted replicates: ``weights`` (B, n) counts each case's draws per replicate.

    Row b gives the metrics of the data set in which case i appears ``weights[b, i]`` times.
    """
    y_true, probs = check_inputs(y_true, probs, task_type)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    return _replicates(y_true, probs, task_type, w)[0]


def replicate_per_class(y_true, probs, task_type: str, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class metrics of weighted replicates: ``{metric: (B, K)}`` (``{}`` for regression)."""
    y_true, probs = check_inputs(y_true, probs, task_type)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    return _replicates(y_true, probs, task_type, w)[1]


def resample_counts(n: int, n_boot: int, seed: int):
    """Yield blocks of bootstrap case counts, arrays (b, n), ``n_boot`` rows in all.

    Draws come from ``np.random.default_rng(seed)`` and depend only on ``(n, n_boot, seed)``.
    """
    if n <= 0 or n_boot <= 0:
        return
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_ELEMENTS // n)
    for start in range(0, n_boot, block):
        b = min(block, n_boot - start)
        idx = rng.integers(0, n, size=(b, n))
        yield np.bincount((np.arange(b)[:, None] * n + idx).ravel(), minlength=b * n).reshape(b, n)


def bootstrap_replicates(
    y_true, probs, task_type: str, n_boot: int = 1000, seed: int = 0
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Metric values of ``n_boot`` seeded bootstrap replicates: (summary ``{metric: (B,)}``,
    per class ``{metric: (B, K)}``). Same ``(n, n_boot, seed)`` -> same resamples."""
    y_true, probs = check_inputs(y_true, probs, task_type)
    summary: dict[str, list] = {name: [] for name in METRICS_BY_TYPE[task_type]}
    per_class: dict[str, list] = {}
    for counts in resample_counts(y_true.shape[0], n_boot, seed):
        out, pc = _replicates(y_true, probs, task_type, counts.astype(np.float64))
        for name, vals in out.items():
            summary[name].append(vals)
        for name, vals in pc.items():
            per_class.setdefault(name, []).append(vals)
    k = probs.shape[1] if probs.ndim == 2 else 0
    return (
        {name: np.concatenate(v) if v else np.empty(0) for name, v in summary.items()},
        {name: np.concatenate(v) if v else np.empty((0, k)) for name, v in per_class.items()},
    )


def _ci(value: float, reps: np.ndarray, alpha: float) -> dict[str, float]:
    vals = reps[np.isfinite(reps)]
    if vals.size >= MIN_VALID:
        lo, hi = np.quantile(vals, [alpha / 2, 1 - alpha / 2])
    else:
        lo = hi = float("nan")
    return {"value": float(value), "ci_low": float(lo), "ci_high": float(hi)}


def bootstrap_all(
    y_true, probs, task_type: str, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, dict]:
    """Point estimates and percentile-bootstrap ``1 - alpha`` CIs, summary and per class.

    Returns ``{"metrics": {metric: {"value", "ci_low", "ci_high"}},
    "per_class": {metric: [{"value", "ci_low", "ci_high"} for each class]}}`` (per class is
    ``{}`` for regression). Cases are resampled with replacement using
    ``np.random.default_rng(seed)``; replicates where a metric is undefined (NaN) are skipped for
    that metric, and the CI is NaN when fewer than 10 replicates are valid.
    """
    y_true, probs = check_inputs(y_true, probs, task_type)
    point = compute_metrics(y_true, probs, task_type)
    point_pc = per_class_metrics(y_true, probs, task_type)
    reps, reps_pc = bootstrap_replicates(y_true, probs, task_type, n_boot=n_boot, seed=seed)
    metrics = {name: _ci(value, reps[name], alpha) for name, value in point.items()}
    per_class = {}
    for name in point_pc:
        r = reps_pc.get(name, np.empty((0, len(point_pc[name]))))
        per_class[name] = [_ci(v, r[:, c], alpha) for c, v in enumerate(point_pc[name])]
    return {"metrics": metrics, "per_class": per_class}


def bootstrap_ci(
    y_true, probs, task_type: str, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, dict[str, float]]:
    """Point estimate and percentile-bootstrap ``1 - alpha`` CI of every metric.

    Returns ``{metric: {"value", "ci_low", "ci_high"}}``; see :func:`bootstrap_all`.
    """
    return bootstrap_all(y_true, probs, task_type, n_boot=n_boot, seed=seed, alpha=alpha)["metrics"]


__all__ = [
    "bootstrap_all",
    "bootstrap_ci",
    "bootstrap_replicates",
    "replicate_metrics",
    "replicate_per_class",
    "resample_counts",
]
