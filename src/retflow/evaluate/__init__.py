"""Evaluation: metrics, bootstrap confidence intervals, paired comparisons and the metrics.json writer."""

from .bootstrap import bootstrap_all, bootstrap_ci
from .metrics import (
    LOWER_IS_BETTER,
    METRICS_BY_TYPE,
    PRIMARY_METRIC,
    TASK_TYPES,
    compute_metrics,
    confusion,
    per_class_metrics,
    roc_curves,
)
from .retfound_metrics import retfound_current, retfound_v1

__all__ = [
    "LOWER_IS_BETTER",
    "METRICS_BY_TYPE",
    "PRIMARY_METRIC",
    "TASK_TYPES",
    "bootstrap_all",
    "bootstrap_ci",
    "compute_metrics",
    "confusion",
    "per_class_metrics",
    "retfound_current",
    "retfound_v1",
    "roc_curves",
]
