"""Evaluation: metrics, bootstrap confidence intervals and the metrics.json writer."""

from .bootstrap import bootstrap_ci
from .metrics import METRICS_BY_TYPE, PRIMARY_METRIC, compute_metrics, confusion, roc_curves

__all__ = ["METRICS_BY_TYPE", "PRIMARY_METRIC", "bootstrap_ci", "compute_metrics", "confusion", "roc_curves"]
