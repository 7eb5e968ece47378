"""Number formatting of the report (plain text; the templates escape it): values, intervals,
p-values, label fractions, durations, and the display names of metrics.

Metric names: a metric is shown by :func:`metric_label` everywhere on the page (tables, headline,
captions); ``mae`` -- the regression metric *mean absolute error* -- is shown as ``abs. error`` so
it cannot be read as the model ``mae`` (MAE-pretrained), whose name is shown as configured.
"""

from __future__ import annotations

import math

import numpy as np

ALPHA = 0.05
#: metric key -> the name the report shows (keys not listed are shown as they are)
METRIC_LABELS = {"mae": "abs. error", "rmse": "RMSE", "r2": "R²"}


def metric_label(key) -> str:
    return METRIC_LABELS.get(str(key), str(key)) if key is not None else ""


def missing(v) -> bool:
    return v is None or (isinstance(v, (float, np.floating)) and math.isnan(v))


def value(v) -> str:
    """``0.804``; ``12.35``; ``123.4``; ``n/a`` for a missing value."""
    if missing(v):
        return "n/a"
    a = abs(v)
    return f"{v:.1f}" if a >= 100 else f"{v:.2f}" if a >= 10 else f"{v:.3f}"


def signed(v) -> str:
    """A difference with its sign: ``+0.388``, ``−0.012``."""
    if missing(v):
        return "n/a"
    text = value(abs(v))
    return ("−" if v < 0 else "+") + text


def interval(lo, hi, fmt=value) -> str:
    """``[0.692, 0.904]``; empty where either end is missing."""
    return "" if missing(lo) or missing(hi) else f"[{fmt(lo)}, {fmt(hi)}]"


def with_ci(v, lo, hi, fmt=value) -> str:
    """``0.804 [0.692, 0.904]`` (``0.804`` without an interval)."""
    ci = interval(lo, hi, fmt)
    return f"{fmt(v)} {ci}" if ci else fmt(v)


def p_value(p) -> str:
    """``0.032*``, ``<0.001*``, ``0.41`` style: three decimals, * below :data:`ALPHA`."""
    if missing(p):
        return "n/a"
    text = "<0.001" if p < 0.001 else f"{p:.3f}"
    return text + ("*" if p < ALPHA else "")


def p_plain(p) -> str:
    """``p=0.032`` / ``p<0.001`` (no star)."""
    if missing(p):
        return "p n/a"
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def frac(v) -> str:
    try:
        return format(float(v), "g")
    except (TypeError, ValueError):
        return str(v)


def percent(v) -> str:
    try:
        return f"{float(v):.0%}"
    except (TypeError, ValueError):
        return str(v)


def number(v) -> str:
    """A table cell's number: integers as they are, floats to 4 significant digits."""
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(int(v))
    return format(float(v), ".4g")


def hms(seconds) -> str:
    if missing(seconds):
        return ""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def epoch(v) -> str:
    """A kept epoch (``–`` where the run did not record one)."""
    return "–" if missing(v) else str(int(v))
