"""Report figures, rendered off-screen with matplotlib's Agg canvas and returned as PNG bytes.

The functions build ``matplotlib.figure.Figure`` objects directly (no pyplot global state), so
they are safe to call from any process without a display.

Readability rules (checked by ``tests/test_report_figures.py``):

* **Shown 1:1.** A figure is drawn at :data:`DPI` for display at its natural pixel size (one image
  pixel = one CSS pixel at 100 % zoom) and is at most :data:`MAX_WIDTH_PX` wide, so it fits the
  report's content column unscaled. Text is then ``font pt x DPI / 72`` px; :data:`STYLE` keeps
  every text at >= 8 pt = 11 px (the rule: >= :data:`MIN_TEXT_PX`; :func:`min_text_px` measures it).
* **At most** :data:`MAX_CURVES` **curves per panel**; more runs become small multiples with shared
  axes (runs carry an optional ``panel`` name, e.g. the protocol; a group with more runs than that
  is split). A *curve* is a data line (``Line2D`` with a drawn line style); reference lines
  (chance diagonal, prevalence, perfect calibration) carry ``gid`` :data:`REFERENCE` and do not
  count, nor do error-bar caps (markers only), bands or histogram steps (patches / collections).
"""

from __future__ import annotations

import functools
import io
import math
import textwrap
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 100
MAX_WIDTH_PX = 1150  # report column: body max-width 1250 - 2 x 24 padding - figure frame 2 x 7
MIN_TEXT_PX = 10.0
MAX_CURVES = 4
REFERENCE = "reference"  # gid of reference lines (not data curves)
STYLE = {  # pt; at DPI 100 one pt is 1.39 px: 8 pt = 11.1 px
    "font.size": 9.0, "axes.titlesize": 10.0, "axes.labelsize": 9.0, "xtick.labelsize": 8.5,
    "ytick.labelsize": 8.5, "legend.fontsize": 8.5, "legend.title_fontsize": 8.5, "figure.titlesize": 10.5,
    "figure.dpi": DPI, "savefig.dpi": DPI,
}
_GRID = np.linspace(0.0, 1.0, 201)


def _styled(fn):
    """Run a figure function under :data:`STYLE` (tick labels are created lazily at draw time, so
    the whole function, rendering included, runs inside the rc context)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(STYLE):
            return fn(*args, **kwargs)

    return wrapper


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.06, metadata={"Software": None})
    return buf.getvalue()


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) in pixels from a PNG's header."""
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not PNG data (no PNG signature)")
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def text_sizes_px(fig: Figure, display_width: float | None = None,
                  pixel_width: int | None = None) -> list[tuple[float, str]]:
    """Every visible, non-empty text of ``fig`` as ``(size in displayed px, text)``, smallest first.

    Displayed px = font pt x :data:`DPI` / 72 x display width / pixel width of the rendered PNG
    (``pixel_width``; rendered here when not given); the display width defaults to the natural
    width capped at :data:`MAX_WIDTH_PX` (the report shows figures 1:1 and shrinks only what does
    not fit its column)."""
    from matplotlib.text import Text

    width = pixel_width or png_size(_png(fig))[0]
    shown = min(width, MAX_WIDTH_PX) if display_width is None else display_width
    scale = DPI / 72 * shown / width
    out = []
    for t in fig.findobj(Text):
        if not t.get_text().strip() or not t.get_visible():
            continue
        if t.axes is not None and not t.axes.get_visible():
            continue
        out.append((t.get_fontsize() * scale, t.get_text()))
    return sorted(out)


def min_text_px(fig: Figure, display_width: float | None = None, pixel_width: int | None = None) -> float:
    """Smallest text of ``fig`` as displayed, in px (:func:`text_sizes_px`); inf without text."""
    sizes = text_sizes_px(fig, display_width, pixel_width)
    return sizes[0][0] if sizes else math.inf


def curves_per_axes(fig: Figure) -> list[int]:
    """Number of data curves in each axes of ``fig`` (module docstring: what counts as a curve)."""
    return [sum(1 for line in ax.get_lines() if line.get_gid() != REFERENCE and line.get_linestyle() != "None")
            for ax in fig.get_axes()]


