"""Paired comparison of two models evaluated on the same test set.

* **DeLong's test** (DeLong, DeLong & Clarke-Pearson 1988; fast midrank algorithm of Sun & Xu
  2014) for two correlated AUROCs of a binary task. With ``m`` positives ``X`` and ``n``
  negatives ``Y`` and ``psi(x, y) = 1 if x > y, 1/2 if x == y, else 0``, model r has the
  structural components ``V10_r(X_i) = mean_j psi(X_ri, Y_rj)`` and
  ``V01_r(Y_j) = mean_i psi(X_ri, Y_rj)``; ``AUC_r`` is their mean, and
  ``Cov(AUC) = S10 / m + S01 / n`` with ``S10``, ``S01`` the sample covariance matrices
  (``ddof=1``) of the components across models. The difference ``AUC_a - AUC_b`` is tested with
  ``z = diff / sqrt(var_a + var_b - 2 cov_ab)`` against the standard normal (two-sided); its CI is
  ``diff +- z_{1-alpha/2} * se``.
* **Paired bootstrap** for any metric of any task type: both models are scored on the same
  seeded resamples of the test cases (:func:`.bootstrap.bootstrap_replicates`). The CI of
  ``metric_a - metric_b`` is the percentile interval of the replicate differences; the two-sided
  p-value is ``min(1, 2 * min((1 + #{d* <= 0}) / (B + 1), (1 + #{d* >= 0}) / (B + 1)))`` over the
  ``B`` replicates where both values are defined. Macro one-vs-rest AUROC of multiclass/ordinal
  tasks is compared this way.

Command line::

    python -m retflow.evaluate.compare --a predsA.parquet --b predsB.parquet \\
        --task-type binary --metric auroc --out compare.json [--n-boot 2000] [--seed 0]

Rows of the two predictions files (formats: :mod:`.evaluate`) are aligned by ``image_id``; the
files must hold the same images with the same labels.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from scipy import stats

from ..atomic import json_safe, write_json
from .bootstrap import MIN_VALID, bootstrap_replicates
from .evaluate import read_predictions
from .metrics import LOWER_IS_BETTER, METRICS_BY_TYPE, PRIMARY_METRIC, TASK_TYPES, check_inputs, compute_metrics

DEFAULT_N_BOOT = 2000


def _binary_scores(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(np.int64).ravel()
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if s.shape[1] != y.size:
        raise ValueError(f"scores must be (n_models, n) with n={y.size}, got {s.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("DeLong needs binary labels 0/1")
    if y.sum() == 0 or y.sum() == y.size:
        raise ValueError("DeLong needs both positive and negative cases")
    return y, s


def delong_components(y_true, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs and DeLong structural components of one or more score vectors on the same cases.

    ``scores`` is (n_models, n) (or (n,)); returns ``(auc (M,), v10 (M, m), v01 (M, n_neg))`` with
    ``v10`` over the positive cases and ``v01`` over the negative cases, both in data order.
    """
    y, s = _binary_scores(y_true, scores)
    pos, neg = y == 1, y == 0
    m, n = int(pos.sum()), int(neg.sum())
    aucs, v10, v01 = [], [], []
    for row in s:
        x, z = row[pos], row[neg]
        tx, tz = stats.rankdata(x), stats.rankdata(z)
        t_all = stats.rankdata(np.concatenate([x, z]))
        v10.append((t_all[:m] - tx) / n)  # negatives below each positive (ties 1/2), as a fraction
        v01.append(1.0 - (t_all[m:] - tz) / m)  # positives above each negative (ties 1/2)
        aucs.append(v10[-1].mean())
    return np.array(aucs), np.array(v10), np.array(v01)


