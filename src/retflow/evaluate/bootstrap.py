"""Percentile-bootstrap confidence intervals for every evaluation metric.

A bootstrap replicate resamples the test cases with replacement. Rather than calling sklearn
once per replicate and metric, each replicate is represented by its case *counts*
(how often each original case was drawn), and all metrics are computed for a block of
replicates at once from those counts:

* label metrics (accuracy, kappa, MCC, ...) from count-weighted confusion matrices;
* AUROC/AUPR from the cases sorted once by score, with tied scores grouped, so a replicate's
  weighted rank statistics are cumulative sums.

These vectorised formulas reproduce :func:`retflow.evaluate.metrics.compute_metrics` (sklearn)
on the resampled data exactly (up to float rounding); the tests check this.
"""

from __future__ import annotations

import warnings

import numpy as np

from .metrics import METRICS_BY_TYPE, check_inputs, compute_metrics

MIN_VALID = 10
_BLOCK_ELEMENTS = 2_000_000  # replicates x cases per vectorised block (bounds memory)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _label_metrics(cm: np.ndarray, task_type: str) -> dict[str, np.ndarray]:
    """Label-based metrics of a stack of confusion matrices ``cm`` (B, K, K)."""
    k = cm.shape[1]
    t = cm.sum(axis=2)  # true counts per class
    p = cm.sum(axis=1)  # predicted counts per class
    d = np.diagonal(cm, axis1=1, axis2=2)
    n = t.sum(axis=1)
    present = t > 0
    out = {"accuracy": d.sum(axis=1) / n}
    recall = _safe_div(d, t)
    out["balanced_accuracy"] = np.nanmean(np.where(present, recall, np.nan), axis=1)
    spec_c = _safe_div(n[:, None] - t - p + d, n[:, None] - t)
    if task_type == "binary":
        out["f1"] = np.nan_to_num(_safe_div(2 * d[:, 1], t[:, 1] + p[:, 1]), nan=0.0)
        out["sensitivity"] = recall[:, 1]
        out["specificity"] = spec_c[:, 1]
    else:
        used = (t + p) > 0  # sklearn's macro F1 averages over labels seen in y_true or y_pred
        out["f1"] = np.nanmean(np.where(used, _safe_div(2 * d, t + p), np.nan), axis=1)
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
    return out


class _RankTables:
    """Per-class score order and tie groups of the original cases, computed once."""

    def __init__(self, y_true: np.ndarray, probs: np.ndarray, classes: list[int]):
        self.entries = []
        for c in classes:
            order = np.argsort(-probs[:, c], kind="stable")
            s = probs[order, c]
            starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
            self.entries.append((c, order, starts, y_true[order] == c))

    def scores(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Weighted AUROC, AP and positive weight per class: arrays (B, n_classes)."""
        auc, ap, npos = [], [], []
        for _, order, starts, pos in self.entries:
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
        return np.stack(auc, axis=1), np.stack(ap, axis=1), np.stack(npos, axis=1)


def replicate_metrics(y_true, probs, task_type: str, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Metrics of weighted replicates: ``weights`` (B, n) counts each case's draws per replicate.

    Row b gives the metrics of the data set in which case i appears ``weights[b, i]`` times.
    """
    y_true, probs = check_inputs(y_true, probs, task_type)
    k = probs.shape[1]
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    y_pred = probs.argmax(axis=1)
    onehot = np.zeros((y_true.size, k * k))
    onehot[np.arange(y_true.size), y_true * k + y_pred] = 1.0
    cm = (w @ onehot).reshape(-1, k, k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of all-NaN rows -> NaN
        out = _label_metrics(cm, task_type)
        out.update(_rank_metrics(y_true, probs, task_type, w))
    return {name: out[name] for name in METRICS_BY_TYPE[task_type]}


def _rank_metrics(y_true: np.ndarray, probs: np.ndarray, task_type: str, w: np.ndarray) -> dict[str, np.ndarray]:
    """AUROC and AUPR (binary: class 1; else macro one-vs-rest over present classes) per replicate."""
    out = {}
    if task_type == "binary":
        auc, ap, npos = _RankTables(y_true, probs, [1]).scores(w)
        both = (npos[:, 0] > 0) & (npos[:, 0] < w.sum(axis=1))
        out["auroc"] = np.where(both, auc[:, 0], np.nan)
        out["aupr"] = np.where(both, ap[:, 0], np.nan)
    else:
        classes = [int(c) for c in np.unique(y_true)]
        auc, ap, npos = _RankTables(y_true, probs, classes).scores(w)
        present = npos > 0
        enough = present.sum(axis=1) >= 2
        for name, vals in (("auroc", auc), ("aupr", ap)):
            mean = np.nanmean(np.where(present, vals, np.nan), axis=1) if classes else np.full(len(w), np.nan)
            out[name] = np.where(enough, mean, np.nan)
    return out


def bootstrap_ci(
    y_true, probs, task_type: str, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, dict[str, float]]:
    """Point estimate and percentile-bootstrap ``1 - alpha`` CI of every metric.

    Returns ``{metric: {"value", "ci_low", "ci_high"}}``. Cases are resampled with replacement
    using ``np.random.default_rng(seed)``; replicates where a metric is undefined (NaN) are
    skipped for that metric, and the CI is NaN when fewer than 10 replicates are valid.
    """
    y_true, probs = check_inputs(y_true, probs, task_type)
    point = compute_metrics(y_true, probs, task_type)
    n = y_true.size
    reps: dict[str, list[np.ndarray]] = {name: [] for name in point}
    if n > 0 and n_boot > 0:
        rng = np.random.default_rng(seed)
        block = max(1, _BLOCK_ELEMENTS // n)
        for start in range(0, n_boot, block):
            b = min(block, n_boot - start)
            idx = rng.integers(0, n, size=(b, n))
            counts = np.bincount((np.arange(b)[:, None] * n + idx).ravel(), minlength=b * n).reshape(b, n)
            for name, vals in replicate_metrics(y_true, probs, task_type, counts).items():
                reps[name].append(vals)
    result = {}
    for name, value in point.items():
        vals = np.concatenate(reps[name]) if reps[name] else np.empty(0)
        vals = vals[np.isfinite(vals)]
        if vals.size >= MIN_VALID:
            lo, hi = np.quantile(vals, [alpha / 2, 1 - alpha / 2])
        else:
            lo = hi = float("nan")
        result[name] = {"value": float(value), "ci_low": float(lo), "ci_high": float(hi)}
    return result
