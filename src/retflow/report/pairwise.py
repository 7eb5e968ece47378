"""Paired comparison of every model of one task x protocol x label fraction x seed.

All models were trained on the same training subset and tested on the same internal test split,
so their predictions are paired case by case. For every pair of models (config order, ``a``
before ``b``) :func:`retflow.evaluate.compare.compare_predictions` tests the difference of one
metric (default: the task type's primary metric): DeLong's test for a binary AUROC, a seeded
paired bootstrap otherwise. The **best** model is the one with the best value of that metric on
the test set (lowest for lower-is-better metrics such as ECE or MAE; ties: first in config
order); ``best_vs_rest`` restates its pairs as ``best - other`` (the p-values of both tests are
symmetric in a and b, so only the sign of the difference and its CI change).

Command line (``workflow_scripts/compare.py`` is the same; the settings are
:func:`retflow.settings.report.compare` of the config, the predictions in the order of its models)::

    python -m retflow.report.pairwise --settings '<CompareSettings JSON>' \\
        --predictions A.parquet B.parquet [...] --out compare.json [--metric auroc]

Output JSON: ``task``, ``protocol``, ``fraction``, ``seed``, ``task_type``, ``metric``,
``lower_is_better``, ``method`` (of the pairs), ``n``, ``n_boot``, ``boot_seed``, ``models``,
``predictions``, ``values`` (model -> metric value), ``best``, ``pairs`` and ``best_vs_rest`` (lists
of compare results with ``a``/``b`` model names; NaN written as null), and ``settings`` (what the job
ran with).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys

from ..atomic import json_safe, write_json
from ..evaluate.compare import align_predictions, compare_predictions
from ..evaluate.metrics import LOWER_IS_BETTER, METRICS_BY_TYPE, PRIMARY_METRIC, TASK_TYPES
from ..settings.report import CompareSettings

_PAIR_KEYS = ("method", "value_a", "value_b", "difference", "ci_low", "ci_high", "p_value", "n")


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def pick_best(values: dict, lower_is_better: bool) -> str | None:
    """Model with the best finite value (first in dict order on ties); None if none is finite."""
    best = None
    for model, v in values.items():
        if not _finite(v):
            continue
        if best is None or (v < values[best] if lower_is_better else v > values[best]):
            best = model
    return best


def flip(pair: dict) -> dict:
    """A compare result of a vs b restated as b vs a (difference and CI negated)."""
    out = dict(pair)
    out["a"], out["b"] = pair["b"], pair["a"]
    out["value_a"], out["value_b"] = pair.get("value_b"), pair.get("value_a")
    neg = (lambda v: -v if _finite(v) else v)
    out["difference"] = neg(pair.get("difference"))
    out["ci_low"], out["ci_high"] = neg(pair.get("ci_high")), neg(pair.get("ci_low"))
    return out


def compare_models(
    predictions: dict, task_type: str, classes: list | None, metric: str | None, *, n_boot: int, seed: int,
    alpha: float = 0.05,
) -> dict:
    """Compare every pair of ``predictions`` (model -> predictions parquet) on ``metric`` (None: the
    task type's primary metric) with ``n_boot`` paired bootstrap replicates seeded ``seed``; see the
    module docstring."""
    if task_type not in TASK_TYPES:
        raise SystemExit(f"task type {task_type!r} cannot be compared (one of {TASK_TYPES})")
    metric = metric or PRIMARY_METRIC[task_type]
    if metric not in METRICS_BY_TYPE[task_type]:
        raise SystemExit(f"metric {metric!r} is not a {task_type} metric: {METRICS_BY_TYPE[task_type]}")
    models = list(predictions)
    if len(models) < 2:
        raise SystemExit(f"need at least two models to compare, got {models}")
    n_classes = len(classes) if classes and task_type != "regression" else None
    lower = metric in LOWER_IS_BETTER
    pairs, values, n = [], {}, None
    for a, b in itertools.combinations(models, 2):
        _, y, pa, pb = align_predictions(predictions[a], predictions[b], task_type, n_classes)
        res = compare_predictions(y, pa, pb, task_type, metric, n_boot=n_boot, seed=seed, alpha=alpha)
        n = res["n"]
        values.setdefault(a, res["value_a"])
        values.setdefault(b, res["value_b"])
        pairs.append({"a": a, "b": b, **{k: res.get(k) for k in _PAIR_KEYS}})
    best = pick_best({m: values.get(m) for m in models}, lower)
    best_vs_rest = []
    if best is not None:
        for pair in pairs:
            if pair["a"] == best:
                best_vs_rest.append(pair)
            elif pair["b"] == best:
                best_vs_rest.append(flip(pair))
    return json_safe({
        "task_type": task_type,
        "metric": metric,
        "lower_is_better": lower,
        "method": pairs[0]["method"],
        "alpha": alpha,
        "n": n,
        "n_boot": int(n_boot),
        "boot_seed": int(seed),
        "models": models,
        "predictions": {m: str(p) for m, p in predictions.items()},
        "values": {m: values.get(m) for m in models},
        "best": best,
        "pairs": pairs,
        "best_vs_rest": best_vs_rest,
    })


def run(settings: CompareSettings, predictions: list, out, metric: str | None = None) -> dict:
    """One compare job: ``predictions`` of ``settings.models`` (same order) -> ``out`` (JSON with the settings)."""
    if len(predictions) != len(settings.models):
        raise SystemExit(f"{len(predictions)} predictions files for the {len(settings.models)} models "
                         f"{list(settings.models)} of compare {settings.task}/{settings.protocol}")
    res = compare_models(dict(zip(settings.models, map(str, predictions))), settings.task_type,
                         list(settings.classes) or None, metric, n_boot=settings.evaluate.n_boot,
                         seed=settings.evaluate.seed)
    meta = {"task": settings.task, "protocol": settings.protocol, "fraction": settings.fraction,
            "seed": settings.seed}
    write_json({**meta, **res, "settings": settings.to_dict()}, out)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m retflow.report.pairwise", description=__doc__.splitlines()[0])
    ap.add_argument("--settings", required=True, help="the job's settings, JSON (retflow.settings.report.compare)")
    ap.add_argument("--predictions", nargs="+", required=True, help="predictions parquet per model, in the "
                                                                     "settings' model order")
    ap.add_argument("--metric", default=None, help="metric to compare (default: the task type's primary metric)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    res = run(CompareSettings.from_json(args.settings), args.predictions, args.out, args.metric)
    rest = "; ".join(f"vs {p['b']}: diff {p['difference']}, p {p['p_value']}" for p in res["best_vs_rest"])
    print(f"{args.out}: {res['metric']} best {res['best']} ({rest})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
