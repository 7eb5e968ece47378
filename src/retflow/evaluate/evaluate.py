"""Turn a predictions parquet into metrics.json (metrics with bootstrap CIs, per class, confusion, ROC).

Command line (``workflow_scripts/evaluate.py`` is the same; the settings are
:func:`retflow.settings.report.evaluation` of the config: the run, its eval set's label scheme, the
``evaluate`` bootstrap, recorded in the JSON under ``settings``)::

    python -m retflow.evaluate.evaluate --settings '<EvaluationSettings JSON>' --predictions P --out O

Predictions parquet formats (one row per test image):

* binary / multiclass / ordinal: ``image_id``, ``y_true`` (class index), ``prob_0..prob_{K-1}``
  (softmax, rows sum to 1), ``y_pred`` (ignored: the arg-max of the probabilities is used);
* multilabel: ``image_id``, ``y_true_0..y_true_{K-1}`` (0/1 per sign), ``prob_0..prob_{K-1}``
  (sigmoid per sign, in [0, 1]);
* regression: ``image_id``, ``y_true`` and ``y_pred`` (floats); ``--classes`` may be left out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from ..atomic import json_safe, write_json
from .bootstrap import bootstrap_all
from .metrics import (
    CLASSIFICATION_TYPES,
    ECE_BINS,
    LOWER_IS_BETTER,
    METRICS_BY_TYPE,
    PRIMARY_METRIC,
    RANKING_CONVENTION,
    TASK_TYPES,
    absent_classes,
    confusion,
    roc_curves,
)
from .multilabel_metrics import predict_labels
from .retfound_metrics import CONVENTIONS as RETFOUND_CONVENTIONS
from .retfound_metrics import retfound_current, retfound_v1
from ..settings.load import ConfigError
from ..settings.report import EvaluationSettings

META_FIELDS = ("task", "task_type", "protocol", "model", "fraction", "seed", "eval_set", "classes")
PROB_SUM_TOLERANCE = 1e-2


def _read_frame(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise SystemExit(f"predictions file not found: {path}")
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise SystemExit(f"cannot read predictions parquet {path}: {exc}") from None
    return df


def _require(df: pd.DataFrame, path: Path, columns: list[str], expected: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise SystemExit(
            f"predictions file {path} is missing columns {missing} (expected {expected}; has {list(df.columns)})"
        )
    if len(df) == 0:
        raise SystemExit(f"predictions file {path} has no rows")


def _finite(values: np.ndarray, path: Path, what: str) -> np.ndarray:
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).reshape(len(values), -1).any(axis=1).sum())
        raise SystemExit(f"predictions file {path} has {bad} rows with NaN/inf {what}")
    return values


def _count_prob_columns(df: pd.DataFrame) -> int:
    return sum(1 for c in df.columns if str(c).startswith("prob_"))


def read_predictions(pred_path, task_type: str, n_classes: int | None = None):
    """Read and validate a predictions parquet of ``task_type``: ``(image_ids, y_true, probs)``.

    ``probs`` are the (n, K) probabilities, or the (n,) predictions of a regression task. Raises
    ``SystemExit`` with a message naming the file when it is missing, unreadable, empty, lacks a
    column of its format (module docstring), or holds invalid values.
    """
    if task_type not in TASK_TYPES:
        raise SystemExit(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
    path = Path(pred_path)
    df = _read_frame(path)
    if task_type == "regression":
        _require(df, path, ["image_id", "y_true", "y_pred"], "image_id, y_true, y_pred")
        y_true = _finite(df["y_true"].to_numpy(dtype=np.float64), path, "y_true")
        y_pred = _finite(df["y_pred"].to_numpy(dtype=np.float64), path, "y_pred")
        return df["image_id"].to_numpy(), y_true, y_pred
    if n_classes is None:
        n_classes = _count_prob_columns(df)
    prob_cols = [f"prob_{i}" for i in range(n_classes)]
    if task_type == "multilabel":
        true_cols = [f"y_true_{i}" for i in range(n_classes)]
        _require(df, path, ["image_id", *true_cols, *prob_cols] if n_classes else ["image_id", "prob_0"],
                 "image_id, y_true_0..y_true_{K-1}, prob_0..prob_{K-1}")
        probs = _finite(df[prob_cols].to_numpy(dtype=np.float64), path, "probabilities")
        if (probs < 0).any() or (probs > 1).any():
            raise SystemExit(f"predictions file {path}: multilabel probabilities must lie in [0, 1] (sigmoid)")
        y = df[true_cols]
        if y.isna().any().any() or not np.isin(y.to_numpy(), (0, 1)).all():
            raise SystemExit(f"predictions file {path}: y_true_* must be 0/1 without missing values")
        return df["image_id"].to_numpy(), y.to_numpy().astype(np.int64), probs
    if n_classes < 2 or any(c not in df.columns for c in ["image_id", "y_true", *prob_cols]):
        missing = [c for c in ["image_id", "y_true", *prob_cols] if c not in df.columns]
        raise SystemExit(
            f"predictions file {path} is missing columns {missing or prob_cols} "
            f"(expected image_id, y_true, prob_0..prob_{max(n_classes, 2) - 1}, y_pred; has {list(df.columns)})"
        )
    if len(df) == 0:
        raise SystemExit(f"predictions file {path} has no rows")
    probs = _finite(df[prob_cols].to_numpy(dtype=np.float64), path, "probabilities")
    sums = probs.sum(axis=1)
    if (probs < 0).any() or np.abs(sums - 1).max() > PROB_SUM_TOLERANCE:
        raise SystemExit(
            f"predictions file {path}: probabilities must be non-negative and sum to 1 per row "
            f"(row sums range {sums.min():.4g}..{sums.max():.4g}; logits written instead of softmax?)"
        )
    y = df["y_true"]
    if y.isna().any():
        raise SystemExit(f"predictions file {path} has missing y_true values")
    y_true = y.to_numpy().astype(np.int64)
    if y_true.min() < 0 or y_true.max() >= n_classes:
        raise SystemExit(
            f"predictions file {path}: y_true outside [0, {n_classes}) (range {y_true.min()}..{y_true.max()})"
        )
    return df["image_id"].to_numpy(), y_true, probs


def load_predictions(pred_path, n_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate a classification predictions parquet; returns ``(y_true, probs)``.

    Raises ``SystemExit`` with a message naming the file when it is missing, unreadable, empty,
    lacks ``image_id``/``y_true``/``prob_0..prob_{K-1}``, has NaN probabilities, rows that do not
    sum to 1, or labels outside ``[0, K)``.
    """
    _, y_true, probs = read_predictions(pred_path, "multiclass", n_classes)
    return y_true, probs