def _reference(ax, *args, **kwargs):
    """A reference line (dashed grey, not counted as a curve)."""
    kwargs = {"ls": "--", "lw": 0.9, "color": "0.55", **kwargs}
    (line,) = ax.plot(*args, **kwargs)
    line.set_gid(REFERENCE)
    return line


def _chunks(items: list, size: int = MAX_CURVES) -> list[list]:
    """``items`` in as few consecutive chunks of at most ``size`` as possible, of near-equal length."""
    n = max(1, -(-len(items) // size))
    step = -(-len(items) // n) if items else 1
    return [items[i:i + step] for i in range(0, len(items), step)] or [[]]


def _groups(items: list[dict], key: str = "panel") -> list[tuple[str | None, list[dict]]]:
    """``items`` in panels of at most :data:`MAX_CURVES`, as ``(title, items)``.

    Items are grouped by ``item[key]`` (first-seen order; items without one form one unnamed
    group); a group with more items is split into near-equal chunks ("name (1/2)", ...), and
    consecutive groups that fit together share a panel ("finetune, probe_adamw"). Unnamed panels
    have no title (None)."""
    named: dict = {}
    for item in items:
        named.setdefault(item.get(key), []).append(item)
    pieces = []
    for name, group in named.items():
        chunks = _chunks(group)
        for j, chunk in enumerate(chunks):
            label = name if name is None or len(chunks) == 1 else f"{name} ({j + 1}/{len(chunks)})"
            pieces.append((None if label is None else str(label), chunk))
    out: list[tuple[list, list[dict]]] = []
    for label, chunk in pieces:
        if out and len(out[-1][1]) + len(chunk) <= MAX_CURVES:
            out[-1][0].append(label)
            out[-1][1].extend(chunk)
        else:
            out.append(([label], list(chunk)))
    return [(", ".join(n for n in names if n) or None, group) for names, group in out] or [(None, [])]


def _wrap(text: str, width_in: float, size_pt: float) -> str:
    """``text`` wrapped to lines that fit ``width_in`` inches at ``size_pt`` (about 0.55 em a character)."""
    chars = max(20, int(width_in * 72 / (0.55 * size_pt)))
    return "\n".join(textwrap.wrap(text, chars)) if len(text) > chars else text


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


@_styled
def roc_figure(metrics_json_dicts: list[dict], title: str) -> bytes:
    """ROC curves of several runs (metrics.json dicts) of one task and eval set, at most
    :data:`MAX_CURVES` per panel (panels by protocol, shared axes).

    Binary tasks show the positive-class curve; multiclass/ordinal tasks show the macro-average
    one-vs-rest curve. The legend gives each run's AUROC with its 95 % CI.
    """
    runs = [{**d, "panel": d.get("protocol"), "_i": i} for i, d in enumerate(metrics_json_dicts)]
    groups = _groups(runs)
    ncols = min(len(groups), 2)
    nrows = -(-len(groups) // ncols)
    fig = Figure(figsize=(4.4 * ncols, 5.0 * nrows + 0.3), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True).ravel()
    multi = False
    for ax, (name, group) in zip(axes, groups):
        _reference(ax, [0, 1], [0, 1], label="chance")
        for d in group:
            i = d["_i"]
            roc = d.get("roc") or {}
            curve = macro_roc(roc)
            if curve is None:
                continue
            multi = multi or len(roc) > 1
            auc = (d.get("metrics") or {}).get("auroc") or {}
            label = (f"{_run_label(d)}\nAUROC {_fmt(auc.get('value'))} "
                     f"[{_fmt(auc.get('ci_low'))}, {_fmt(auc.get('ci_high'))}]")
            ax.plot(*curve, lw=1.8, color=f"C{i % 10}", label=label)
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate", ylabel="True positive rate",
               title=name or "")
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    fig.suptitle(title + (" (macro-average one-vs-rest ROC)" if multi else ""))
    return _png(fig)


@_styled
def confusion_figure(cm, classes, title: str) -> bytes:
    """Confusion matrix: counts annotated, cells coloured by row-normalised rate (recall)."""
    cm = np.asarray(cm, dtype=float)
    k = cm.shape[0]
    rows = cm.sum(axis=1, keepdims=True)
    rate = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    labels = [str(c) for c in classes]
    longest = max(map(len, labels), default=1)
    size = 1.2 + 0.45 * k
    fig = Figure(figsize=(size + 0.9 + 0.05 * min(longest, 20), size + 0.5 + 0.05 * min(longest, 20)),
                 layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(rate, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="row fraction")
    ax.set_xticks(range(k), labels, rotation=45 if longest > 3 else 0, ha="right" if longest > 3 else "center")
    ax.set_yticks(range(k), labels)
    ax.set(xlabel="Predicted class", ylabel="True class")
    for i in range(k):
        for j in range(k):
            colour = "white" if rate[i, j] > 0.55 else "black"
            ax.text(j, i, f"{int(cm[i, j])}\n{rate[i, j]:.0%}", ha="center", va="center", color=colour,
                    fontsize=9 if k <= 4 else 8)
    ax.set_title(_wrap(title, size + 0.9, 10))
    return _png(fig)


def seed_summary(df: pd.DataFrame, metric: str, keys: list[str], alpha: float = 0.05,
                 min_t_seeds: int = 3) -> pd.DataFrame:
    """Per ``keys``: mean of ``metric`` over seeds with a 95 % interval, the seed SD and count.

    ``ci`` says which interval ``lo``/``hi`` are:

    * ``"seeds"`` (``min_t_seeds`` = 3 or more seeds): the t interval of the seed mean
      (``mean +- t_{n-1} sd / sqrt(n)``, ``half`` = its half-width); it reflects training randomness
      (initialisation, label subset, augmentation) as well as the test set;
    * ``"per_seed"`` (2 seeds): no t interval (t_1 = 12.7 makes it meaningless); ``lo``/``hi`` span
      the runs' bootstrap CIs (lowest low, highest high) and ``per_seed`` lists every run;
    * ``"bootstrap"`` (one seed): that run's bootstrap CI (test-set sampling only).

    ``per_seed``: a tuple of ``(seed, value, ci_low, ci_high)`` per run, in seed order (row order
    where the frame has no ``seed`` column).
    """
    from scipy import stats

    lo, hi = f"{metric}_lo", f"{metric}_hi"
    work = df.assign(**{c: df[c] if c in df else np.nan for c in (metric, lo, hi)})
    if "seed" not in work:
        work = work.assign(seed=np.arange(len(work)))
    grouped = work.groupby(keys, dropna=False, sort=True)
    out = grouped.agg(
        value=(metric, "mean"), boot_lo=(lo, "min"), boot_hi=(hi, "max"), sd=(metric, "std"),
        n_seeds=(metric, "count"),
    ).reset_index()
    cols = ["seed", metric, lo, hi]
    out["per_seed"] = [  # groupby iterates the groups in the order agg lists them
        tuple((int(r[0]), float(r[1]), float(r[2]), float(r[3]))
              for r in work.loc[idx, cols].sort_values("seed").itertuples(index=False) if not pd.isna(r[1]))
        for idx in (g.index for _, g in grouped)] if len(out) else []
    n = out["n_seeds"].to_numpy(dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(n >= 2, stats.t.ppf(1 - alpha / 2, np.maximum(n - 1, 1)), np.nan)
        half = t * out["sd"].to_numpy(dtype=float) / np.sqrt(n)
    several = n >= min_t_seeds
    out["lo"] = np.where(several, out["value"] - half, out["boot_lo"])
    out["hi"] = np.where(several, out["value"] + half, out["boot_hi"])
    out["half"] = np.where(several, half, np.nan)
    out["ci"] = np.where(several, "seeds", np.where(n >= 2, "per_seed", "bootstrap"))
    return out


UNIT_METRICS = frozenset({"accuracy", "balanced_accuracy", "auroc", "aupr", "f1", "precision", "sensitivity",
                          "specificity", "ece", "subset_accuracy", "hamming_accuracy", "dice", "iou"})
SIGNED_METRICS = frozenset({"kappa", "qwk", "mcc", "pearson", "spearman"})
LINESTYLES = ["-", "--", ":", "-."]
CI_WORDS = {  # seed_summary's ``ci`` -> what the bars / band of a label-efficiency line are
    "seeds": "95% t interval across seeds",
    "per_seed": "span of the per-seed 95% bootstrap CIs (2 seeds)",
    "bootstrap": "95% bootstrap CI (1 seed)",
}


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


@_styled
def label_efficiency_figure(df: pd.DataFrame, task: str, metric: str, eval_sets: list[str] | None = None,
                            models: list[str] | None = None, protocols: list[str] | None = None) -> bytes:
    """Metric vs label fraction (log x) for one task: one panel per protocol (and eval set), one line
    per model (same colour in every panel); with more than :data:`MAX_CURVES` models the models are
    split over several panels. All panels share the y axis.

    Lines are means over seeds; the band and error bars are the interval of :func:`seed_summary`
    (its ``ci`` says which: :data:`CI_WORDS`), cut at the metric's range.
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
    chunks = _chunks(models)
    panels = [(p, e, j) for e in eval_sets for p in (protocols or ["?"]) for j in range(len(chunks))]
    ncols = 2 if len(panels) in (2, 4) else min(len(panels), 3)
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(3.4 * ncols + 0.6, 2.9 * nrows + 1.4), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    fractions = sorted(sub["fraction"].dropna().unique()) if len(sub) else []
    kinds, handles = set(), {}
    values, lows, highs = [], [], []
    for ax, (protocol, eval_set, j) in zip(axes, panels):
        part = sub[(sub["eval_set"] == eval_set) & (sub["protocol"] == protocol)] if len(sub) else sub
        summary = seed_summary(part, metric, ["model", "fraction"]) if len(part) else None
        for model in chunks[j] if summary is not None else []:
            s = summary[summary["model"] == model].sort_values("fraction")
            s = s[s["value"].notna()]
            if s.empty:
                continue
            colour = f"C{models.index(model) % 10}"
            (line,) = ax.plot(s["fraction"], s["value"], marker="o", color=colour, label=model)
            handles.setdefault(model, line)
            if len(s) > 1:
                ax.fill_between(s["fraction"], s["lo"], s["hi"], color=colour, alpha=0.12, lw=0)
            yerr = np.vstack([(s["value"] - s["lo"]).clip(lower=0), (s["hi"] - s["value"]).clip(lower=0)])
            ax.errorbar(s["fraction"], s["value"], yerr=np.nan_to_num(yerr), fmt="none", ecolor=colour, capsize=3,
                        alpha=0.8)
            kinds.update(s["ci"])
            values += list(s["value"])
            lows += list(s["lo"])
            highs += list(s["hi"])
        ax.set_xscale("log")
        if fractions:
            ax.set_xticks(fractions, [f"{f:.0%}" if f >= 0.01 else f"{f:.1%}" for f in fractions])
            ax.minorticks_off()
        title = protocol if len(eval_sets) == 1 else f"{protocol}, {eval_set}"
        if len(chunks) > 1:
            title += f" (models {j + 1}/{len(chunks)})"
        ax.set(xlabel="Fraction of training labels", title=title)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax in axes[::ncols]:
        ax.set_ylabel(metric)
    clip_axis(axes[0], values, lows, highs, metric)
    if handles:
        fig.legend(handles=[handles[m] for m in models if m in handles], loc="outside lower center",
                   ncol=min(len(handles), 6), frameon=False)
    ci = "; ".join(CI_WORDS.get(k, str(k)) for k in sorted(kinds)) or "95% CI"
    width = fig.get_figwidth()
    fig.suptitle(_wrap(f"{task}: label efficiency ({metric}); line = mean over seeds, bars/band = {ci}", width, 10.5))
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


@_styled
def roc_pr_figure(runs: list[dict], title: str, average: str = "macro one-vs-rest") -> bytes:
    """ROC (left, from metrics.json ``roc``) and precision-recall (right, from the predictions) curves,
    one row of the two panels per group of at most :data:`MAX_CURVES` runs.

    ``runs``: dicts with ``label``, ``metrics`` (the metrics.json dict) and optionally ``pr``
    (:func:`macro_pr` output), ``colour``, ``style`` and ``panel`` (the group's name, e.g. the
    protocol; runs without one are grouped in order). Several ROC curves per run (multiclass,
    multilabel) are averaged (``average`` names how, for the titles).
    """
    groups = _groups(runs)
    order = {id(r): i for i, r in enumerate(runs)}
    multi = any(len((r.get("metrics") or {}).get("roc") or {}) > 1 for r in runs)
    avg = f" ({average})" if multi else ""
    fig = Figure(figsize=(8.4, 4.7 * len(groups) + 0.4), layout="constrained")
    subfigs = fig.subfigures(len(groups), 1, squeeze=False).ravel()
    for sf, (name, group) in zip(subfigs, groups):
        ax_roc, ax_pr = sf.subplots(1, 2)
        _reference(ax_roc, [0, 1], [0, 1])
        handles, prevalences = [], []
        for run in group:
            i = order[id(run)]
            d = run.get("metrics") or {}
            colour, style = run.get("colour", f"C{i % 10}"), run.get("style", "-")
            m = d.get("metrics") or {}
            auc, ap = m.get("auroc") or {}, m.get("aupr") or {}
            label = f"{run['label']}: AUROC {_fmt(auc.get('value'))}, AUPR {_fmt(ap.get('value'))}"
            curve = macro_roc(d.get("roc") or {})
            line = None
            if curve is not None:
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
            _reference(ax_pr, [0, 1], [float(np.mean(prevalences))] * 2)
        else:
            ax_pr.text(0.5, 0.5, "no predictions file", ha="center", va="center", transform=ax_pr.transAxes,
                       color="0.4")
        ax_roc.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate (1 - specificity)",
                   ylabel="True positive rate (sensitivity)", title=f"ROC{avg}")
        ax_pr.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="Recall (sensitivity)", ylabel="Precision (PPV)",
                  title=f"Precision-recall{avg}; dashed = prevalence")
        for ax in (ax_roc, ax_pr):
            ax.set_aspect("equal")
            ax.grid(alpha=0.3)
        if handles:
            sf.legend(handles=handles, loc="outside lower center", ncol=2 if len(handles) > 2 else 1,
                      frameon=False)
        if name is not None and len(groups) > 1:
            sf.suptitle(name, fontweight="bold", fontsize=10)
    fig.get_layout_engine().set(h_pad=0.08)  # room between an x label and the legend below it
    fig.suptitle(title)
    return _png(fig)


@_styled
def reliability_figure(runs: list[dict], n_bins: int, title: str) -> bytes:
    """Reliability diagram (top) and confidence histogram (bottom) of top-1 predictions, one column
    per group of at most :data:`MAX_CURVES` runs (``panel``: the group's name, as in
    :func:`roc_pr_figure`); all columns share their axes.

    ``runs``: dicts with ``label``, ``y`` (labels), ``probs`` (n, K) and ``ece`` (value, lo, hi);
    bins are ECE's ``n_bins`` equal-width confidence bins.
    """
    from ..evaluate.metrics import ece_bin_index

    groups = _groups(runs)
    order = {id(r): i for i, r in enumerate(runs)}
    ncols = min(len(groups), 3)
    nrows = -(-len(groups) // ncols)
    fig = Figure(figsize=(3.6 * ncols + 0.3, 6.0 * nrows + 0.4), layout="constrained")
    subfigs = fig.subfigures(nrows, ncols, squeeze=False).ravel()
    edges = np.linspace(0, 1, n_bins + 1)
    hist_axes, top = [], 0.0
    for sf, (name, group) in zip(subfigs, groups):
        ax, ax_h = sf.subplots(2, 1, height_ratios=[3, 1], sharex=True)
        _reference(ax, [0, 1], [0, 1], label="perfect calibration")
        for run in group:
            i = order[id(run)]
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
            label = f"{run['label']}\nECE {_fmt(ece[0])} [{_fmt(ece[1])}, {_fmt(ece[2])}]"
            ax.plot(mean_conf[keep] / counts[keep], acc[keep] / counts[keep], marker="o", ms=4, color=colour,
                    ls=run.get("style", "-"), label=label)
            share = counts / max(len(y), 1)
            top = max(top, float(share.max()) if share.size else 0.0)
            ax_h.stairs(share, edges, color=colour, lw=1.4, ls=run.get("style", "-"))
        ax.set(xlim=(0, 1), ylim=(0, 1.01), ylabel="Accuracy in bin", title=name or "")
        ax.grid(alpha=0.3)
        ax_h.set(xlabel=f"Top-1 confidence ({n_bins} bins)", ylabel="Share of cases")
        ax_h.grid(alpha=0.3)
        hist_axes.append(ax_h)
        sf.legend(*ax.get_legend_handles_labels(), loc="outside lower center", frameon=False)
    for ax_h in hist_axes:
        ax_h.set_ylim(0, max(top, 0.05) * 1.08)
    fig.suptitle(title)
    return _png(fig)


@_styled
def external_drop_figure(rows: list[dict], title: str, metric: str) -> bytes:
    """Dumbbell plot: internal vs external value per model (``rows``: label, internal, external,
    internal_lo/hi, external_lo/hi), one row per model/protocol/external set."""
    fig = Figure(figsize=(6.6, 0.36 * len(rows) + 1.6), layout="constrained")
    ax = fig.add_subplot()
    ax.hlines(range(len(rows)), [r["internal"] for r in rows], [r["external"] for r in rows], color="0.6", lw=2,
              zorder=1)
    for i, r in enumerate(rows):
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
    ax.set_yticks(range(len(rows)), [r["label"] for r in rows])
    ax.invert_yaxis()
    ax.set(xlabel=metric, title=_wrap(title, 5.0, 10))
    ax.grid(alpha=0.3, axis="x")
    ax.legend(loc="best")
    return _png(fig)


@_styled
def multilabel_confusion_figure(per_sign: dict, title: str) -> bytes:
    """One 2 x 2 confusion matrix (threshold 0.5) per sign: ``{sign: [[tn, fp], [fn, tp]]}``."""
    signs = list(per_sign)
    n = max(len(signs), 1)
    ncols = min(n, 5)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(2.15 * ncols + 0.5, 2.35 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, sign in zip(axes, signs):
        cm = np.asarray(per_sign[sign], dtype=float)
        rows = cm.sum(axis=1, keepdims=True)
        rate = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
        ax.imshow(rate, cmap="Blues", vmin=0, vmax=1)
        for i in range(2):
            for j in range(2):
                ax.text(j, i, f"{int(cm[i, j])}\n{rate[i, j]:.0%}", ha="center", va="center", fontsize=9,
                        color="white" if rate[i, j] > 0.55 else "black")
        ax.set_xticks([0, 1], ["absent", "present"])
        ax.set_yticks([0, 1], ["absent", "present"], rotation=90, va="center")
        ax.set_title(str(sign))
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    for ax in axes[len(signs):]:
        ax.set_visible(False)
    fig.suptitle(_wrap(title, fig.get_figwidth(), 10.5))
    return _png(fig)


@_styled
def pretrain_loss_figure(log_csv_paths) -> bytes:
    """Pretraining loss per epoch for each ``log.csv`` (list of paths, or dict label -> path): one
    panel per method (their losses are on different scales), at most :data:`MAX_CURVES` runs each.

    A list is labelled ``{method}/{modality}`` from the ``results/pretrain/{method}/{modality}/`` layout.
    """
    items = (
        log_csv_paths.items()
        if isinstance(log_csv_paths, dict)
        else ((f"{Path(p).parent.parent.name}/{Path(p).parent.name}", p) for p in log_csv_paths)
    )
    runs = []
    for label, path in items:
        try:
            log = pd.read_csv(path)
        except (OSError, ValueError):
            continue
        if "loss" not in log or log.empty:
            continue
        runs.append({"label": str(label), "log": log, "panel": str(label).split("/")[0].split("-")[0]})
    groups = _groups(runs) if runs else []
    ncols = max(1, min(len(groups), 3))
    nrows = max(1, -(-len(groups) // ncols))
    fig = Figure(figsize=(3.7 * ncols + 0.4, 3.0 * nrows + 0.3), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (method, group) in zip(axes, groups):
        for run in group:
            log = run["log"]
            x = log["epoch"] if "epoch" in log else np.arange(len(log))
            ax.plot(x, log["loss"], marker="." if len(log) < 60 else None, label=run["label"])
        base = method.split(" (")[0]
        ylabel = "Loss (masked patches)" if base == "mae" else f"{base} loss"
        ax.set(xlabel="Epoch", ylabel=ylabel, title=f"{method} pretraining loss")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    if not groups:
        axes[0].set_visible(True)
        axes[0].text(0.5, 0.5, "no pretraining logs", ha="center", va="center", transform=axes[0].transAxes)
    return _png(fig)
