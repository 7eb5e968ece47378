"""Build the single-file HTML report (inline CSS, figures as base64 data URIs, no JS, no external assets).

:func:`build_report` takes the results folder and the report's settings
(:class:`retflow.settings.report.ReportSettings`); command line: :mod:`retflow.report.cli`.
"""

from __future__ import annotations

import base64
import json
import math
import os
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd

from ..atomic import write_text
from ..evaluate.metrics import LOWER_IS_BETTER, METRICS_BY_TYPE, PRIMARY_METRIC
from ..layout import Layout
from ..preflight_data import pool_note
from ..settings.frozen import plain
from ..settings.report import ExternalSet, ReportSettings, ReportTask
from . import figures
from .synth_section import nav_item as synth_nav_item
from .synth_section import synth_section
from .collect import (
    collect_compare,
    collect_leakage,
    collect_pretrain,
    collect_qc,
    collect_quarantine,
    collect_quarantine_examples,
    collect_results,
    collect_saliency,
    cost_frame,
    job_step,  # noqa: F401 - re-exported (older callers)
    load_metrics_json,
    metric_names,
)

CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0 auto;max-width:1250px;
 padding:0 24px 48px;color:#222;line-height:1.4}
h1{border-bottom:3px solid #2b6cb0;padding-bottom:6px}h2{margin-top:40px;border-bottom:1px solid #ccc}
h3{margin-top:26px;color:#2b4c7e}
table{border-collapse:collapse;margin:8px 0 16px;font-size:12.5px}
th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef2f7}tr:nth-child(even) td{background:#fafbfc}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.primary,th.primary{background:#fff8e1 !important}
tr.total td{font-weight:700;background:#eef2f7}
.figs{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
figure{margin:0;border:1px solid #e1e4e8;padding:6px;background:#fff}
figure img{max-width:100%;height:auto;display:block;margin:0 auto}figcaption{font-size:12px;color:#555;max-width:560px}
.note{background:#f6f8fa;border-left:4px solid #2b6cb0;padding:8px 14px;font-size:14px}
.muted{color:#777}nav ul{columns:3}code{background:#f0f0f0;padding:0 3px}
.scroll{overflow-x:auto;max-width:100%}td.best{color:#1a5e20;font-weight:700}td.sig{color:#8a1c1c;font-weight:600}
td.drop{color:#8a1c1c}p.caption{font-size:12.5px;color:#555;max-width:1000px;margin-top:-6px}
.warn{background:#fff4e5;border-left:4px solid #e08a00;padding:6px 12px}
details{margin:6px 0 12px}summary{cursor:pointer;color:#2b4c7e;font-size:14px}
"""


# ---------------------------------------------------------------- small HTML helpers
def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "<td class='muted'>&ndash;</td>"
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return f"<td class='num'>{escape(_num(value))}</td>"
    if isinstance(value, (Mapping, list, tuple)):
        value = json.dumps(plain(value), default=str)
    return f"<td>{escape(str(value))}</td>"


def _num(value) -> str:
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return format(float(value), ".4g")


def _table(
    header: list[str], rows: list[list], classes: dict[int, str] | None = None, total: list | None = None
) -> str:
    """HTML table of escaped cells; ``classes`` maps column index -> header CSS class; strings that
    already start with ``<td`` are pre-rendered (escaped) cells and pass through unchanged."""
    classes = classes or {}
    head = "".join(
        f"<th{f' class={chr(39)}{classes[i]}{chr(39)}' if i in classes else ''}>{escape(str(h))}</th>"
        for i, h in enumerate(header)
    )
    body = []
    for row in rows + ([total] if total else []):
        cells = []
        for v in row:
            cells.append(v if isinstance(v, str) and v.startswith("<td") else _cell(v))
        cls = " class='total'" if total is not None and row is total else ""
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(png: bytes, caption: str, width: int | None = None) -> str:
    data = base64.b64encode(png).decode("ascii")
    style = f" style='width:{width}px'" if width else ""
    return (
        f"<figure{style}><img alt='{escape(caption, quote=True)}' src='data:image/png;base64,{data}'>"
        f"<figcaption>{escape(caption)}</figcaption></figure>"
    )


def _ci(value, lo, hi) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return f"{value:.3f}"
    return f"{value:.3f} [{lo:.3f}, {hi:.3f}]"


def _frac(value) -> str:
    try:
        return format(float(value), "g")
    except (TypeError, ValueError):
        return str(value)


def _anchor(name: str) -> str:
    return "task-" + "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in str(name))


# ---------------------------------------------------------------- sections
def _config_section(settings: ReportSettings) -> str:
    parts = ["<h2 id='config'>Configuration</h2>"]
    rows = []
    for ds in settings.datasets:
        ph = ds.phantom
        origin = f"phantom {ph['kind']} n={ph['n']} style {ph['style']}" if ph else ds.path
        rows.append([ds.name, ds.modality, ds.role, ds.source, origin])
    parts.append("<h3>Datasets</h3>" + _table(["dataset", "modality", "role", "source", "origin"], rows))
    rows = []
    for t in settings.tasks:
        grid = [f"protocols {', '.join(t.protocols)}", f"fractions {', '.join(map(_frac, t.fractions))}",
                f"seeds {', '.join(map(str, t.seeds))}"]
        rows.append([t.name, t.dataset, ", ".join(map(str, t.label)) if isinstance(t.label, tuple) else t.label,
                     t.type, ", ".join(t.classes), "; ".join(_external_text(e) for e in t.external) or None,
                     PRIMARY_METRIC.get(t.type, "dice" if t.type == "segmentation" else None), "; ".join(grid)])
    parts.append("<h3>Tasks</h3>" + _table(
        ["task", "dataset", "label", "type", "classes", "external sets", "primary metric", "runs"], rows))
    rows = [[m.name, m.init, m.method or m.path] for m in settings.models]
    parts.append("<h3>Models</h3>" + _table(["model", "init", "method / weights"], rows))
    grid = [["protocols", ", ".join(settings.protocols)], ["fractions", ", ".join(map(_frac, settings.fractions))],
            ["seeds", ", ".join(map(str, settings.seeds))]]
    parts.append("<h3>Run grid</h3>" + _table(["setting", "values"], grid))
    for section in settings.sections:
        parts.append(f"<h3>{escape(section.name)} settings</h3>"
                     + _table(["key", "value"], [[k, v] for k, v in section.values.items()]))
    return "\n".join(parts)


def _external_text(ext: ExternalSet) -> str:
    """``cfp_device_b`` or ``cfp_device_b (0, 1 -> non_referable; 2, 3, 4 -> referable)``."""
    text = ext.dataset
    if ext.map:
        groups: dict = {}
        for src, dst in ext.map.items():
            groups.setdefault(dst, []).append(src)
        text += " (" + "; ".join(f"{', '.join(v)} → {k}" for k, v in groups.items()) + ")"
    return text


def _qc_section(results_dir: Path) -> str:
    parts = ["<h2 id='qc'>Data QC</h2>"]
    qc = collect_qc(results_dir)
    if not qc.empty:
        parts.append("<h3>Prepared datasets</h3>" + _table(list(qc.columns), qc.values.tolist()))
    quarantine = collect_quarantine(results_dir)
    parts.append("<h3>Quarantined inputs</h3>")
    if quarantine.empty:
        parts.append("<p>Quarantined inputs: none.</p>")
    else:
        pivot = quarantine.pivot_table(index="dataset", columns="reason", values="count", aggfunc="sum", fill_value=0)
        pivot["total"] = pivot.sum(axis=1)
        rows = [[ds, *map(int, vals)] for ds, vals in zip(pivot.index, pivot.values)]
        parts.append(_table(["dataset", *pivot.columns], rows))
        parts.append("<p>Counts per reason. Label-level reasons (missing_label, unknown_label, unknown_eye) "
                     "keep the image for other uses; every other reason keeps the file out of the store. "
                     f"Full lists: <code>{escape(Layout(results_dir).quarantine('<dataset>'))}</code>.</p>")
        examples = collect_quarantine_examples(results_dir)
        parts.append("<details><summary>First quarantined entries per dataset</summary>"
                     + _table(list(examples.columns), examples.values.tolist()) + "</details>")
    parts += [f"<p>{escape(note)}</p>" for note in [pool_note(results_dir)] if note]  # pools, pre-flight gate
    leaks = collect_leakage(results_dir)
    parts.append("<h3>Leakage checks</h3>")
    parts.append("<p>No leakage warnings (patient, identical file or perceptual near-duplicate across splits, "
                 "and pretraining pools / training splits against test sets).</p>" if not leaks else
                 f"<p>{len(leaks)} warnings (checks set to <code>warn</code>):</p><ul>"
                 + "".join(f"<li>{escape(line)}</li>" for line in leaks[:50]) + "</ul>")
    return "\n".join(parts)


# ---------------------------------------------------------------- task-level helpers
KEY_METRICS = {
    "binary": ["auroc", "aupr", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "ece"],
    "multiclass": ["auroc", "aupr", "accuracy", "balanced_accuracy", "f1", "kappa", "ece"],
    "ordinal": ["qwk", "auroc", "accuracy", "balanced_accuracy", "f1", "kappa", "ece"],
    "multilabel": ["auroc", "aupr", "f1", "sensitivity", "specificity", "subset_accuracy"],
    "regression": ["mae", "rmse", "r2", "pearson", "spearman"],
}
ALPHA = 0.05


class TaskInfo:
    """What the report needs to know about one task: type, metrics, primary metric and direction."""

    def __init__(self, task: str, spec: ReportTask | None, df: pd.DataFrame, settings: ReportSettings):
        self.name = task
        self.spec = spec  # None for a task found in the results but not in the config
        self.df = df
        internal = df[df["eval_set"] == "internal"] if len(df) else df
        self.internal = internal
        has_types = len(internal) and "task_type" in internal
        types = internal["task_type"].dropna() if has_types else pd.Series([], dtype=str)
        self.type = spec.type if spec else (types.iloc[0] if len(types) else None)
        present = [m for m in metric_names(internal) if internal[m].notna().any()] if len(internal) else []
        known = [m for m in METRICS_BY_TYPE.get(self.type, []) if m in present]
        self.metrics = known + [m for m in present if m not in known]
        declared = internal["primary_metric"].dropna() if len(internal) and "primary_metric" in internal else []
        primary = declared.iloc[0] if len(declared) else PRIMARY_METRIC.get(self.type)
        if primary not in self.metrics and self.metrics:
            primary = self.metrics[0]
        self.primary = primary
        lower = set(LOWER_IS_BETTER)
        if len(internal) and "lower_is_better" in internal:
            for value in internal["lower_is_better"]:
                if isinstance(value, (list, tuple)):
                    lower |= set(value)
        self.lower = lower
        self.key_metrics = [m for m in KEY_METRICS.get(self.type, []) if m in self.metrics] or self.metrics[:8]
        if self.primary in self.key_metrics:
            self.key_metrics.remove(self.primary)
        found = list(dict.fromkeys(df["protocol"].dropna())) if len(df) else []
        self.protocols = [p for p in (spec.protocols if spec else settings.protocols) if p in found]
        self.protocols += sorted(p for p in found if p not in self.protocols)
        models = [m.name for m in settings.models]
        found = list(dict.fromkeys(df["model"].dropna())) if len(df) else []
        self.models = [m for m in models if m in found] + sorted(m for m in found if m not in models)

    def style(self, protocol: str, model: str) -> dict:
        """Line colour by model and line style by protocol, the same in every figure of the task."""
        m = self.models.index(model) if model in self.models else len(self.models)
        p = self.protocols.index(protocol) if protocol in self.protocols else len(self.protocols)
        return {"colour": f"C{m % 10}", "style": figures.LINESTYLES[p % len(figures.LINESTYLES)]}

    def lower_is_better(self, metric: str) -> bool:
        return metric in self.lower

    def better(self, a: float, b: float, metric: str) -> bool:
        return a < b if self.lower_is_better(metric) else a > b

    def order(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Rows in protocol (config order), fraction, model (config order) order."""
        p_rank = {p: i for i, p in enumerate(self.protocols)}
        m_rank = {m: i for i, m in enumerate(self.models)}
        return frame.assign(_p=frame["protocol"].map(p_rank), _m=frame["model"].map(m_rank)).sort_values(
            ["_p", "fraction", "_m"], kind="stable").drop(columns=["_p", "_m"])


def _fmt_value(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    a = abs(v)
    return f"{v:.1f}" if a >= 100 else f"{v:.2f}" if a >= 10 else f"{v:.3f}"


def _summary_text(r, metric: str) -> str:
    """``mean +- half`` (several seeds) or ``value [lo, hi]`` (one seed, bootstrap) of a seed_summary row."""
    v = r.get(metric) if isinstance(r, dict) else r[metric]
    get = (lambda k: r.get(k)) if isinstance(r, dict) else (lambda k: r[k])
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if get(f"{metric}_ci") == "seeds" and not pd.isna(get(f"{metric}_half")):
        return f"{_fmt_value(v)} ± {_fmt_value(get(f'{metric}_half'))}"
    lo, hi = get(f"{metric}_lo"), get(f"{metric}_hi")
    if lo is None or hi is None or pd.isna(lo) or pd.isna(hi):
        return _fmt_value(v)
    return f"{_fmt_value(v)} [{_fmt_value(lo)}, {_fmt_value(hi)}]"


def summarise(df: pd.DataFrame, metrics: list[str], keys: list[str]) -> pd.DataFrame:
    """seed_summary of several metrics side by side: ``<m>``, ``<m>_lo``, ``<m>_hi``, ``<m>_half``,
    ``<m>_ci`` per metric, plus ``n_seeds`` and ``n_cases`` (mean test-set size)."""
    out = None
    for metric in metrics:
        s = figures.seed_summary(df, metric, keys)
        s = s[keys + ["value", "lo", "hi", "half", "ci", "n_seeds"]].rename(columns={
            "value": metric, "lo": f"{metric}_lo", "hi": f"{metric}_hi", "half": f"{metric}_half",
            "ci": f"{metric}_ci", "n_seeds": f"{metric}_n"})
        out = s if out is None else out.merge(s, on=keys, how="outer")
    if out is None:
        out = df[keys].drop_duplicates().reset_index(drop=True)
    n_cols = [f"{m}_n" for m in metrics]
    seeds = df.groupby(keys, dropna=False)["seed"].nunique().rename("n_seeds").reset_index()
    n_cases = df.groupby(keys, dropna=False)["n"].mean().rename("n_cases").reset_index()
    return out.drop(columns=n_cols).merge(seeds, on=keys, how="left").merge(n_cases, on=keys, how="left")


def _pkey(fraction) -> float:
    return round(float(fraction), 9)


def _fmt_p(p) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "n/a"
    text = "<0.001" if p < 0.001 else f"{p:.3f}"
    return text + ("*" if p < ALPHA else "")


class Significance:
    """Index of the compare JSONs: best model and best-vs-other p-values per protocol/fraction/seed."""

    def __init__(self, compares: list[dict]):
        self.by_key: dict = {}
        for c in compares:
            try:
                key = (str(c["task"]), str(c["protocol"]), _pkey(c["fraction"]))
            except (KeyError, TypeError, ValueError):
                continue
            self.by_key.setdefault(key, {})[int(c.get("seed") or 0)] = c

    def has_task(self, task) -> bool:
        return any(key[0] == str(task) for key in self.by_key)

    def seeds(self, task, protocol, fraction) -> dict:
        return dict(sorted(self.by_key.get((str(task), str(protocol), _pkey(fraction)), {}).items()))

    def cell(self, task, protocol, fraction, model) -> tuple[str, str]:
        """(text, tooltip) of ``model``'s significance vs the best model, one entry per seed."""
        texts, tips = [], []
        for seed, c in self.seeds(task, protocol, fraction).items():
            if model not in (c.get("models") or []):
                continue
            best = c.get("best")
            if best is None:
                texts.append("n/a")
                continue
            if best == model:
                texts.append("best")
                tips.append(f"seed {seed}: best by {c.get('metric')}")
                continue
            pair = next((p for p in c.get("best_vs_rest") or [] if p.get("b") == model), None)
            p = pair.get("p_value") if pair else None
            texts.append(_fmt_p(p))
            if pair:
                tips.append(f"seed {seed}: {best} - {model} = {_fmt_value(pair.get('difference'))} "
                            f"[{_fmt_value(pair.get('ci_low'))}, {_fmt_value(pair.get('ci_high'))}], "
                            f"p {_fmt_p(p)} ({pair.get('method')})")
        return ", ".join(texts), "; ".join(tips)

    def pairs_rows(self, task) -> list[list]:
        rows = []
        for (t, protocol, frac), by_seed in sorted(self.by_key.items()):
            if t != str(task):
                continue
            for seed, c in sorted(by_seed.items()):
                for pair in c.get("pairs") or []:
                    best = c.get("best")
                    rows.append([protocol, _frac(frac), seed, c.get("metric"), pair.get("a"), pair.get("b"),
                                 _fmt_value(pair.get("value_a")), _fmt_value(pair.get("value_b")),
                                 _ci(pair.get("difference"), pair.get("ci_low"), pair.get("ci_high")),
                                 _fmt_p(pair.get("p_value")), pair.get("method"),
                                 best if best in (pair.get("a"), pair.get("b")) else ""])
        return rows


def _value_cell(r, metric: str, bold: bool = False, primary: bool = False) -> str:
    cls = "num" + (" primary" if primary else "") + (" best" if bold else "")
    return f"<td class='{cls}'>{escape(_summary_text(r, metric))}</td>"


def _pick_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Per protocol/model: rows of its largest label fraction (all seeds)."""
    largest = df.groupby(["protocol", "model"])["fraction"].transform("max")
    return df[df["fraction"] == largest]


def _first_seed(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values("seed").groupby(["protocol", "model"], as_index=False, sort=False).head(1)


def _scroll(html: str) -> str:
    return f"<div class='scroll'>{html}</div>"


# ---------------------------------------------------------------- task sections
def _results_table(info: TaskInfo, sig: Significance) -> str:
    keys = ["protocol", "fraction", "model"]
    with_p = sig.has_task(info.name)
    metrics = [info.primary] + info.key_metrics
    summary = info.order(summarise(info.internal, metrics, keys))
    best_in_group = {}
    for (protocol, frac), g in summary.groupby(["protocol", "fraction"]):
        vals = g[info.primary].dropna()
        if len(vals):
            best_in_group[(protocol, _pkey(frac))] = (vals.idxmin() if info.lower_is_better(info.primary)
                                                      else vals.idxmax())
    rows = []
    for idx, r in summary.iterrows():
        text, tip = sig.cell(info.name, r["protocol"], r["fraction"], r["model"])
        sig_cell = (f"<td class='num{' sig' if '*' in text else ''}' title='{escape(tip, quote=True)}'>"
                    f"{escape(text) if text else '&ndash;'}</td>")
        bold = best_in_group.get((r["protocol"], _pkey(r["fraction"]))) == idx
        row = [r["protocol"], _frac(r["fraction"]), r["model"], int(r["n_seeds"]),
               None if pd.isna(r["n_cases"]) else int(round(r["n_cases"])),
               _value_cell(r, info.primary, bold=bold, primary=True)] + ([sig_cell] if with_p else [])
        row += [_value_cell(r, m) for m in info.key_metrics]
        rows.append(row)
    arrow = lambda m: f"{m} {'↓' if info.lower_is_better(m) else '↑'}"  # noqa: E731
    header = ["protocol", "fraction", "model", "seeds", "n", arrow(info.primary)] + (["p vs best"] if with_p else [])
    header += [arrow(m) for m in info.key_metrics]
    return _scroll(_table(header, rows, classes={5: "primary"}))


def _all_metrics_table(info: TaskInfo, frame: pd.DataFrame) -> str:
    keys = ["protocol", "fraction", "model"]
    summary = info.order(summarise(frame, info.metrics, keys))
    rows = [[r["protocol"], _frac(r["fraction"]), r["model"], int(r["n_seeds"])]
            + [_value_cell(r, m, primary=m == info.primary) for m in info.metrics] for _, r in summary.iterrows()]
    return _scroll(_table(["protocol", "fraction", "model", "seeds"] + info.metrics, rows))


def _curves(info: TaskInfo, eval_set: str, picked: pd.DataFrame) -> str:
    runs = []
    rows = info.order(_first_seed(picked[picked["eval_set"] == eval_set]))
    for _, r in rows.iterrows():
        d = load_metrics_json(r["path"]) or {}
        ttype = d.get("task_type") or r.get("task_type") or info.type
        classes = d.get("classes") or list(r.get("classes") or ())
        inputs = figures.read_curve_inputs(r.get("predictions"), ttype, len(classes) or None)
        pr = figures.macro_pr(*inputs, ttype) if inputs is not None else None
        runs.append({"label": f"{r['model']} ({r['protocol']}, {_frac(r['fraction'])})", "metrics": d, "pr": pr,
                     **info.style(r["protocol"], r["model"])})
    if not runs or not any((r["metrics"].get("roc") or r["pr"] is not None) for r in runs):
        return ""
    average = "macro over signs" if info.type == "multilabel" else "macro one-vs-rest"
    png = figures.roc_pr_figure(runs, f"{info.name}: {eval_set} test set", average)
    return _img(png, f"ROC and precision-recall curves on the {eval_set} set: each model/protocol at its largest "
                     "label fraction, first seed. Legend: point AUROC/AUPR of that run.")


def _confusions(info: TaskInfo, picked: pd.DataFrame) -> str:
    imgs = []
    internal = info.order(picked[picked["eval_set"] == "internal"])
    for (protocol, model), group in internal.groupby(["protocol", "model"], sort=False):
        total, classes, per_sign = None, None, {}
        for d in (load_metrics_json(p) for p in group["path"]):
            if not d:
                continue
            if d.get("confusion_matrix"):
                cm = np.asarray(d["confusion_matrix"], dtype=int)
                total = cm if total is None else total + cm
                classes = d.get("classes") or list(range(cm.shape[0]))
            for sign, cm in (d.get("confusion_per_class") or {}).items():
                cm = np.asarray(cm, dtype=int)
                per_sign[sign] = cm if sign not in per_sign else per_sign[sign] + cm
        frac = _frac(group["fraction"].iloc[0])
        title = f"{model} ({protocol}), fraction {frac}"
        caption = f"{title}, internal test set; summed over {len(group)} seed(s)."
        if total is not None:
            imgs.append(_img(figures.confusion_figure(total, classes, title), caption,
                             280 if len(classes) <= 3 else 360))
        elif per_sign:
            imgs.append(_img(figures.multilabel_confusion_figure(per_sign, title), caption + " Threshold 0.5.",
                             min(1150, 210 * len(per_sign) + 60)))
    return "<div class='figs'>" + "".join(imgs) + "</div>" if imgs else ""


def _calibration(info: TaskInfo, picked: pd.DataFrame) -> str:
    if info.type not in ("binary", "multiclass", "ordinal"):
        return ""
    runs, n_bins = [], 15
    rows = info.order(_first_seed(picked[picked["eval_set"] == "internal"]))
    for _, r in rows.iterrows():
        d = load_metrics_json(r["path"]) or {}
        n_bins = int(d.get("ece_bins") or n_bins) if isinstance(d.get("ece_bins"), (int, float)) else n_bins
        classes = d.get("classes") or list(r.get("classes") or ())
        inputs = figures.read_curve_inputs(r.get("predictions"), d.get("task_type") or info.type,
                                           len(classes) or None)
        if inputs is None:
            continue
        ece = (r.get("ece", math.nan), r.get("ece_lo", math.nan), r.get("ece_hi", math.nan))
        runs.append({"label": f"{r['model']} ({r['protocol']}, {_frac(r['fraction'])})", "y": inputs[0],
                     "probs": inputs[1], "ece": ece, **info.style(r["protocol"], r["model"])})
    if not runs:
        return ""
    png = figures.reliability_figure(runs, n_bins, f"{info.name}: reliability (internal test set)")
    return ("<h3>Calibration</h3><div class='figs'>" + _img(
        png, f"Accuracy vs mean top-1 confidence in {n_bins} equal-width bins (the bins of the ECE); below the "
             "diagonal = overconfident. Largest label fraction, first seed; legend: ECE [95% bootstrap CI].", 520)
        + "</div>")


def _external_map(info: TaskInfo, dataset: str) -> dict | None:
    """The label map of an external set declared with ``{dataset, classes, map}`` (else None)."""
    for e in info.spec.external if info.spec else ():
        if e.dataset == dataset and e.map:
            return {"classes": list(e.classes), "map": dict(e.map)}
    return None


def mapped_internal(rows: pd.DataFrame, mapping: dict, ext_type: str, metric: str) -> pd.DataFrame:
    """Internal test predictions re-scored in an external set's label scheme: probabilities of the
    classes mapped onto one external class are summed (renormalised over mapped classes), labels
    are mapped, and ``metric`` of ``ext_type`` is computed per run (point value)."""
    from ..evaluate.metrics import compute_metrics

    out = []
    ext_classes = mapping["classes"]
    for _, r in rows.iterrows():
        classes = list(r.get("classes") or ())
        inputs = figures.read_curve_inputs(r.get("predictions"), r.get("task_type"), len(classes) or None)
        if inputs is None:
            continue
        y, p = inputs
        target = np.array([ext_classes.index(mapping["map"][c]) if mapping["map"].get(c) in ext_classes else -1
                           for c in classes])
        new = np.zeros((p.shape[0], len(ext_classes)))
        for j in range(len(ext_classes)):
            new[:, j] = p[:, target == j].sum(axis=1)
        keep = target[y] >= 0
        sums = new.sum(axis=1, keepdims=True)
        new = np.divide(new, sums, out=np.full_like(new, 1 / len(ext_classes)), where=sums > 0)
        try:
            value = compute_metrics(target[y][keep], new[keep], ext_type).get(metric, math.nan)
        except (ValueError, KeyError):
            value = math.nan
        out.append({"protocol": r["protocol"], "model": r["model"], "fraction": r["fraction"], "seed": r["seed"],
                    metric: value, f"{metric}_lo": math.nan, f"{metric}_hi": math.nan, "n": keep.sum()})
    return pd.DataFrame(out)


def _external_section(info: TaskInfo) -> str:
    df = info.df
    ext_sets = sorted(e for e in df["eval_set"].dropna().unique() if e != "internal")
    if not ext_sets:
        return ""
    parts = ["<h3>External validation</h3>"]
    keys = ["protocol", "fraction", "model"]
    table_rows, fig_rows = [], []
    details, notes = [], []
    int_classes = tuple(info.internal["classes"].iloc[0]) if len(info.internal) else ()
    for ext in ext_sets:
        ext_df = df[df["eval_set"] == ext]
        ext_classes = tuple(ext_df["classes"].iloc[0]) if len(ext_df) else ()
        mapping = _external_map(info, ext)
        same_scheme = mapping is None and (not ext_classes or not int_classes or ext_classes == int_classes)
        if same_scheme:
            metric, internal, note = info.primary, info.internal, ""
        else:
            types = ext_df["task_type"].dropna()
            ext_type = types.iloc[0] if len(types) else ("binary" if len(ext_classes) == 2 else "multiclass")
            declared = ext_df["primary_metric"].dropna()
            metric = declared.iloc[0] if len(declared) else PRIMARY_METRIC.get(ext_type, info.primary)
            mapping = mapping or {"classes": list(ext_classes), "map": {}}
            internal = mapped_internal(info.internal, mapping, ext_type, metric) if mapping["map"] else pd.DataFrame()
            note = f"labels mapped to {' / '.join(mapping['classes'])}"
            notes.append(f"<b>{escape(ext)}</b>: evaluated in its own label scheme ({escape(note)}); metric "
                         f"{escape(metric)}; the internal column re-scores the internal test predictions in that "
                         "scheme (probabilities of merged classes summed)"
                         + ("" if mapping["map"] else " &ndash; not possible without a label map") + ".")
        ext_sum = summarise(ext_df, [metric], keys)
        int_sum = summarise(internal, [metric], keys) if len(internal) else None
        lower = info.lower_is_better(metric)
        for _, e in info.order(ext_sum).iterrows():
            i = None
            if int_sum is not None:
                match = int_sum[(int_sum["protocol"] == e["protocol"]) & (int_sum["model"] == e["model"])
                                & (int_sum["fraction"].map(_pkey) == _pkey(e["fraction"]))]
                i = match.iloc[0] if len(match) else None
            iv = i[metric] if i is not None else math.nan
            ev = e[metric]
            drop = (ev - iv) if lower else (iv - ev)
            rel = drop / abs(iv) if iv and not pd.isna(iv) else math.nan
            table_rows.append([ext, e["protocol"], _frac(e["fraction"]), e["model"], metric,
                               _value_cell(i, metric) if i is not None else None, _value_cell(e, metric),
                               f"<td class='num{' drop' if drop > 0 else ''}'>{escape(_fmt_value(drop))}</td>"
                               if not pd.isna(drop) else None,
                               f"{rel:+.1%}" if not pd.isna(rel) else None])
            fig_rows.append({"set": ext, "protocol": e["protocol"], "model": e["model"], "fraction": e["fraction"],
                             "metric": metric, "internal": iv, "external": ev,
                             "internal_lo": i[f"{metric}_lo"] if i is not None else None,
                             "internal_hi": i[f"{metric}_hi"] if i is not None else None,
                             "external_lo": e[f"{metric}_lo"], "external_hi": e[f"{metric}_hi"]})
        ext_info_metrics = [m for m in metric_names(ext_df) if ext_df[m].notna().any()]
        if ext_info_metrics:
            summary = info.order(summarise(ext_df, ext_info_metrics, keys))
            rows = [[r["protocol"], _frac(r["fraction"]), r["model"], int(r["n_seeds"])]
                    + [_value_cell(r, m) for m in ext_info_metrics] for _, r in summary.iterrows()]
            details.append(f"<details><summary>All metrics on {escape(ext)}</summary>"
                           + _scroll(_table(["protocol", "fraction", "model", "seeds"] + ext_info_metrics, rows))
                           + "</details>")
    parts.append(_scroll(_table(["external set", "protocol", "fraction", "model", "metric", "internal", "external",
                                 "drop", "relative drop"], table_rows)))
    parts.append("<p class='caption'>Drop = internal &minus; external (sign flipped for lower-is-better metrics: "
                 "positive = worse outside the training device); relative drop = drop / internal. Mean over seeds "
                 "&plusmn; 95% CI as in the results table." + "".join(f"<br>{n}" for n in notes) + "</p>")
    top = {}
    for r in fig_rows:
        key = (r["protocol"], r["model"])
        top[key] = max(top.get(key, r["fraction"]), r["fraction"])
    largest = [r for r in fig_rows if r["fraction"] == top[(r["protocol"], r["model"])]]
    plotted = [r for r in largest if not (pd.isna(r["internal"]) or pd.isna(r["external"]))]
    if plotted:
        for r in plotted:
            r["label"] = f"{r['model']} ({r['protocol']}) → {r['set']}"
        metric = plotted[0]["metric"]
        png = figures.external_drop_figure(plotted, f"{info.name}: internal vs external ({metric})", metric)
        parts.append("<div class='figs'>" + _img(png, "Internal (blue) vs external (red) at the largest label "
                                                    "fraction; mean over seeds with 95% CI.", 560) + "</div>")
    parts += details
    return "\n".join(parts)


def _retfound_table(info: TaskInfo) -> str:
    if info.type not in ("binary", "multiclass", "ordinal") or info.internal.empty:
        return ""
    records = []
    for _, r in info.internal.iterrows():
        d = load_metrics_json(r["path"]) or {}
        rec = {"protocol": r["protocol"], "model": r["model"], "fraction": r["fraction"]}
        for prefix, key in (("v1", "retfound_v1"), ("current", "retfound_current")):
            for k, v in (d.get(key) or {}).items():
                rec[f"{prefix} {k}"] = _num_or_nan(v)
        records.append(rec)
    frame = pd.DataFrame(records)
    cols = [c for c in frame.columns if c.startswith(("v1 ", "current "))]
    if not cols:
        return ""
    means = info.order(frame.groupby(["protocol", "fraction", "model"], as_index=False)[cols].mean())
    rows = [[r["protocol"], _frac(r["fraction"]), r["model"]] + [r[c] for c in cols] for _, r in means.iterrows()]
    return ("<details><summary>RETFound metric definitions (v1 paper-era and current code; mean over seeds) "
            "for comparison with published numbers</summary><p>As RETFound's code computes them: v1 measures "
            "are means over classes 1..K-1 that skip a class where the measure is 0/0; <code>aupr</code> "
            "averages all K classes, an absent class counting as AP 0; <code>auroc</code> averages the "
            "classes present.</p>"
            + _scroll(_table(["protocol", "fraction", "model"] + cols, rows)) + "</details>")


def _per_class(info: TaskInfo, picked: pd.DataFrame) -> str:
    """Per-class metrics (metrics.json ``per_class``) at the largest label fraction, mean over seeds."""
    records = []
    for _, r in picked[picked["eval_set"] == "internal"].iterrows():
        d = load_metrics_json(r["path"]) or {}
        for cls, entry in (d.get("per_class") or {}).items():
            if not isinstance(entry, dict):
                continue
            rec = {"protocol": r["protocol"], "fraction": r["fraction"], "model": r["model"], "class": str(cls)}
            for k, v in entry.items():
                if isinstance(v, dict) and "value" in v:
                    rec[k] = _num_or_nan(v["value"])
                elif k.startswith("n_") and isinstance(v, (int, float)):
                    rec[k] = v
            records.append(rec)
    if not records:
        return ""
    frame = pd.DataFrame(records)
    keys = ["protocol", "fraction", "model", "class"]
    cols = [c for c in frame.columns if c not in keys]
    cols = [c for c in cols if c.startswith("n_")] + [c for c in cols if not c.startswith("n_")]
    classes = list(dict.fromkeys(frame["class"]))
    means = frame.groupby(keys, as_index=False, sort=False)[cols].mean()
    means["_c"] = means["class"].map(classes.index)
    means = info.order(means.sort_values("_c", kind="stable"))
    rows = [[r["protocol"], _frac(r["fraction"]), r["model"], r["class"]] + [r[c] for c in cols]
            for _, r in means.iterrows()]
    table = _scroll(_table(["protocol", "fraction", "model", "class"] + cols, rows))
    what = "Per-class metrics (largest label fraction, internal test set, mean over seeds)"
    if info.type == "segmentation":
        return f"<h3>{what}</h3>" + table
    return f"<details><summary>{what}</summary>" + table + "</details>"


def _overlays(info: TaskInfo, picked: pd.DataFrame) -> str:
    """Example figures a run wrote next to its metrics.json (``"overlay": "overlay.png"``)."""
    imgs = []
    for _, r in info.order(_first_seed(picked[picked["eval_set"] == "internal"])).iterrows():
        d = load_metrics_json(r["path"]) or {}
        name = d.get("overlay")
        if not isinstance(name, str):
            continue
        path = Path(r["path"]).parent / name
        if path.is_file() and path.suffix.lower() == ".png":
            imgs.append(_img(path.read_bytes(), f"{r['model']} ({r['protocol']}), fraction {_frac(r['fraction'])}, "
                                                f"seed {int(r['seed'])}: test images with predicted masks ({name}).",
                             380))
    return "<h3>Examples</h3><div class='figs'>" + "".join(imgs) + "</div>" if imgs else ""


def _num_or_nan(v) -> float:
    try:
        return float(v) if v is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def _task_section(task: str, settings: ReportSettings, df: pd.DataFrame, sig: Significance,
                  saliency: dict) -> str:
    parts = [f"<h2 id='{_anchor(task)}'>Task: {escape(str(task))}</h2>"]
    spec = settings.task(task)
    info = TaskInfo(task, spec, df, settings)
    label = spec.label if spec else None
    label = ", ".join(map(str, label)) if isinstance(label, tuple) else label
    desc = ", ".join(f"{k} <b>{escape(str(v))}</b>" for k, v in
                     (("dataset", spec.dataset if spec else None), ("label", label), ("type", info.type)) if v)
    if info.primary:
        desc += (f"{'; ' if desc else ''}primary metric <b>{escape(info.primary)}</b> "
                 f"({'lower' if info.lower_is_better(info.primary) else 'higher'} is better)")
    parts.append(f"<p>{desc}.</p>")
    if df.empty or info.internal.empty:
        parts.append("<p class='muted'>No results for this task yet.</p>")
        return "\n".join(parts)
    absent = sorted({c for t in info.internal["absent_classes"] for c in (t or ())})
    if absent:
        parts.append(f"<p class='warn'>Classes without test cases in some runs: {escape(', '.join(absent))} "
                     "(left out of macro AUROC/AUPR; see metrics.json <code>absent_classes</code>).</p>")
    parts.append("<h3>Results (internal test set)</h3>" + _results_table(info, sig))
    caption = ("Per protocol, label fraction and model: mean over seeds &plusmn; half-width of the 95% CI across "
               "seeds (t interval), or, with one seed, the value [95% bootstrap CI]; &uarr;/&darr;: higher/lower is "
               "better. Bold: best mean of the primary metric at that protocol and fraction.")
    n_seeds = info.internal.groupby(["protocol", "fraction", "model"])["seed"].nunique()
    if (n_seeds == 2).any():
        caption += (" With 2 seeds the t multiplier is 12.7, so those intervals are very wide (and may run past the "
                    "metric's range): add seeds for a usable estimate of training variability.")
    if sig.has_task(task):
        caption += (" <b>p vs best</b>: one p-value per seed for the difference between this model and the best "
                    "model of that seed on the same test images (DeLong for binary AUROC, paired bootstrap "
                    "otherwise; * p &lt; 0.05; hover for the difference and its CI; &ndash; = no comparison).")
    else:
        caption += " No paired model comparisons for this task (one model, or a segmentation task)."
    parts.append(f"<p class='caption'>{caption}</p>")
    if len(info.metrics) > len(info.key_metrics) + 1:
        parts.append("<details><summary>All metrics</summary>" + _all_metrics_table(info, info.internal)
                     + "</details>")
    pair_rows = sig.pairs_rows(task)
    if pair_rows:
        parts.append("<details><summary>All pairwise comparisons</summary>" + _scroll(_table(
            ["protocol", "fraction", "seed", "metric", "model a", "model b", "a", "b", "a − b [95% CI]", "p",
             "method", "best"], pair_rows)) + "</details>")
    parts.append(_retfound_table(info))

    picked = _pick_runs(df)
    parts.append(_per_class(info, picked))
    parts.append(_overlays(info, picked))
    eval_sets = sorted(df["eval_set"].unique(), key=lambda e: (e != "internal", e))
    curves = [c for c in (_curves(info, e, picked) for e in eval_sets) if c]
    if curves:
        parts.append("<h3>ROC and precision-recall curves</h3><div class='figs'>" + "".join(curves) + "</div>")
    confusions = _confusions(info, picked)
    if confusions:
        parts.append("<h3>Confusion matrices (largest label fraction, internal test set)</h3>" + confusions)
    n_fracs = info.internal["fraction"].nunique()
    if info.primary and n_fracs > 1:
        png = figures.label_efficiency_figure(df, task, info.primary, ["internal"], info.models, info.protocols)
        parts.append("<h3>Label efficiency</h3><div class='figs'>" + _img(
            png, f"{info.primary} on the internal test set vs the fraction of training labels; line = mean over "
                 "seeds, bars/band = 95% CI across seeds (bootstrap CI where there is one seed).") + "</div>")
    parts.append(_external_section(info))
    parts.append(_calibration(info, picked))
    if task in saliency:
        png_path, meta = saliency[task]
        run = meta.get("run") or "the first pretrained model, largest fraction, first seed"
        parts.append("<h3>Saliency maps</h3><div class='figs'>" + _img(
            Path(png_path).read_bytes(),
            f"{run}: per class a few test images, each as the image, its attention rollout (where the average-"
            "pooled representation draws from, class-agnostic) and its Grad-CAM for the predicted class (last "
            "block's patch tokens). Red title: misclassified. Maps show where the model looks, not why.")
            + "</div>")
    return "\n".join(p for p in parts if p)


def _summary_section(tasks: list[str], settings: ReportSettings, results: pd.DataFrame, sig: Significance) -> str:
    parts = ["<h2 id='summary'>Summary</h2>"]
    rows = []
    for task in tasks:
        df = results[results["task"] == task] if not results.empty else results
        if df.empty:
            continue
        info = TaskInfo(task, settings.task(task), df, settings)
        if info.internal.empty or not info.primary:
            continue
        summary = summarise(info.internal, [info.primary], ["protocol", "fraction", "model"])
        for protocol in info.protocols:
            s = summary[summary["protocol"] == protocol]
            if s.empty:
                continue
            s = s[s["fraction"] == s["fraction"].max()].dropna(subset=[info.primary])
            if s.empty:
                continue
            s = s.sort_values(info.primary, ascending=info.lower_is_better(info.primary))
            best = s.iloc[0]
            second = s.iloc[1] if len(s) > 1 else None
            text = sig.cell(task, protocol, best["fraction"], second["model"])[0] if second is not None else ""
            rows.append([task, info.primary, protocol, _frac(best["fraction"]), int(best["n_seeds"]), best["model"],
                         _value_cell(best, info.primary, primary=True),
                         second["model"] if second is not None else None,
                         _value_cell(second, info.primary) if second is not None else None,
                         f"<td class='num{' sig' if '*' in text else ''}'>{escape(text) if text else '&ndash;'}</td>"])
    if not rows:
        parts.append("<p class='muted'>No results yet.</p>")
        return "\n".join(parts)
    parts.append(_scroll(_table(["task", "metric", "protocol", "fraction", "seeds", "best model", "value",
                                 "runner-up", "value", "p runner-up vs best"], rows, classes={6: "primary"})))
    parts.append("<p class='caption'>Per task and protocol at the largest label fraction, the two best models by "
                 "mean primary metric on the internal test set; p-values per seed (* p &lt; 0.05; &ldquo;best&rdquo; "
                 "where the runner-up was best on that seed's test set).</p>")
    return "\n".join(parts)


def _pretrain_section(results_dir: Path) -> str:
    parts = ["<h2 id='pretrain'>Pretraining</h2>"]
    pre = collect_pretrain(results_dir)
    if pre.empty:
        parts.append("<p class='muted'>No pretraining outputs found.</p>")
        return "\n".join(parts)
    rows = [[r.method, r.modality, r.epochs, r.final_loss, r.seconds] for r in pre.itertuples()]
    parts.append(_table(["method", "modality", "epochs", "final loss", "train seconds"], rows))
    imgs = []
    logs = {f"{r.method}/{r.modality}": r.log_csv for r in pre.itertuples() if r.log_csv}
    if logs:
        imgs.append(
            _img(
                figures.pretrain_loss_figure(logs),
                "MAE training loss per epoch (reconstruction error on masked patches).",
            )
        )
    for r in pre.itertuples():
        if r.figure_png:
            imgs.append(_img(Path(r.figure_png).read_bytes(), f"{r.method}/{r.modality}: reconstructions (MAE) or training views"))
    parts.append("<div class='figs'>" + "".join(imgs) + "</div>")
    return "\n".join(parts)




def _hms(seconds: float) -> str:
    if seconds is None or math.isnan(seconds):
        return ""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _hours(value) -> float | None:
    return None if value is None or pd.isna(value) else round(float(value), 4)


def _sum(values: pd.Series) -> float:
    """Sum that stays NaN when nothing was recorded (benchmarks write ``-`` for unknown values)."""
    return values.sum(min_count=1)


def _cost_section(benchmarks_dir: Path | None, settings: ReportSettings) -> str:
    parts = ["<h2 id='cost'>Compute cost</h2>"]
    cost = cost_frame(benchmarks_dir, settings.gpus)
    if cost.empty:
        parts.append("<p class='muted'>No benchmark files found.</p>")
        return "\n".join(parts)
    has_cpu = cost["cpu_h"].notna().any()
    tot = [cost["wall_h"].sum(), _sum(cost["cpu_h"]), cost["gpu_h"].sum()]
    parts.append(f"<p>{len(cost)} jobs: <b>{_hms(tot[0] * 3600)}</b> of job wall time (sum over jobs), "
                 f"<b>{_hours(tot[1]) if has_cpu else 'n/a'}</b> CPU-hours, <b>{_hours(tot[2])}</b> GPU-hours.</p>")
    by_step = cost.groupby("step").agg(jobs=("job", "count"), s=("s", "sum"), cpu_h=("cpu_h", _sum),
                                       gpu_h=("gpu_h", "sum"), gpus=("gpus", "max"), rss=("max_rss_mb", "max"))
    by_step = by_step.sort_values("s", ascending=False)
    parts.append("<h3>By step</h3>" + _table(
        ["step", "jobs", "seconds", "h:m:s", "CPU-hours", "GPUs per job", "GPU-hours", "peak RSS (MB)"],
        [[k, int(r.jobs), round(r.s, 1), _hms(r.s), _hours(r.cpu_h) if has_cpu else None, r.gpus, _hours(r.gpu_h),
          None if pd.isna(r.rss) else round(r.rss, 1)] for k, r in by_step.iterrows()]))
    runs = cost[cost["model"].notna()]
    if not runs.empty:
        by_model = runs.groupby("model").agg(jobs=("job", "count"), s=("s", "sum"), cpu_h=("cpu_h", _sum),
                                             gpu_h=("gpu_h", "sum"))
        pre = cost[cost["step"] == "pretrain"]
        rows = []
        for model, r in by_model.sort_values("s", ascending=False).iterrows():
            m = settings.model(model)
            run = m.pretrain_run if m else None  # benchmarks/pretrain/<run>_<modality>.tsv
            mine = pre[pre["job"].str.startswith(f"pretrain/{run}_")] if run else pre.iloc[0:0]
            rows.append([model, int(r.jobs), round(r.s, 1), _hms(r.s), _hours(r.cpu_h) if has_cpu else None,
                         _hours(r.gpu_h), f"{run}: {_hms(mine['s'].sum())}, {_hours(mine['gpu_h'].sum())} GPU-h"
                         if len(mine) else None])
        parts.append("<h3>By model (downstream training, prediction and evaluation)</h3>" + _table(
            ["model", "jobs", "seconds", "h:m:s", "CPU-hours", "GPU-hours", "pretraining it starts from"], rows))
    parts.append("<p class='caption'>From Snakemake benchmark files (<code>benchmarks/</code>): wall seconds "
                 "<code>s</code> and <code>cpu_time</code> per job. GPU-hours = wall time &times; the GPUs the "
                 "rule requests in the config (<code>resources.pretrain</code> / <code>resources.finetune</code> "
                 "gpu &times; nodes); rules that request no GPU count 0.</p>")
    rows = [[r.job, round(r.s, 2), _hms(r.s), _hours(r.cpu_h), _hours(r.gpu_h), r.max_rss_mb]
            for r in cost.sort_values("s", ascending=False).itertuples()]
    total_s = float(cost["s"].sum())
    peak = cost["max_rss_mb"].max()
    total = ["total (sum of job times; peak RSS)", round(total_s, 1), _hms(total_s), _hours(tot[1]),
             _hours(tot[2]), None if pd.isna(peak) else peak]
    parts.append("<details><summary>All jobs</summary>" + _table(
        ["job", "seconds", "h:m:s", "CPU-hours", "GPU-hours", "max RSS (MB)"], rows, total=total) + "</details>")
    return "\n".join(parts)


HOW_TO_READ = """
<h2 id='how'>How to read this report</h2>
<div class='note'><p><b>Intervals.</b> A single run's metric is shown as <code>value [low, high]</code>: the value on
the full test set and a 95% percentile-bootstrap confidence interval (test cases resampled with replacement,
{n_boot} times, seed {boot_seed}: <code>evaluate</code> in the config), which describes uncertainty from the finite
test set only. With several seeds the tables show
<code>mean &plusmn; h</code>: the mean over seeds and the half-width of the 95% t interval of that mean, which
also covers training randomness (initialisation, label subset, augmentation); with few seeds it is wide.</p>
<p><b>Significance.</b> Models of one protocol, label fraction and seed are trained on the same images and tested
on the same test images, so they are compared pairwise: DeLong's test for a binary AUROC, a seeded paired bootstrap
for every other metric. The p vs best column gives, per seed, the p-value of the best model of that seed against
this model; overlapping intervals alone do not show two models are equal, and no correction for multiple
comparisons is applied.</p>
<p><b>Metrics.</b> Multiclass AUROC/AUPR are macro one-vs-rest averages over the classes present in the test set
(multilabel: over the signs with positive and negative cases): a class without test cases is left out of the value
and of every bootstrap replicate (blank in the per-class tables), not counted as AP 0 as scikit-learn's macro
average precision does (the RETFound <code>aupr</code> columns keep that AP-0 convention; metrics.json
<code>conventions</code>);
QWK (quadratic-weighted kappa) is the primary metric for ordinal grading; ECE (expected calibration error, 15
bins of top-1 confidence) is lower-is-better. External sets come from a different device and show how well a
model transfers; the drop is internal minus external.</p></div>
"""


def build_report(results_dir, benchmarks_dir, settings: ReportSettings, out_path) -> Path:
    """Write the self-contained HTML report of the results under ``results_dir`` (a
    :class:`retflow.layout.Layout` root) to ``out_path`` (atomically) and return its path.

    ``settings``: what the report reads of the config (:func:`retflow.settings.report.report`)."""
    results_dir = Path(results_dir)
    results = collect_results(results_dir)
    sig = Significance(collect_compare(results_dir))
    saliency = collect_saliency(results_dir)
    tasks = [t.name for t in settings.tasks]
    if not results.empty:
        tasks += [t for t in sorted(results["task"].dropna().unique()) if t not in tasks]
    synth = settings.synth_modalities
    body = [
        "<h1>retflow report</h1>",
        f"<p>Generated {escape(datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC'))} from "
        f"<code>{escape(str(results_dir))}</code>; {len(results)} evaluation result(s).</p>",
        "<nav><ul><li><a href='#summary'>Summary</a></li>"
        + "".join(f"<li><a href='#{_anchor(t)}'>Task: {escape(str(t))}</a></li>" for t in tasks)
        + "<li><a href='#pretrain'>Pretraining</a></li>" + synth_nav_item(results_dir, synth)
        + "<li><a href='#qc'>Data QC</a></li>"
        "<li><a href='#cost'>Compute cost</a></li><li><a href='#config'>Configuration</a></li>"
        "<li><a href='#how'>How to read this report</a></li></ul></nav>",
        _summary_section(tasks, settings, results, sig),
    ]
    for task in tasks:
        sub = results[results["task"] == task] if not results.empty else results
        try:
            body.append(_task_section(task, settings, sub, sig, saliency))
        except Exception as exc:  # noqa: BLE001 - one broken task must not cost the whole report
            body.append(f"<h2 id='{_anchor(task)}'>Task: {escape(str(task))}</h2>"
                        f"<p class='warn'>This section could not be built: {escape(repr(exc))}</p>")
            print(f"WARNING: task {task}: {exc!r}", file=sys.stderr)
    body += [
        _pretrain_section(results_dir),
        synth_section(results_dir, synth),  # '' without synthetic outputs
        _qc_section(results_dir),
        _cost_section(Path(benchmarks_dir) if benchmarks_dir else None, settings),
        _config_section(settings),
        HOW_TO_READ.format(n_boot=settings.evaluate.n_boot, boot_seed=settings.evaluate.seed),
    ]
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>retflow report</title><style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    write_text(page, out_path)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out_path, 0o666 & ~umask)  # the temporary file of the atomic write is private (0600)
    return Path(out_path)