def _per_class_by_name(per_class: dict[str, list], classes: list[str], counts: list[int]) -> dict:
    """``{metric: [ci per class]}`` -> ``{class name: {"n_positive": ..., metric: ci, ...}}``."""
    out = {}
    for c, name in enumerate(classes):
        entry: dict = {"n_positive": int(counts[c])}
        entry.update({metric: values[c] for metric, values in per_class.items()})
        out[name] = entry
    return out


def evaluate_predictions(pred_path, task_meta: dict, out_path, *, n_boot: int, seed: int,
                         settings: dict | None = None) -> dict:
    """Evaluate one predictions parquet and write ``out_path`` (metrics.json); returns the dict.

    ``task_meta`` supplies task, task_type, protocol, model, fraction, seed, eval_set and classes;
    ``n_boot`` bootstrap replicates seeded ``seed`` give the CIs; ``settings`` (what the job ran with)
    is recorded as is. They are merged into the output next to:

    * ``n``, ``primary_metric``, ``lower_is_better`` (the metrics of this task type where lower
      is better), ``n_boot``;
    * ``metrics``: ``{metric: {"value", "ci_low", "ci_high"}}`` (seeded percentile bootstrap);
    * classification and multilabel: ``class_counts`` (cases per class / positives per sign),
      ``per_class`` (``{class: {"n_positive", metric: {"value", "ci_low", "ci_high"}}}``, e.g.
      per-class one-vs-rest AUROC/AUPR), ``absent_classes`` (classes without positive cases:
      left out of the macro ranking metrics), ``conventions`` (in words, how the macro AUROC/AUPR
      and the RETFound definitions treat absent classes) and ``roc`` curves;
    * binary / multiclass / ordinal: ``ece_bins``, ``confusion_matrix``, and the two RETFound
      metric definitions ``retfound_v1`` and ``retfound_current`` (point values, see
      :mod:`.retfound_metrics`);
    * multilabel: ``confusion_per_class`` (``{sign: [[tn, fp], [fn, tp]]}`` at threshold 0.5).

    Undefined values are written as JSON null. Predicted classes are the arg-max of the
    probabilities (a ``y_pred`` column is not trusted).
    """
    task_type = task_meta.get("task_type")
    if task_type not in TASK_TYPES:
        raise SystemExit(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
    classes = task_meta.get("classes")
    n_classes = len(classes) if classes and task_type != "regression" else None
    _, y_true, probs = read_predictions(pred_path, task_type, n_classes)
    result = {field: task_meta.get(field) for field in META_FIELDS}
    boot = bootstrap_all(y_true, probs, task_type, n_boot=n_boot, seed=seed)
    result.update(
        n=int(y_true.shape[0]),
        primary_metric=PRIMARY_METRIC[task_type],
        lower_is_better=[m for m in METRICS_BY_TYPE[task_type] if m in LOWER_IS_BETTER],
        n_boot=int(n_boot),
        metrics=boot["metrics"],
    )
    if task_type == "regression":
        result["classes"] = [str(c) for c in classes] if classes else []
        return _write(result, out_path, settings)
    k = probs.shape[1]
    classes = [str(c) for c in classes] if classes else [str(i) for i in range(k)]
    result["classes"] = classes
    if task_type == "multilabel":
        counts = y_true.sum(axis=0).astype(int).tolist()
        pred = predict_labels(probs)
        result["confusion_per_class"] = {
            name: confusion(y_true[:, j], pred[:, j], 2) for j, name in enumerate(classes)
        }
    else:
        counts = np.bincount(y_true, minlength=k).astype(int).tolist()
    conventions = {"auroc_aupr": RANKING_CONVENTION[task_type]}
    if task_type in CLASSIFICATION_TYPES:
        conventions.update(RETFOUND_CONVENTIONS)
    result.update(
        class_counts=counts,
        absent_classes=[classes[c] for c in absent_classes(y_true, probs, task_type)],
        per_class=_per_class_by_name(boot["per_class"], classes, counts),
        conventions=conventions,
    )
    if task_type in CLASSIFICATION_TYPES:
        result.update(
            ece_bins=ECE_BINS,
            confusion_matrix=confusion(y_true, probs.argmax(axis=1), k),
            retfound_v1=retfound_v1(y_true, probs, task_type),
            retfound_current=retfound_current(y_true, probs, task_type),
        )
    result["roc"] = roc_curves(y_true, probs, classes)
    return _write(result, out_path, settings)


def _write(result: dict, out_path, settings: dict | None) -> dict:
    if settings is not None:
        result["settings"] = settings
    result = json_safe(result)
    write_json(result, out_path)  # temp file + os.replace
    return result


def run(settings: EvaluationSettings, pred_path, out_path) -> dict:
    """One evaluate job: ``pred_path`` scored as ``settings`` say -> ``out_path`` (metrics.json with the settings)."""
    meta = {"task": settings.task, "task_type": settings.task_type, "protocol": settings.protocol,
            "model": settings.model, "fraction": settings.fraction, "seed": settings.seed,
            "eval_set": settings.eval_set, "classes": list(settings.classes) or None}
    return evaluate_predictions(pred_path, meta, out_path, n_boot=settings.evaluate.n_boot,
                                seed=settings.evaluate.seed, settings=settings.to_dict())


def main(argv=None) -> int:
    """CLI entry point; returns 0 on success (errors exit with a message)."""
    ap = argparse.ArgumentParser(prog="python -m retflow.evaluate.evaluate", description=__doc__.splitlines()[0])
    ap.add_argument("--settings", required=True, help="the job's settings, JSON (retflow.settings.report.evaluation)")
    ap.add_argument("--predictions", required=True, help="predictions.parquet")
    ap.add_argument("--out", required=True, help="metrics.json to write")
    args = ap.parse_args(argv)
    settings = EvaluationSettings.from_json(args.settings)
    if settings.task_type not in TASK_TYPES:
        raise ConfigError(f"--settings: task_type must be one of {TASK_TYPES}, got {settings.task_type!r}")
    if settings.task_type != "regression" and not settings.classes:
        raise ConfigError(f"--settings: classes are required for task type {settings.task_type}")
    res = run(settings, args.predictions, args.out)
    primary = res["primary_metric"]
    m = res["metrics"][primary]
    print(f"{args.out}: n={res['n']} {primary}={m['value']} [{m['ci_low']}, {m['ci_high']}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
