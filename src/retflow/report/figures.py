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


def seed_summary(df: pd.DataFrame, metric: str, keys: list[str], alpha: float = 0.05) -> pd.DataFrame:
    """Per ``keys``: mean of ``metric`` over seeds with a 95 % CI, the seed SD and count.

    With two or more seeds the CI is the t interval of the seed mean (``mean +- t_{n-1} sd /
    sqrt(n)``, ``ci = "seeds"``): it reflects training randomness (initialisation, label subset,
    augmentation) as well as the test set. With one seed it is that run's bootstrap CI
    (``ci = "bootstrap"``: test-set sampling only).
    """
    from scipy import stats

    lo, hi = f"{metric}_lo", f"{metric}_hi"
    work = df.assign(**{c: df[c] if c in df else np.nan for c in (metric, lo, hi)})
    grouped = work.groupby(keys, dropna=False, sort=True)
    out = grouped.agg(
        value=(metric, "mean"), boot_lo=(lo, "mean"), boot_hi=(hi, "mean"), sd=(metric, "std"),
        n_seeds=(metric, "count"),
    ).reset_index()
    n = out["n_seeds"].to_numpy(dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(n >= 2, stats.t.ppf(1 - alpha / 2, np.maximum(n - 1, 1)), np.nan)
        half = t * out["sd"].to_numpy(dtype=float) / np.sqrt(n)
    several = n >= 2
    out["lo"] = np.where(several, out["value"] - half, out["boot_lo"])
    out["hi"] = np.where(several, out["value"] + half, out["boot_hi"])
    out["half"] = np.where(several, half, np.nan)
    out["ci"] = np.where(several, "seeds", "bootstrap")
    return out


UNIT_METRICS = frozenset({"accuracy", "balanced_accuracy", "auroc", "aupr", "f1", "precision", "sensitivity",
                          "specificity", "ece", "subset_accuracy", "hamming_accuracy", "dice", "iou"})
SIGNED_METRICS = frozenset({"kappa", "qwk", "mcc", "pearson", "spearman"})
LINESTYLES = ["-", "--", ":", "-."]


def metric_range(metric: str) -> tuple[float, float] | None:
    """Range a metric can take (for clipping axes), None when unbounded."""
    if metric in UNIT_METRICS:
        return 0.0, 1.0
    if metric in SIGNED_METRICS:
        return -1.0, 1.0
    return None


def clip_axis(ax, values, lows, highs, metric: str) -> None:
    """y limits covering the values and intervals, but not beyond the metric's possible range."""
    vals = np.asarray([v for v in (*values, *lows, *highs) if v is not None and np.isfinite(v)], dtype=float)
    if not vals.size:
        return
    lo, hi = float(vals.min()), float(vals.max())
    pad = max(hi - lo, 0.02) * 0.05
    lo, hi = lo - pad, hi + pad
    rng = metric_range(metric)
    if rng is not None:
        lo, hi = max(lo, rng[0] - 0.01), min(hi, rng[1] + 0.01)
    if hi > lo:
        ax.set_ylim(lo, hi)


def label_efficiency_figure(df: pd.DataFrame, task: str, metric: str, eval_sets: list[str] | None = None,
                            models: list[str] | None = None, protocols: list[str] | None = None) -> bytes:
    """Metric vs label fraction (log x) for one task: one panel per protocol (and eval set), one line
    per model (same colour in every panel).

    Lines are means over seeds; the band and error bars are the 95 % CI of :func:`seed_summary`
    (t interval across seeds, or the bootstrap CI with one seed), cut at the metric's range.
    """
    sub = df[df["task"] == task] if "task" in df else df.iloc[0:0]
    if eval_sets is None:
        found = sorted(sub["eval_set"].dropna().unique()) if len(sub) else []
        eval_sets = (["internal"] if "internal" in found else []) + [e for e in found if e != "internal"]
    eval_sets = eval_sets or ["internal"]
    found_p = list(dict.fromkeys(sub["protocol"].dropna())) if len(sub) else []
    protocols = [p for p in (protocols or []) if p in found_p] + [p for p in found_p if p not in (protocols or [])]
    found_m = list(dict.fromkeys(sub["model"].dropna())) if len(sub) else []
    models = [m for m in (models or []) if m in found_m] + [m for m in found_m if m not in (models or [])]
    panels = [(p, e) for e in eval_sets for p in (protocols or ["?"])]
    ncols = min(len(panels), 4)
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(max(5.2, 3.6 * ncols + 0.6), 3.3 * nrows + 0.8), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    fractions = sorted(sub["fraction"].dropna().unique()) if len(sub) else []
    several_seeds = False
    values, lows, highs = [], [], []
    for ax, (protocol, eval_set) in zip(axes, panels):
        part = sub[(sub["eval_set"] == eval_set) & (sub["protocol"] == protocol)] if len(sub) else sub
        summary = seed_summary(part, metric, ["model", "fraction"]) if len(part) else None
        for i, model in enumerate(models):
            if summary is None:
                break
            s = summary[summary["model"] == model].sort_values("fraction")
            s = s[s["value"].notna()]
            if s.empty:
                continue
            colour = f"C{i % 10}"
            ax.plot(s["fraction"], s["value"], marker="o", color=colour, label=model)
            if len(s) > 1:
                ax.fill_between(s["fraction"], s["lo"], s["hi"], color=colour, alpha=0.12, lw=0)
            yerr = np.vstack([(s["value"] - s["lo"]).clip(lower=0), (s["hi"] - s["value"]).clip(lower=0)])
            ax.errorbar(s["fraction"], s["value"], yerr=np.nan_to_num(yerr), fmt="none", ecolor=colour, capsize=3,
                        alpha=0.8)
            several_seeds = several_seeds or bool((s["n_seeds"] > 1).any())
            values += list(s["value"])
            lows += list(s["lo"])
            highs += list(s["hi"])
        ax.set_xscale("log")
        if fractions:
            ax.set_xticks(fractions, [f"{f:.0%}" if f >= 0.01 else f"{f:.1%}" for f in fractions])
            ax.minorticks_off()
        title = protocol if len(eval_sets) == 1 else f"{protocol}, {eval_set}"
        ax.set(xlabel="Fraction of training labels", title=title)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax in axes[::ncols]:
        ax.set_ylabel(metric)
    clip_axis(axes[0], values, lows, highs, metric)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
            break
    ci = "95% CI across seeds (t)" if several_seeds else "95% bootstrap CI"
    fig.suptitle(f"{task}: label efficiency ({metric}); line = mean over seeds, bars/band = {ci}", fontsize=9.5)
    return _png(fig)


# ---------------------------------------------------------------- curves from predictions
def read_curve_inputs(pred_path, task_type: str, n_classes: int | None):
    """(y_true, probs) of a predictions parquet for curves, or None when it is missing/unreadable."""
    from ..evaluate.evaluate import read_predictions

    if not isinstance(pred_path, (str, Path)) or task_type in (None, "regression", "segmentation"):
        return None
    if not Path(pred_path).is_file():
        return None
    try:
        _, y, p = read_predictions(pred_path, task_type, n_classes)
    except (SystemExit, Exception):  # noqa: BLE001 - a bad file must not stop the report
        return None
    return y, p


def _one_vs_rest(y: np.ndarray, p: np.ndarray, task_type: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(binary labels, scores) of every problem: class 1 (binary), each sign (multilabel), each class."""
    if task_type == "multilabel":
        return [(y[:, j], p[:, j]) for j in range(p.shape[1])]
    if p.shape[1] == 2:
        return [(y == 1, p[:, 1])]
    return [(y == c, p[:, c]) for c in range(p.shape[1])]


def macro_pr(y: np.ndarray, p: np.ndarray, task_type: str) -> tuple[np.ndarray, np.ndarray, float] | None:
    """Precision-recall curve (recall, precision, prevalence); several problems (multiclass
    one-vs-rest, multilabel signs) are macro-averaged on a recall grid with interpolated
    precision (the best precision at recall >= r). Problems without positives are skipped."""
    from sklearn.metrics import precision_recall_curve

    problems = [(t.astype(int), s) for t, s in _one_vs_rest(y, p, task_type) if 0 < t.sum() < t.size]
    if not problems:
        return None
    if len(problems) == 1:
        t, s = problems[0]
        precision, recall, _ = precision_recall_curve(t, s)
        return recall, precision, float(t.mean())
    curves = []
    for t, s in problems:
        precision, recall, _ = precision_recall_curve(t, s)
        # sklearn orders points by decreasing recall: the best precision at recall >= r is a running max
        interp = np.maximum.accumulate(precision)
        levels, inverse = np.unique(recall, return_inverse=True)
        best = np.full(levels.size, -np.inf)
        np.maximum.at(best, inverse, interp)  # one (the best) precision per recall level
        curves.append(np.interp(_GRID, levels, best))
    return _GRID, np.mean(curves, axis=0), float(np.mean([t.mean() for t, _ in problems]))


def roc_pr_figure(runs: list[dict], title: str, average: str = "macro one-vs-rest") -> bytes:
    """ROC (left, from metrics.json ``roc``) and precision-recall (right, from the predictions) curves.

    ``runs``: dicts with ``label``, ``metrics`` (the metrics.json dict) and optionally ``pr``
    (:func:`macro_pr` output), ``colour`` and ``style``. Several ROC curves per run (multiclass,
    multilabel) are averaged (``average`` names how, for the titles).
    """
    fig = Figure(figsize=(10.4, 4.9), layout="constrained")
    ax_roc, ax_pr = fig.subplots(1, 2)
    ax_roc.plot([0, 1], [0, 1], ls="--", lw=0.8, color="0.6")
    multi, handles = False, []
    prevalences = []
    for i, run in enumerate(runs):
        d = run.get("metrics") or {}
        colour, style = run.get("colour", f"C{i % 10}"), run.get("style", "-")
        m = d.get("metrics") or {}
        auc, ap = m.get("auroc") or {}, m.get("aupr") or {}
        label = f"{run['label']}: AUROC {_fmt(auc.get('value'))}, AUPR {_fmt(ap.get('value'))}"
        roc = d.get("roc") or {}
        curve = macro_roc(roc)
        line = None
        if curve is not None:
            multi = multi or len(roc) > 1
            (line,) = ax_roc.plot(*curve, lw=1.7, ls=style, color=colour, label=label)
        pr = run.get("pr")
        if pr is not None:
            recall, precision, prev = pr
            (pl,) = ax_pr.plot(recall, precision, lw=1.7, ls=style, color=colour, label=label,
                               drawstyle="steps-post" if len(recall) != len(_GRID) else "default")
            prevalences.append(prev)
            line = line or pl
        if line is not None:
            handles.append(line)
    if prevalences:
        ax_pr.axhline(float(np.mean(prevalences)), ls="--", lw=0.8, color="0.6")
    else:
        ax_pr.text(0.5, 0.5, "no predictions file", ha="center", va="center", transform=ax_pr.transAxes,
                   color="0.5")
    avg = f" ({average})" if multi else ""
    ax_roc.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate (1 - specificity)",
               ylabel="True positive rate (sensitivity)", title=f"ROC{avg}")
    ax_pr.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="Recall (sensitivity)", ylabel="Precision (PPV)",
              title=f"Precision-recall{avg}; dashed = prevalence")
    for ax in (ax_roc, ax_pr):
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=2 if len(handles) > 3 else 1, fontsize=7.5,
                   frameon=False)
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def reliability_figure(runs: list[dict], n_bins: int, title: str) -> bytes:
    """Reliability diagram (top) and confidence histogram (bottom) of top-1 predictions.

    ``runs``: dicts with ``label``, ``y`` (labels), ``probs`` (n, K) and ``ece`` (value, lo, hi);
    bins are ECE's ``n_bins`` equal-width confidence bins.
    """
    from ..evaluate.metrics import ece_bin_index

    fig = Figure(figsize=(5.6, 6.2 + 0.17 * len(runs)), layout="constrained")
    ax, ax_h = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="0.6", label="perfect calibration")
    edges = np.linspace(0, 1, n_bins + 1)
    for i, run in enumerate(runs):
        y, p = np.asarray(run["y"]), np.asarray(run["probs"])
        conf = p.max(axis=1)
        correct = (p.argmax(axis=1) == y).astype(float)
        b = ece_bin_index(conf, n_bins)
        counts = np.bincount(b, minlength=n_bins)
        acc = np.bincount(b, weights=correct, minlength=n_bins)
        mean_conf = np.bincount(b, weights=conf, minlength=n_bins)
        keep = counts > 0
        colour = run.get("colour", f"C{i % 10}")
        ece = run.get("ece") or (math.nan, math.nan, math.nan)
        label = f"{run['label']}: ECE {_fmt(ece[0])} [{_fmt(ece[1])}, {_fmt(ece[2])}]"
        ax.plot(mean_conf[keep] / counts[keep], acc[keep] / counts[keep], marker="o", ms=4, color=colour,
                ls=run.get("style", "-"), label=label)
        ax_h.stairs(counts / max(len(y), 1), edges, color=colour, lw=1.4, ls=run.get("style", "-"))
    ax.set(xlim=(0, 1), ylim=(0, 1.01), ylabel="Accuracy in bin", title=title)
    ax.grid(alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", fontsize=7, frameon=False)
    ax_h.set(xlabel=f"Top-1 confidence ({n_bins} bins)", ylabel="Share of cases")
    ax_h.grid(alpha=0.3)
    return _png(fig)


def external_drop_figure(rows: list[dict], title: str, metric: str) -> bytes:
    """Dumbbell plot: internal vs external value per model (``rows``: label, internal, external,
    internal_lo/hi, external_lo/hi), one row per model/protocol/external set."""
    fig = Figure(figsize=(6.4, 0.35 * len(rows) + 1.4), layout="constrained")
    ax = fig.add_subplot()
    for i, r in enumerate(rows):
        ax.plot([r["internal"], r["external"]], [i, i], color="0.6", lw=2, zorder=1)
        for key, colour in (("internal", "C0"), ("external", "C3")):
            lo, hi = r.get(f"{key}_lo"), r.get(f"{key}_hi")
            xerr = None
            if lo is not None and hi is not None and np.isfinite([lo, hi, r[key]]).all():
                xerr = [[max(r[key] - lo, 0)], [max(hi - r[key], 0)]]
            ax.errorbar([r[key]], [i], xerr=xerr, fmt="o", color=colour, capsize=3, zorder=2,
                        label=key if i == 0 else None)
    points = [v for r in rows for v in (r["internal"], r["external"]) if np.isfinite(v)]
    if points:
        span = max(max(points) - min(points), 0.05)
        ax.set_xlim(min(points) - 0.6 * span, max(points) + 0.6 * span)  # CIs may run past the edges
    ax.set_yticks(range(len(rows)), [r["label"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel=metric, title=title)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


def multilabel_confusion_figure(per_sign: dict, title: str) -> bytes:
    """One 2 x 2 confusion matrix (threshold 0.5) per sign: ``{sign: [[tn, fp], [fn, tp]]}``."""
    signs = list(per_sign)
    n = max(len(signs), 1)
    fig = Figure(figsize=(2.3 * n + 0.4, 2.7), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, sign in zip(axes, signs):
        cm = np.asarray(per_sign[sign], dtype=float)
        rows = cm.sum(axis=1, keepdims=True)
        rate = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
        ax.imshow(rate, cmap="Blues", vmin=0, vmax=1)
        for i in range(2):
            for j in range(2):
                ax.text(j, i, f"{int(cm[i, j])}\n{rate[i, j]:.0%}", ha="center", va="center", fontsize=8,
                        color="white" if rate[i, j] > 0.55 else "black")
        ax.set_xticks([0, 1], ["absent", "present"], fontsize=7)
        ax.set_yticks([0, 1], ["absent", "present"], fontsize=7)
        ax.set_title(str(sign), fontsize=9)
        ax.set_xlabel("predicted", fontsize=7)
    axes[0].set_ylabel("true", fontsize=7)
    fig.suptitle(title, fontsize=9.5)
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
    logs: dict[str, list] = {}  # one panel per method: their losses are on different scales
    for label, path in items:
        try:
            log = pd.read_csv(path)
        except (OSError, ValueError):
            continue
        if "loss" not in log or log.empty:
            continue
        method = str(label).split("/")[0].split("-")[0]
        logs.setdefault(method, []).append((label, log))
    fig = Figure(figsize=(5.6 * max(1, len(logs)), 3.8))
    for i, (method, runs) in enumerate(logs.items()):
        ax = fig.add_subplot(1, len(logs), i + 1)
        for label, log in runs:
            x = log["epoch"] if "epoch" in log else np.arange(len(log))
            ax.plot(x, log["loss"], marker="." if len(log) < 60 else None, label=str(label))
        ylabel = "Loss (masked patches)" if method == "mae" else f"{method} loss"
        ax.set(xlabel="Epoch", ylabel=ylabel, title=f"{method} pretraining loss")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if not logs:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no pretraining logs", ha="center", va="center", transform=ax.transAxes)
    return _png(fig)
