"""Turn a predictions parquet into metrics.json (metrics with bootstrap CIs, confusion, ROC).

Command line::

    python -m retflow.evaluate.evaluate --predictions P --out O --task T --task-type ordinal \\
        --protocol finetune --model mae --fraction 0.1 --seed 0 --eval-set internal \\
        --classes 0 1 2 3 4 [--n-boot 1000] [--boot-seed 0]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from ..atomic import write_json
from .bootstrap import bootstrap_ci
from .metrics import PRIMARY_METRIC, TASK_TYPES, confusion, roc_curves

META_FIELDS = ("task", "task_type", "protocol", "model", "fraction", "seed", "eval_set", "classes")
PROB_SUM_TOLERANCE = 1e-2


def load_predictions(pred_path, n_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate a predictions parquet; returns ``(y_true, probs)``.

    Raises ``SystemExit`` with a message naming the file when it is missing, unreadable, empty,
    lacks ``image_id``/``y_true``/``prob_0..prob_{K-1}``, has NaN probabilities, rows that do not
    sum to 1, or labels outside ``[0, K)``.
    """
    path = Path(pred_path)
    if not path.is_file():
        raise SystemExit(f"predictions file not found: {path}")
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise SystemExit(f"cannot read predictions parquet {path}: {exc}") from None
    if n_classes is None:
        n_classes = sum(1 for c in df.columns if str(c).startswith("prob_"))
    prob_cols = [f"prob_{i}" for i in range(n_classes)]
    missing = [c for c in ["image_id", "y_true", *prob_cols] if c not in df.columns]
    if missing or n_classes < 2:
        raise SystemExit(
            f"predictions file {path} is missing columns {missing or prob_cols} "
            f"(expected image_id, y_true, prob_0..prob_{max(n_classes, 2) - 1}, y_pred; has {list(df.columns)})"
        )
    if len(df) == 0:
        raise SystemExit(f"predictions file {path} has no rows")
    probs = df[prob_cols].to_numpy(dtype=np.float64)
    if not np.isfinite(probs).all():
        bad = int((~np.isfinite(probs)).any(axis=1).sum())
        raise SystemExit(f"predictions file {path} has {bad} rows with NaN/inf probabilities")
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
    return y_true, probs


def _nan_to_none(obj):
    """Replace NaN/inf floats by None so the JSON is strictly valid (null)."""
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def evaluate_predictions(pred_path, task_meta: dict, out_path, n_boot: int = 1000, seed: int = 0) -> dict:
    """Evaluate one predictions parquet and write ``out_path`` (metrics.json); returns the dict.

    ``task_meta`` supplies task, task_type, protocol, model, fraction, seed, eval_set and classes;
    they are merged into the output next to ``n``, ``class_counts``, ``metrics`` (value/ci_low/ci_high
    per metric), ``confusion_matrix`` and ``roc``. Undefined values are written as JSON null.
    Predicted classes are the arg-max of the probabilities (a ``y_pred`` column is not trusted).
    """
    task_type = task_meta.get("task_type")
    if task_type not in TASK_TYPES:
        raise SystemExit(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
    classes = task_meta.get("classes")
    y_true, probs = load_predictions(pred_path, len(classes) if classes else None)
    k = probs.shape[1]
    classes = [str(c) for c in classes] if classes else [str(i) for i in range(k)]
    result = {field: task_meta.get(field) for field in META_FIELDS}
    result["classes"] = classes
    result.update(
        n=int(y_true.size),
        class_counts=np.bincount(y_true, minlength=k).astype(int).tolist(),
        primary_metric=PRIMARY_METRIC[task_type],
        n_boot=int(n_boot),
        metrics=bootstrap_ci(y_true, probs, task_type, n_boot=n_boot, seed=seed),
        confusion_matrix=confusion(y_true, probs.argmax(axis=1), k),
        roc=roc_curves(y_true, probs, classes),
    )
    result = _nan_to_none(result)
    write_json(result, out_path)  # temp file + os.replace
    return result


def _parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m retflow.evaluate.evaluate", description=__doc__.splitlines()[0])
    ap.add_argument("--predictions", required=True, help="predictions.parquet")
    ap.add_argument("--out", required=True, help="metrics.json to write")
    ap.add_argument("--task", required=True)
    ap.add_argument("--task-type", required=True, choices=TASK_TYPES)
    ap.add_argument("--protocol", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--fraction", required=True, type=float)
    ap.add_argument("--seed", required=True, type=int, help="training seed (recorded in the JSON)")
    ap.add_argument("--eval-set", default="internal")
    ap.add_argument("--classes", nargs="+", required=True)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--boot-seed", type=int, default=0, help="seed of the bootstrap resampling")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    """CLI entry point; returns 0 on success (errors exit with a message)."""
    args = _parse_args(argv)
    meta = {
        "task": args.task,
        "task_type": args.task_type,
        "protocol": args.protocol,
        "model": args.model,
        "fraction": args.fraction,
        "seed": args.seed,
        "eval_set": args.eval_set,
        "classes": args.classes,
    }
    res = evaluate_predictions(args.predictions, meta, args.out, n_boot=args.n_boot, seed=args.boot_seed)
    primary = res["primary_metric"]
    m = res["metrics"][primary]
    print(f"{args.out}: n={res['n']} {primary}={m['value']} [{m['ci_low']}, {m['ci_high']}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
