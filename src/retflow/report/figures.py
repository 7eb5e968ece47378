"""Report figures, rendered off-screen with matplotlib's Agg canvas and returned as PNG bytes.

The functions build ``matplotlib.figure.Figure`` objects directly (no pyplot global state), so
they are safe to call from any process without a display.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 100
_GRID = np.linspace(0.0, 1.0, 201)


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def macro_roc(roc: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """One curve from a metrics.json ``roc`` dict: the single curve, or the macro average of several
    (per-class TPR interpolated onto a common FPR grid, then averaged)."""
    curves = [c for c in roc.values() if c.get("fpr") and c.get("tpr")]
    if not curves:
        return None
    if len(curves) == 1:
        return np.asarray(curves[0]["fpr"]), np.asarray(curves[0]["tpr"])
    tprs = [np.interp(_GRID, np.asarray(c["fpr"]), np.asarray(c["tpr"])) for c in curves]
    tpr = np.mean(tprs, axis=0)
    tpr[0] = 0.0
    return _GRID, tpr


def _run_label(d: dict) -> str:
    frac = d.get("fraction")
    frac_txt = f" {float(frac):.0%}" if isinstance(frac, (int, float)) else ""
    return f"{d.get('model', '?')} ({d.get('protocol', '?')}{frac_txt})"


def roc_figure(metrics_json_dicts: list[dict], title: str) -> bytes:
    """Overlay the ROC curves of several runs (metrics.json dicts) of one task and eval set.

    Binary tasks show the positive-class curve; multiclass/ordinal tasks show the macro-average
    one-vs-rest curve. The legend gives each run's AUROC with its 95 % CI.
    """
    fig = Figure(figsize=(5.2, 4.6))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="0.6", label="chance")
    multi = False
    for i, d in enumerate(metrics_json_dicts):
        roc = d.get("roc") or {}
        curve = macro_roc(roc)
        if curve is None:
            continue
        multi = multi or len(roc) > 1
        auc = (d.get("metrics") or {}).get("auroc") or {}
        label = (
            f"{_run_label(d)}: AUROC {_fmt(auc.get('value'))} [{_fmt(auc.get('ci_low'))}, {_fmt(auc.get('ci_high'))}]"
        )
        ax.plot(*curve, lw=1.8, color=f"C{i % 10}", label=label)
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.01),
        xlabel="False positive rate (1 - specificity)",
        ylabel="True positive rate (sensitivity)",
    )
    ax.set_aspect("equal")
    ax.set_title(title + ("\n(macro-average one-vs-rest ROC)" if multi else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7.5, framealpha=0.9)
    return _png(fig)


def confusion_figure(cm, classes, title: str) -> bytes:
    """Confusion matrix: counts annotated, cells coloured by row-normalised rate (recall)."""
    cm = np.asarray(cm, dtype=float)
    k = cm.shape[0]
    rows = cm.sum(axis=1, keepdims=True)
    rate = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    size = 2.4 + 0.55 * k
    fig = Figure(figsize=(size + 0.8, size))
    ax = fig.add_subplot()
    im = ax.imshow(rate, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="row fraction")
    labels = [str(c) for c in classes]
    ax.set_xticks(
        range(k),
        labels,
        rotation=45 if max(map(len, labels)) > 3 else 0,
        ha="right" if max(map(len, labels)) > 3 else "center",
    )
    ax.set_yticks(range(k), labels)
    ax.set(xlabel="Predicted class", ylabel="True class")
    fontsize = 9 if k <= 5 else 7
    for i in range(k):
        for j in range(k):
            colour = "white" if rate[i, j] > 0.55 else "black"
            ax.text(
                j, i, f"{int(cm[i, j])}\n{rate[i, j]:.0%}", ha="center", va="center", color=colour, fontsize=fontsize
            )
    ax.set_title(title, fontsize=10)
    return _png(fig)


def seed_summary(df: pd.DataFrame, metric: str, keys: list[str]) -> pd.DataFrame:
    """Mean over seeds of ``metric`` and its CI bounds, with the seed SD and count, per ``keys``."""
    lo, hi = f"{metric}_lo", f"{metric}_hi"
    work = df.assign(**{c: df[c] if c in df else np.nan for c in (metric, lo, hi)})
    grouped = work.groupby(keys, dropna=False, sort=True)
    out = grouped.agg(
        value=(metric, "mean"), lo=(lo, "mean"), hi=(hi, "mean"), sd=(metric, "std"), n_seeds=(metric, "count")
    )
    return out.reset_index()


def label_efficiency_figure(df: pd.DataFrame, task: str, metric: str, eval_sets: list[str] | None = None) -> bytes:
    """Metric vs label fraction (log x) for one task; one line per model/protocol, one panel per eval set.

    Lines are means over seeds; the shaded band is the mean bootstrap 95 % CI; error bars (when
    there are several seeds) are +/- one standard deviation across seeds.
    """
    sub = df[df["task"] == task] if "task" in df else df.iloc[0:0]
    if eval_sets is None:
        found = sorted(sub["eval_set"].dropna().unique()) if len(sub) else []
        eval_sets = (["internal"] if "internal" in found else []) + [e for e in found if e != "internal"]
    eval_sets = eval_sets or ["internal"]
    fig = Figure(figsize=(max(5.6, 4.6 * len(eval_sets) + 0.6), 4.2), layout="constrained")
    axes = fig.subplots(1, len(eval_sets), sharey=True, squeeze=False)[0]
    runs = sorted(sub[["protocol", "model"]].drop_duplicates().itertuples(index=False, name=None)) if len(sub) else []
    fractions = sorted(sub["fraction"].dropna().unique()) if len(sub) else []
    for ax, eval_set in zip(axes, eval_sets):
        part = sub[sub["eval_set"] == eval_set] if len(sub) else sub
        summary = seed_summary(part, metric, ["protocol", "model", "fraction"]) if len(part) else None
        for i, (protocol, model) in enumerate(runs):
            if summary is None:
                break
            s = summary[(summary["protocol"] == protocol) & (summary["model"] == model)].sort_values("fraction")
            if s.empty:
                continue
            colour = f"C{i % 10}"
            ax.plot(s["fraction"], s["value"], marker="o", color=colour, label=f"{model} ({protocol})")
            ax.fill_between(s["fraction"], s["lo"], s["hi"], color=colour, alpha=0.15, lw=0)
            if (s["n_seeds"] > 1).any():
                ax.errorbar(s["fraction"], s["value"], yerr=s["sd"].fillna(0), fmt="none", ecolor=colour, capsize=3)
        ax.set_xscale("log")
        if fractions:
            ax.set_xticks(fractions, [f"{f:.0%}" if f >= 0.01 else f"{f:.1%}" for f in fractions])
            ax.minorticks_off()
        ax.set(xlabel="Fraction of training labels", title=f"{eval_set}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric)
    if runs:
        axes[-1].legend(fontsize=8, loc="best")
    fig.suptitle(
        f"{task}: label efficiency ({metric})\nline = mean over seeds, band = 95% bootstrap CI, bars = SD over seeds",
        fontsize=9.5,
    )
    return _png(fig)


def pretrain_loss_figure(log_csv_paths) -> bytes:
    """Pretraining loss per epoch for each ``log.csv`` (list of paths, or dict label -> path).

    A list is labelled ``{method}/{modality}`` from the ``results/pretrain/{method}/{modality}/`` layout.
    """
    items = (
        log_csv_paths.items()
        if isinstance(log_csv_paths, dict)
        else ((f"{Path(p).parent.parent.name}/{Path(p).parent.name}", p) for p in log_csv_paths)
    )
    fig = Figure(figsize=(5.6, 3.8))
    ax = fig.add_subplot()
    plotted = 0
    for label, path in items:
        try:
            log = pd.read_csv(path)
        except (OSError, ValueError):
            continue
        if "loss" not in log or log.empty:
            continue
        x = log["epoch"] if "epoch" in log else np.arange(len(log))
        ax.plot(x, log["loss"], marker="." if len(log) < 60 else None, label=str(label))
        plotted += 1
    ax.set(xlabel="Epoch", ylabel="Loss (masked patches)", title="MAE pretraining loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if plotted:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no pretraining logs", ha="center", va="center", transform=ax.transAxes)
    return _png(fig)
