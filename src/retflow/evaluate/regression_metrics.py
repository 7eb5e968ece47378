"""Metrics of regression tasks (a continuous target, e.g. age or a thickness).

Inputs: ``y_true`` (n,) targets and ``y_pred`` (n,) predictions, both finite floats.

* ``mae``: mean absolute error (sklearn ``mean_absolute_error``), lower is better;
* ``rmse``: root mean squared error (sklearn ``root_mean_squared_error``), lower is better;
* ``r2``: coefficient of determination (sklearn ``r2_score``; with a constant target it is 1.0
  for a perfect prediction and 0.0 otherwise, sklearn's convention);
* ``pearson``: Pearson correlation (scipy ``pearsonr``), NaN when either input is constant;
* ``spearman``: Spearman rank correlation (scipy ``spearmanr``, ties get average ranks), NaN when
  either input is constant.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats
from sklearn import metrics as skm

METRICS = ["mae", "rmse", "r2", "pearson", "spearman"]
PRIMARY = "mae"
LOWER_IS_BETTER = frozenset({"mae", "rmse"})


def check_regression_inputs(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    """Validate and flatten ``y_true`` and ``y_pred`` to finite float vectors of equal length."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] == 1:
        p = p[:, 0]
    if y.ndim != 1 or p.ndim != 1 or y.shape != p.shape:
        raise ValueError(f"regression y_true and y_pred must both be (n,); got {y.shape} and {p.shape}")
    if not (np.isfinite(y).all() and np.isfinite(p).all()):
        raise ValueError("regression y_true and y_pred must be finite")
    return y, p


def _corr(fn, y: np.ndarray, p: np.ndarray) -> float:
    if y.size < 2 or np.ptp(y) == 0 or np.ptp(p) == 0:
        return float("nan")
    return float(fn(y, p)[0])


def compute_regression_metrics(y_true, y_pred) -> dict[str, float]:
    """All ``METRICS`` of a regression task (NaN for an empty set)."""
    y, p = check_regression_inputs(y_true, y_pred)
    if y.size == 0:
        return {name: float("nan") for name in METRICS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "mae": float(skm.mean_absolute_error(y, p)),
            "rmse": float(skm.root_mean_squared_error(y, p)),
            "r2": float(skm.r2_score(y, p)) if y.size >= 2 else float("nan"),
            "pearson": _corr(stats.pearsonr, y, p),
            "spearman": _corr(stats.spearmanr, y, p),
        }


def _weighted_midranks(values: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average ranks of every case within each weighted replicate, and distinct values drawn.

    ``w`` (B, n) counts how often each case is drawn; a case drawn ``w`` times shares the
    average rank of its tie group in the resampled data. Returns ranks (B, n) and the number
    of distinct values with positive weight per replicate (B,).
    """
    order = np.argsort(values, kind="stable")
    s = values[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    group_w = np.add.reduceat(w[:, order], starts, axis=1)  # (B, groups)
    rank = np.cumsum(group_w, axis=1) - group_w + (group_w + 1) / 2
    group = np.empty(values.size, dtype=np.int64)
    group[order] = np.repeat(np.arange(starts.size), np.diff(np.r_[starts, values.size]))
    return rank[:, group], (group_w > 0).sum(axis=1)


def _weighted_corr(a: np.ndarray, b: np.ndarray, w: np.ndarray, total: np.ndarray) -> np.ndarray:
    ma = (w * a).sum(axis=1, keepdims=True) / total[:, None]
    mb = (w * b).sum(axis=1, keepdims=True) / total[:, None]
    da, db = a - ma, b - mb
    den = np.sqrt((w * da * da).sum(axis=1) * (w * db * db).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.clip((w * da * db).sum(axis=1) / den, -1.0, 1.0)


def replicate_regression_metrics(y_true, y_pred, weights) -> dict[str, np.ndarray]:
    """``METRICS`` of count-weighted replicates (``weights`` (B, n)), equal to
    :func:`compute_regression_metrics` on the resampled data (up to float rounding)."""
    y, p = check_regression_inputs(y_true, y_pred)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    total = w.sum(axis=1)
    err = p - y
    with np.errstate(invalid="ignore", divide="ignore"):
        mae = (w @ np.abs(err)) / total
        mse = (w @ (err * err)) / total
        my = (w @ y) / total
        ss_tot = (w * (y[None, :] - my[:, None]) ** 2).sum(axis=1)
    ry, ny = _weighted_midranks(y, w)
    rp, npred = _weighted_midranks(p, w)
    constant = (ny < 2) | (npred < 2)
    ss_res = mse * total
    r2 = np.where(ny < 2, np.where(ss_res == 0, 1.0, 0.0), 1.0 - ss_res / np.where(ny < 2, 1.0, ss_tot))
    out = {
        "mae": mae,
        "rmse": np.sqrt(mse),
        "r2": np.where(total >= 2, r2, np.nan),
        "pearson": np.where(constant, np.nan, _weighted_corr(y[None, :], p[None, :], w, total)),
        "spearman": np.where(constant, np.nan, _weighted_corr(ry, rp, w, total)),
    }
    return {name: out[name] for name in METRICS}