def delong_covariance(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    """AUCs (M,) and their DeLong covariance matrix (M, M) for score vectors on the same cases."""
    aucs, v10, v01 = delong_components(y_true, scores)
    m, n = v10.shape[1], v01.shape[1]
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((len(aucs), len(aucs)))
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((len(aucs), len(aucs)))
    return aucs, s10 / m + s01 / n


def delong_test(y_true, score_a, score_b, alpha: float = 0.05) -> dict[str, float]:
    """DeLong's test of AUROC(a) vs AUROC(b) on the same binary cases (module docstring).

    Returns ``auc_a``, ``auc_b``, ``difference`` (a - b), ``se``, ``z``, ``p_value`` (two-sided),
    ``ci_low``/``ci_high`` of the difference, ``var_a``, ``var_b`` and ``cov``.
    """
    aucs, cov = delong_covariance(y_true, np.vstack([score_a, score_b]))
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    se = float(np.sqrt(max(var, 0.0)))
    if se > 0:
        z = diff / se
        p = float(2 * stats.norm.sf(abs(z)))
    else:  # identical rankings (or a degenerate set): no evidence of a difference
        z, p = (0.0, 1.0) if diff == 0 else (float("inf") * np.sign(diff), 0.0)
    half = float(stats.norm.ppf(1 - alpha / 2)) * se
    return {
        "auc_a": float(aucs[0]),
        "auc_b": float(aucs[1]),
        "difference": diff,
        "se": se,
        "z": float(z),
        "p_value": p,
        "ci_low": diff - half,
        "ci_high": diff + half,
        "var_a": float(cov[0, 0]),
        "var_b": float(cov[1, 1]),
        "cov": float(cov[0, 1]),
    }


def paired_bootstrap(
    y_true, probs_a, probs_b, task_type: str, metric: str, n_boot: int = DEFAULT_N_BOOT, seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, float]:
    """Seeded paired bootstrap of ``metric(a) - metric(b)`` (module docstring).

    Returns ``value_a``, ``value_b``, ``difference``, ``ci_low``, ``ci_high``, ``p_value``,
    ``n_boot`` and ``n_valid`` (replicates where both values are defined). CI and p-value are NaN
    with fewer than 10 valid replicates.
    """
    if metric not in METRICS_BY_TYPE[task_type]:
        raise ValueError(f"metric {metric!r} is not one of {METRICS_BY_TYPE[task_type]} ({task_type})")
    ya, pa = check_inputs(y_true, probs_a, task_type)
    _, pb = check_inputs(y_true, probs_b, task_type)
    if pa.shape != pb.shape:
        raise ValueError(f"the two models' predictions differ in shape: {pa.shape} vs {pb.shape}")
    value_a = compute_metrics(ya, pa, task_type)[metric]
    value_b = compute_metrics(ya, pb, task_type)[metric]
    reps_a = bootstrap_replicates(ya, pa, task_type, n_boot=n_boot, seed=seed)[0][metric]
    reps_b = bootstrap_replicates(ya, pb, task_type, n_boot=n_boot, seed=seed)[0][metric]
    d = reps_a - reps_b
    d = d[np.isfinite(d)]
    nan = float("nan")
    if d.size >= MIN_VALID:
        lo, hi = (float(v) for v in np.quantile(d, [alpha / 2, 1 - alpha / 2]))
        below = (1 + np.count_nonzero(d <= 0)) / (d.size + 1)
        above = (1 + np.count_nonzero(d >= 0)) / (d.size + 1)
        p = float(min(1.0, 2 * min(below, above)))
    else:
        lo = hi = p = nan
    return {
        "value_a": float(value_a),
        "value_b": float(value_b),
        "difference": float(value_a - value_b),
        "ci_low": lo,
        "ci_high": hi,
        "p_value": p,
        "n_boot": int(n_boot),
        "n_valid": int(d.size),
    }


def compare_predictions(
    y_true, probs_a, probs_b, task_type: str, metric: str | None = None, n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0, alpha: float = 0.05,
) -> dict:
    """Compare models a and b on the same cases with ``metric`` (default: the primary metric).

    Binary AUROC uses DeLong's test (``method: "delong"``, the paired bootstrap is added under
    ``paired_bootstrap``); everything else the paired bootstrap. Top-level keys: ``metric``,
    ``task_type``, ``n``, ``method``, ``lower_is_better``, ``value_a``, ``value_b``,
    ``difference`` (a - b), ``ci_low``, ``ci_high``, ``p_value``, ``alpha``.
    """
    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
    metric = metric or PRIMARY_METRIC[task_type]
    boot = paired_bootstrap(y_true, probs_a, probs_b, task_type, metric, n_boot=n_boot, seed=seed, alpha=alpha)
    y, pa = check_inputs(y_true, probs_a, task_type)
    out = {
        "metric": metric,
        "task_type": task_type,
        "n": int(y.shape[0]),
        "lower_is_better": metric in LOWER_IS_BETTER,
        "alpha": alpha,
        "seed": int(seed),
    }
    use_delong = task_type == "binary" and metric == "auroc" and 0 < y.sum() < y.size
    if use_delong:
        _, pb = check_inputs(y_true, probs_b, task_type)
        dl = delong_test(y, pa[:, 1], pb[:, 1], alpha=alpha)
        out.update(
            method="delong",
            value_a=dl["auc_a"],
            value_b=dl["auc_b"],
            difference=dl["difference"],
            ci_low=dl["ci_low"],
            ci_high=dl["ci_high"],
            p_value=dl["p_value"],
            delong=dl,
            paired_bootstrap=boot,
        )
    else:
        out.update(method="paired_bootstrap", **{k: boot[k] for k in ("value_a", "value_b", "difference")})
        out.update(ci_low=boot["ci_low"], ci_high=boot["ci_high"], p_value=boot["p_value"], paired_bootstrap=boot)
    return out


def align_predictions(path_a, path_b, task_type: str, n_classes: int | None = None):
    """Read two predictions files and align B's rows to A's by ``image_id``.

    Returns ``(image_ids, y_true, probs_a, probs_b)``. Raises ``SystemExit`` when an image id is
    duplicated, the image sets differ, the labels of an image disagree or the class counts differ.
    """
    ids_a, y_a, p_a = read_predictions(path_a, task_type, n_classes)
    ids_b, y_b, p_b = read_predictions(path_b, task_type, n_classes)
    for path, ids in ((path_a, ids_a), (path_b, ids_b)):
        uniq, counts = np.unique(ids.astype(str), return_counts=True)
        if (counts > 1).any():
            raise SystemExit(f"{path}: duplicated image_id values, e.g. {uniq[counts > 1][:5].tolist()}")
    key_a, key_b = ids_a.astype(str), ids_b.astype(str)
    only_a = np.setdiff1d(key_a, key_b)
    only_b = np.setdiff1d(key_b, key_a)
    if only_a.size or only_b.size:
        raise SystemExit(
            f"the predictions files hold different images: {only_a.size} only in {path_a} "
            f"(e.g. {only_a[:5].tolist()}), {only_b.size} only in {path_b} (e.g. {only_b[:5].tolist()})"
        )
    if p_a.shape[1:] != p_b.shape[1:]:
        raise SystemExit(f"{path_a} and {path_b} differ in their number of classes: {p_a.shape} vs {p_b.shape}")
    order = np.argsort(key_b)[np.searchsorted(np.sort(key_b), key_a)]
    y_b, p_b = y_b[order], p_b[order]
    mismatch = np.flatnonzero(
        ~np.isclose(y_a, y_b).reshape(len(y_a), -1).all(axis=1) if task_type == "regression"
        else (y_a != y_b).reshape(len(y_a), -1).any(axis=1)
    )
    if mismatch.size:
        raise SystemExit(
            f"{mismatch.size} images have different y_true in {path_a} and {path_b}, "
            f"e.g. {key_a[mismatch[:5]].tolist()}"
        )
    return ids_a, y_a, p_a, p_b


def _parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m retflow.evaluate.compare", description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="predictions parquet of model A")
    ap.add_argument("--b", required=True, help="predictions parquet of model B")
    ap.add_argument("--task-type", required=True, choices=TASK_TYPES)
    ap.add_argument("--metric", default=None, help="metric to compare (default: the task type's primary metric)")
    ap.add_argument("--out", required=True, help="compare.json to write")
    ap.add_argument("--classes", nargs="*", default=None, help="class names (default: from the prob_* columns)")
    ap.add_argument("--n-boot", type=int, default=DEFAULT_N_BOOT)
    ap.add_argument("--seed", type=int, default=0, help="seed of the paired bootstrap")
    ap.add_argument("--alpha", type=float, default=0.05)
    args = ap.parse_args(argv)
    metric = args.metric or PRIMARY_METRIC[args.task_type]
    if metric not in METRICS_BY_TYPE[args.task_type]:
        ap.error(f"--metric {metric} is not a {args.task_type} metric: {METRICS_BY_TYPE[args.task_type]}")
    args.metric = metric
    return args


def main(argv=None) -> int:
    """CLI entry point; returns 0 on success (errors exit with a message)."""
    args = _parse_args(argv)
    n_classes = len(args.classes) if args.classes and args.task_type != "regression" else None
    _, y, pa, pb = align_predictions(args.a, args.b, args.task_type, n_classes)
    res = compare_predictions(y, pa, pb, args.task_type, args.metric, n_boot=args.n_boot, seed=args.seed,
                              alpha=args.alpha)
    res = json_safe({"a": str(args.a), "b": str(args.b), **res})
    write_json(res, args.out)
    print(
        f"{args.out}: {res['metric']} a={res['value_a']} b={res['value_b']} diff={res['difference']} "
        f"[{res['ci_low']}, {res['ci_high']}] p={res['p_value']} ({res['method']})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
