"""Build the single-file HTML report (inline CSS, figures as base64 data URIs, no JS, no external assets).

Three steps: :mod:`~retflow.report.collect` reads the report rule's declared inputs
(:class:`~retflow.report.collect.ReportInputs`) into frames, :mod:`~retflow.report.model` computes
what the report says (headline, estimates, verdicts, chance flags), and this module lays it out as
tables and figures (:mod:`~retflow.report.view`) that the Jinja2 templates in ``templates/``
render, autoescaped. :func:`build_report` takes the inputs and the report's settings
(:class:`retflow.settings.report.ReportSettings`); command line: :mod:`retflow.report.cli`.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from ..atomic import write_text
from ..preflight_data import pool_note
from ..settings.report import ExternalSet, ReportSettings
from . import figures, fmt
from . import model as rmodel
from .collect import (
    ReportInputs,
    as_float,
    collect_compare,
    collect_fusion,
    collect_leakage,
    collect_pretrain,
    collect_qc,
    collect_quarantine,
    collect_quarantine_examples,
    collect_results,
    collect_saliency,
    cost_frame,
    inputs_of,
    job_step,  # noqa: F401 - re-exported (older callers)
    load_metrics_json,
    metric_names,
)
from .model import KEY_METRICS, Significance, TaskInfo, mapped_internal, summarise  # noqa: F401 - re-exported
from .synth_section import synth_view
from .view import Cell, estimate_text, figure, fold_values_text, kfold_text, summary_text, table

ALPHA = fmt.ALPHA


def _anchor(name: str) -> str:
    return "task-" + "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in str(name))


def _hours(value) -> float | None:
    return None if value is None or pd.isna(value) else round(float(value), 4)


def _sum(values: pd.Series) -> float:
    """Sum that stays NaN when nothing was recorded (benchmarks write ``-`` for unknown values)."""
    return values.sum(min_count=1)


def _arrow(info: TaskInfo, m: str) -> str:
    return f"{fmt.metric_label(m)} {'↓' if info.lower_is_better(m) else '↑'}"


def _value_cell(r, metric: str, bold: bool = False, primary: bool = False) -> Cell:
    cls = "num" + (" primary" if primary else "") + (" best" if bold else "")
    return Cell(summary_text(r, metric), cls)


def _pick_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Per protocol/model: rows of its largest label fraction (all seeds)."""
    largest = df.groupby(["protocol", "model"])["fraction"].transform("max")
    return df[df["fraction"] == largest]


def _first_seed(df: pd.DataFrame) -> pd.DataFrame:
    """Per protocol/model: the run of its first seed (cross-validation: of its first fold)."""
    order = ["fold", "seed"] if rmodel.is_folded(df) else ["seed"]
    return df.sort_values(order).groupby(["protocol", "model"], as_index=False, sort=False).head(1)


def _first_run_words(df: pd.DataFrame) -> str:
    """How a figure of one run per model names it: "first seed" (cross-validation: "fold 0, first seed")."""
    if rmodel.is_folded(df):
        return f"fold {int(df['fold'].dropna().min())}, first seed"
    return "first seed"


def _run_words(r) -> str:
    """One run's coordinates below its fraction: "seed 0" or "fold 1, seed 0"."""
    fold = r.get("fold")
    return f"seed {int(r['seed'])}" if fold is None or pd.isna(fold) else f"fold {int(fold)}, seed {int(r['seed'])}"


def _units_header(summary: pd.DataFrame) -> str:
    """The count column of a :func:`summarise` table: "seeds", or "folds" for cross-validated runs."""
    return "folds" if len(summary) and (summary["unit"] == "fold").all() else "seeds"


# ---------------------------------------------------------------- significance cells
def sig_cell(sig: Significance, task, protocol, fraction, model) -> tuple[str, str]:
    """(text, tooltip) of ``model``'s significance vs the best model, one entry per seed (cross-validation:
    per fold)."""
    texts, tips = [], []
    for unit, c in sig.runs(task, protocol, fraction):
        if model not in (c.get("models") or []):
            continue
        best = c.get("best")
        if best is None:
            texts.append("n/a")
            continue
        if best == model:
            texts.append("best")
            tips.append(f"{unit}: best by {fmt.metric_label(c.get('metric'))}")
            continue
        pair = next((p for p in c.get("best_vs_rest") or [] if p.get("b") == model), None)
        p = pair.get("p_value") if pair else None
        texts.append(fmt.p_value(p))
        if pair:
            tips.append(f"{unit}: {best} - {model} = {fmt.value(pair.get('difference'))} "
                        f"{fmt.interval(pair.get('ci_low'), pair.get('ci_high'))}, "
                        f"p {fmt.p_value(p)} ({pair.get('method')})")
    return ", ".join(texts), "; ".join(tips)


def _sig_cell(sig, task, protocol, fraction, model) -> Cell:
    text, tip = sig_cell(sig, task, protocol, fraction, model)
    return Cell(text or "–", "num" + (" sig" if "*" in text else ""), tip)


def pairs_rows(sig: Significance, task) -> list[list]:
    rows = []
    for protocol, frac in sig.keys(task):
        for unit, c in sig.runs(task, protocol, frac):
            for pair in c.get("pairs") or []:
                best = c.get("best")
                rows.append([protocol, fmt.frac(frac), unit.removeprefix("seed "), fmt.metric_label(c.get("metric")), pair.get("a"),
                             pair.get("b"), fmt.value(pair.get("value_a")), fmt.value(pair.get("value_b")),
                             fmt.with_ci(pair.get("difference"), pair.get("ci_low"), pair.get("ci_high")),
                             fmt.p_value(pair.get("p_value")), pair.get("method"),
                             best if best in (pair.get("a"), pair.get("b")) else ""])
    return rows


# ---------------------------------------------------------------- headline
def _headline_row(h: rmodel.Headline) -> dict:
    def comparison(c: rmodel.Comparison | None) -> dict | None:
        if c is None:
            return None
        return {"fraction": fmt.percent(c.fraction), "verdict": c.verdict, "verdict_text": c.verdict_text,
                "helps": c.verdict == rmodel.HELPS, "worse": c.verdict == rmodel.SCRATCH_BETTER,
                "difference": estimate_text(c.difference, fmt.signed, h.unit),
                "pretrained": estimate_text(c.pretrained, unit=h.unit),
                "baseline": estimate_text(c.baseline, unit=h.unit),
                "chance": list(c.never_left_chance)}

    return {
        "task": h.task, "anchor": _anchor(h.task), "metric": h.metric_label, "lower": h.lower_is_better,
        "protocol": h.protocol, "pretrained": h.pretrained, "baseline": h.baseline, "note": h.note,
        "alone": estimate_text(h.alone) if h.alone is not None else None,
        "smallest": comparison(h.smallest), "largest": comparison(h.largest),
        "matching": None if h.matching_fraction is None else fmt.percent(h.matching_fraction),
        "baseline_full": None if h.baseline_full is None else fmt.value(h.baseline_full),
        "full_fraction": None if h.full_fraction is None else fmt.percent(h.full_fraction),
        "several_fractions": h.largest is not None,
        "external": [{"dataset": e.dataset, "metric": fmt.metric_label(e.metric), "change": fmt.signed(e.change),
                      "internal": fmt.value(e.internal), "external": fmt.value(e.external)} for e in h.external],
        "references": [{"metric": fmt.metric_label(r.metric), "value": fmt.value(r.value),
                        "ours": estimate_text(r.ours), "source": r.source} for r in h.references],
    }


# ---------------------------------------------------------------- configuration
def _external_text(ext: ExternalSet) -> str:
    """``cfp_device_b`` or ``cfp_device_b (0, 1 -> non_referable; 2, 3, 4 -> referable)``."""
    text = ext.dataset
    if ext.map:
        groups: dict = {}
        for src, dst in ext.map.items():
            groups.setdefault(dst, []).append(src)
        text += " (" + "; ".join(f"{', '.join(v)} → {k}" for k, v in groups.items()) + ")"
    return text


def _config_view(settings: ReportSettings) -> dict:
    rows = []
    for ds in settings.datasets:
        ph = ds.phantom
        origin = f"phantom {ph['kind']} n={ph['n']} style {ph['style']}" if ph else ds.path
        rows.append([ds.name, ds.modality, ds.role, ds.source, origin])
    datasets = table(["dataset", "modality", "role", "source", "origin"], rows)
    rows = []
    for t in settings.tasks:
        grid = [f"protocols {', '.join(t.protocols)}", f"fractions {', '.join(map(fmt.frac, t.fractions))}",
                f"seeds {', '.join(map(str, t.seeds))}"]
        primary = rmodel.PRIMARY_METRIC.get(t.type, "dice" if t.type == "segmentation" else None)
        rows.append([t.name, t.dataset, ", ".join(map(str, t.label)) if isinstance(t.label, tuple) else t.label,
                     t.type, ", ".join(t.classes), "; ".join(_external_text(e) for e in t.external) or None,
                     fmt.metric_label(primary) if primary else None, "; ".join(grid),
                     "; ".join(f"{fmt.metric_label(k)} {v}" for k, v in t.reference.items()) if t.reference
                     else None])
    tasks = table(["task", "dataset", "label", "type", "classes", "external sets", "primary metric", "runs",
                   "published reference"], rows)
    models = table(["model", "init", "method / weights"], [[m.name, m.init, m.method or m.path] for m in settings.models])
    grid = table(["setting", "values"], [["protocols", ", ".join(settings.protocols)],
                                         ["fractions", ", ".join(map(fmt.frac, settings.fractions))],
                                         ["seeds", ", ".join(map(str, settings.seeds))],
                                         ["report.chance_margin", settings.chance_margin]])
    sections = [{"name": s.name, "table": table(["key", "value"], [[k, v] for k, v in s.values.items()])}
                for s in settings.sections]
    return {"datasets": datasets, "tasks": tasks, "models": models, "grid": grid, "sections": sections}


# ---------------------------------------------------------------- data QC
def _qc_view(inputs: ReportInputs) -> dict:
    qc = collect_qc(inputs)
    quarantine = collect_quarantine(inputs)
    view = {"prepared": table(list(qc.columns), qc.values.tolist()) if not qc.empty else None,
            "quarantine": None, "examples": None, "quarantine_path": inputs.layout.quarantine("<dataset>"),
            "pool_note": pool_note(inputs.results), "leaks": collect_leakage(inputs)}
    if not quarantine.empty:
        pivot = quarantine.pivot_table(index="dataset", columns="reason", values="count", aggfunc="sum", fill_value=0)
        pivot["total"] = pivot.sum(axis=1)
        view["quarantine"] = table(["dataset", *pivot.columns],
                                   [[ds, *map(int, vals)] for ds, vals in zip(pivot.index, pivot.values)])
        examples = collect_quarantine_examples(inputs)
        view["examples"] = table(list(examples.columns), examples.values.tolist())
    return view


# ---------------------------------------------------------------- task sections
def _results_table(info: TaskInfo, sig: Significance):
    keys = ["protocol", "fraction", "model"]
    with_p = sig.has_task(info.name)
    metrics = [info.primary] + info.key_metrics
    summary = info.order(summarise(info.internal, metrics, keys))
    epochs = {}
    if "best_epoch" in info.internal:
        for key, g in info.internal.sort_values("seed").groupby(keys):
            epochs[(key[0], rmodel.pkey(key[1]), key[2])] = ", ".join(fmt.epoch(v) for v in g["best_epoch"])
    best_in_group = {}
    for (protocol, frac), g in summary.groupby(["protocol", "fraction"]):
        vals = g[info.primary].dropna()
        if len(vals):
            best_in_group[(protocol, rmodel.pkey(frac))] = (vals.idxmin() if info.lower_is_better(info.primary)
                                                            else vals.idxmax())
    rows = []
    for idx, r in summary.iterrows():
        bold = best_in_group.get((r["protocol"], rmodel.pkey(r["fraction"]))) == idx
        row = [r["protocol"], fmt.frac(r["fraction"]), r["model"], int(r["n_seeds"]),
               None if pd.isna(r["n_cases"]) else int(round(r["n_cases"])),
               epochs.get((r["protocol"], rmodel.pkey(r["fraction"]), r["model"]), "–"),
               _value_cell(r, info.primary, bold=bold, primary=True)]
        row += [_sig_cell(sig, info.name, r["protocol"], r["fraction"], r["model"])] if with_p else []
        row += [_value_cell(r, m) for m in info.key_metrics]
        rows.append(row)
    header = ["protocol", "fraction", "model", _units_header(summary), "n", "kept epoch", _arrow(info, info.primary)]
    header += (["p vs best"] if with_p else []) + [_arrow(info, m) for m in info.key_metrics]
    return table(header, rows, classes={6: "primary"})


def _all_metrics_table(info: TaskInfo, frame: pd.DataFrame, metrics: list[str]):
    keys = ["protocol", "fraction", "model"]
    summary = info.order(summarise(frame, metrics, keys))
    rows = [[r["protocol"], fmt.frac(r["fraction"]), r["model"], int(r["n_seeds"])]
            + [_value_cell(r, m, primary=m == info.primary) for m in metrics] for _, r in summary.iterrows()]
    return table(["protocol", "fraction", "model", _units_header(summary)] + [fmt.metric_label(m) for m in metrics],
                 rows)


def _runs_table(info: TaskInfo, runs: tuple[rmodel.RunRow, ...]):
    rows = []
    for r in runs:
        chance = (Cell("never left chance", "warn") if r.chance else Cell("left chance") if r.chance is False
                  else Cell("–", "muted"))
        rows.append([r.protocol, fmt.frac(r.fraction), r.model, *([] if r.fold is None else [r.fold]), r.seed,
                     Cell(fmt.with_ci(r.value, r.lo, r.hi), "num primary"),
                     Cell(fmt.epoch(r.best_epoch) + ("" if fmt.missing(r.epochs) else f" of {int(r.epochs)}"), "num"),
                     r.min_train_loss, r.chance_loss, chance])
    folds = ["fold"] if any(r.fold is not None for r in runs) else []
    return table(["protocol", "fraction", "model", *folds, "seed",
                  f"{fmt.metric_label(info.primary)} [95% bootstrap CI]", "kept epoch", "lowest train loss",
                  "chance loss", "chance check"], rows, classes={4 + len(folds): "primary"})


def _curves(info: TaskInfo, eval_set: str, picked: pd.DataFrame):
    runs = []
    rows = info.order(_first_seed(picked[picked["eval_set"] == eval_set]))
    for _, r in rows.iterrows():
        d = load_metrics_json(r["path"]) or {}
        ttype = d.get("task_type") or r.get("task_type") or info.type
        classes = d.get("classes") or list(r.get("classes") or ())
        inputs = figures.read_curve_inputs(r.get("predictions"), ttype, len(classes) or None)
        pr = figures.macro_pr(*inputs, ttype) if inputs is not None else None
        runs.append({"label": f"{r['model']} ({r['protocol']}, {fmt.frac(r['fraction'])})", "metrics": d, "pr": pr,
                     "panel": r["protocol"], **info.style(r["protocol"], r["model"])})
    if not runs or not any((r["metrics"].get("roc") or r["pr"] is not None) for r in runs):
        return None
    average = "macro over signs" if info.type == "multilabel" else "macro one-vs-rest"
    png = figures.roc_pr_figure(runs, f"{info.name}: {eval_set} test set", average)
    return figure(png, f"ROC and precision-recall curves on the {eval_set} set: each model/protocol at its largest "
                       f"label fraction, {_first_run_words(rows)}. Legend: point AUROC/AUPR of that run.")


def _confusions(info: TaskInfo, picked: pd.DataFrame) -> list:
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
        title = f"{model} ({protocol}), fraction {fmt.frac(group['fraction'].iloc[0])}"
        caption = f"{title}, internal test set; summed over {len(group)} seed(s)."
        if total is not None:
            imgs.append(figure(figures.confusion_figure(total, classes, title), caption))
        elif per_sign:
            imgs.append(figure(figures.multilabel_confusion_figure(per_sign, title), caption + " Threshold 0.5."))
    return imgs


def _calibration(info: TaskInfo, picked: pd.DataFrame):
    if info.type not in ("binary", "multiclass", "ordinal"):
        return None
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
        runs.append({"label": f"{r['model']} ({r['protocol']}, {fmt.frac(r['fraction'])})", "y": inputs[0],
                     "probs": inputs[1], "ece": ece, "panel": r["protocol"], **info.style(r["protocol"], r["model"])})
    if not runs:
        return None
    png = figures.reliability_figure(runs, n_bins, f"{info.name}: reliability (internal test set)")
    return figure(png, f"Accuracy vs mean top-1 confidence in {n_bins} equal-width bins (the bins of the ECE); "
                       f"below the diagonal = overconfident. Largest label fraction, {_first_run_words(rows)}; legend: "
                       "ECE [95% bootstrap CI].")


def _external_view(info: TaskInfo) -> dict | None:
    ext_sets = rmodel.external_sets(info)
    if not ext_sets:
        return None
    keys = ["protocol", "fraction", "model"]
    table_rows, fig_rows, details, notes = [], [], [], []
    for ext in ext_sets:
        ext_df = info.df[info.df["eval_set"] == ext]
        scheme = rmodel.external_scheme(info, ext)
        metric, internal = scheme.metric, scheme.internal
        if scheme.note:
            notes.append({"dataset": ext, "note": scheme.note, "metric": fmt.metric_label(metric),
                          "mapped": scheme.mapped})
        ext_sum = summarise(ext_df, [metric], keys)
        int_sum = summarise(internal, [metric], keys) if len(internal) else None
        lower = info.lower_is_better(metric)
        for _, e in info.order(ext_sum).iterrows():
            i = None
            if int_sum is not None:
                match = int_sum[(int_sum["protocol"] == e["protocol"]) & (int_sum["model"] == e["model"])
                                & (int_sum["fraction"].map(rmodel.pkey) == rmodel.pkey(e["fraction"]))]
                i = match.iloc[0] if len(match) else None
            iv = i[metric] if i is not None else math.nan
            ev = e[metric]
            drop = (ev - iv) if lower else (iv - ev)
            rel = drop / abs(iv) if iv and not pd.isna(iv) else math.nan
            table_rows.append([ext, e["protocol"], fmt.frac(e["fraction"]), e["model"], fmt.metric_label(metric),
                               _value_cell(i, metric) if i is not None else None, _value_cell(e, metric),
                               Cell(fmt.value(drop), "num" + (" drop" if drop > 0 else "")) if not pd.isna(drop)
                               else None, f"{rel:+.1%}" if not pd.isna(rel) else None])
            fig_rows.append({"set": ext, "protocol": e["protocol"], "model": e["model"], "fraction": e["fraction"],
                             "metric": metric, "internal": iv, "external": ev,
                             "internal_lo": i[f"{metric}_lo"] if i is not None else None,
                             "internal_hi": i[f"{metric}_hi"] if i is not None else None,
                             "external_lo": e[f"{metric}_lo"], "external_hi": e[f"{metric}_hi"]})
        ext_metrics = [m for m in metric_names(ext_df) if ext_df[m].notna().any()]
        if ext_metrics:
            details.append({"dataset": ext, "table": _all_metrics_table(info, ext_df, ext_metrics)})
    top = {}
    for r in fig_rows:
        key = (r["protocol"], r["model"])
        top[key] = max(top.get(key, r["fraction"]), r["fraction"])
    plotted = [r for r in fig_rows if r["fraction"] == top[(r["protocol"], r["model"])]
               and not (pd.isna(r["internal"]) or pd.isna(r["external"]))]
    fig = None
    if plotted:
        for r in plotted:
            r["label"] = f"{r['model']} ({r['protocol']}) → {r['set']}"
        metric = plotted[0]["metric"]
        png = figures.external_drop_figure(plotted, f"{info.name}: internal vs external ({fmt.metric_label(metric)})",
                                           metric)
        fig = figure(png, "Internal (blue) vs external (red) at the largest label fraction; mean over seeds with "
                          "95% CI.")
    return {"table": table(["external set", "protocol", "fraction", "model", "metric", "internal", "external",
                            "drop", "relative drop"], table_rows),
            "notes": notes, "figure": fig, "details": details}


def _retfound_table(info: TaskInfo):
    if info.type not in ("binary", "multiclass", "ordinal") or info.internal.empty:
        return None
    records = []
    for _, r in info.internal.iterrows():
        d = load_metrics_json(r["path"]) or {}
        rec = {"protocol": r["protocol"], "model": r["model"], "fraction": r["fraction"]}
        for prefix, key in (("v1", "retfound_v1"), ("current", "retfound_current")):
            for k, v in (d.get(key) or {}).items():
                rec[f"{prefix} {k}"] = as_float(v)
        records.append(rec)
    frame = pd.DataFrame(records)
    cols = [c for c in frame.columns if c.startswith(("v1 ", "current "))]
    if not cols:
        return None
    means = info.order(frame.groupby(["protocol", "fraction", "model"], as_index=False)[cols].mean())
    rows = [[r["protocol"], fmt.frac(r["fraction"]), r["model"]] + [r[c] for c in cols] for _, r in means.iterrows()]
    return table(["protocol", "fraction", "model"] + cols, rows)


def _per_class(info: TaskInfo, picked: pd.DataFrame):
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
                    rec[k] = as_float(v["value"])
                elif k.startswith("n_") and isinstance(v, (int, float)):
                    rec[k] = v
            records.append(rec)
    if not records:
        return None
    frame = pd.DataFrame(records)
    keys = ["protocol", "fraction", "model", "class"]
    cols = [c for c in frame.columns if c not in keys]
    cols = [c for c in cols if c.startswith("n_")] + [c for c in cols if not c.startswith("n_")]
    classes = list(dict.fromkeys(frame["class"]))
    means = frame.groupby(keys, as_index=False, sort=False)[cols].mean()
    means["_c"] = means["class"].map(classes.index)
    means = info.order(means.sort_values("_c", kind="stable"))
    rows = [[r["protocol"], fmt.frac(r["fraction"]), r["model"], r["class"]] + [r[c] for c in cols]
            for _, r in means.iterrows()]
    return table(["protocol", "fraction", "model", "class"] + [fmt.metric_label(c) for c in cols], rows)


def _overlays(info: TaskInfo, picked: pd.DataFrame) -> list:
    """Example figures a run wrote next to its metrics.json (``"overlay": "overlay.png"``)."""
    imgs = []
    for _, r in info.order(_first_seed(picked[picked["eval_set"] == "internal"])).iterrows():
        d = load_metrics_json(r["path"]) or {}
        name = d.get("overlay")
        if not isinstance(name, str):
            continue
        path = Path(r["path"]).parent / name
        if path.is_file() and path.suffix.lower() == ".png":
            imgs.append(figure(path.read_bytes(), f"{r['model']} ({r['protocol']}), fraction "
                                                  f"{fmt.frac(r['fraction'])}, {_run_words(r)}: test images "
                                                  f"with predicted masks ({name}).", "photo"))
    return imgs


def _kfold_table(rows: tuple[rmodel.KFoldRow, ...]):
    """Cross-validated runs: the k-fold mean with its interval across folds, and each fold's value."""
    if not rows:
        return None
    return table(["eval set", "protocol", "fraction", "model", "metric", "k-fold mean [95% CI]", "folds",
                  "per fold"],
                 [[r.eval_set, r.protocol, fmt.frac(r.fraction),
                   r.model, fmt.metric_label(r.metric), Cell(kfold_text(r.estimate), "num primary", r.words),
                   r.words, fold_values_text(r.estimate)] for r in rows])


def _footprint_table(rows: tuple[rmodel.FootprintRow, ...]):
    """Compute per protocol: trainable / total parameters and peak memory of a task's runs."""
    if not rows:
        return None
    count = lambda v: None if fmt.missing(v) else f"{int(v):,}"
    return table(["protocol", "model", "trainable parameters", "total parameters", "trainable share",
                  "peak memory (MB)", "memory measured"],
                 [[r.protocol, r.model, Cell(count(r.trainable_params) or "–", "num"),
                   Cell(count(r.total_params) or "–", "num"),
                   Cell("–" if fmt.missing(r.trainable_share) else f"{r.trainable_share:.2%}", "num"),
                   r.peak_mem_mb, r.peak_mem_kind] for r in rows])


# ---------------------------------------------------------------- fusion vs single modality
def _fusion_view(section: rmodel.FusionSection) -> dict:
    """One fusion task's same-eyes comparison table and its pairing counts."""
    modalities = list(dict.fromkeys(v.modality for r in section.rows for v in r.vs))
    names = {v.modality: v.task for r in section.rows for v in r.vs}
    metric = fmt.metric_label(section.metric)
    header = ["model", "single-modality protocol", "fraction", "seed", "eyes", f"fusion {metric} [95% CI]"]
    for m in modalities:
        header += [f"{m.upper()} only ({names[m]}) [95% CI]", f"fusion − {m.upper()} [95% CI]", "p"]
    rows = []
    for r in section.rows:
        row = [r.model, r.protocol, fmt.frac(r.fraction), r.seed, r.n_eyes,
               Cell(fmt.with_ci(r.value, r.lo, r.hi), "num primary")]
        by = {v.modality: v for v in r.vs}
        for m in modalities:
            v = by.get(m)
            if v is None:
                row += [None, None, None]
                continue
            better = not fmt.missing(v.difference) and (v.difference < 0 if section.lower_is_better else v.difference > 0)
            sig = not fmt.missing(v.p) and v.p < fmt.ALPHA
            row += [Cell(fmt.with_ci(v.value, v.lo, v.hi), "num"),
                    Cell(f"{fmt.signed(v.difference)} {fmt.interval(v.diff_lo, v.diff_hi)}".strip(),
                         "num" + (" sig" if sig and better else ""), v.method or ""),
                    Cell(fmt.p_value(v.p), "num" + (" sig" if sig else ""), v.method or "")]
        rows.append(row)
    unpaired = table(["modality present", "reason", "eyes"], [[m.upper(), reason, n] for m, reason, n in section.unpaired],
                     total=["total", "", sum(n for _, _, n in section.unpaired)]) if section.unpaired else None
    return {"task": section.task, "anchor": _anchor(f"fusion-{section.task}"), "metric": metric,
            "lower": section.lower_is_better, "table": table(header, rows, classes={5: "primary"}),
            "n_pairs": section.n_pairs, "split_source": section.split_source,
            "pairs_by_split": ", ".join(f"{k} {v}" for k, v in section.pairs_by_split.items()),
            "unpaired": unpaired, "n_unpaired": sum(n for _, _, n in section.unpaired)}


# ---------------------------------------------------------------- whole volume vs central B-scan
def _volume_table(items: Sequence[tuple[str, rmodel.VolumeVs]], with_task: bool):
    """Rows of (task, volume-vs-image comparison): the two models' values, volume − image with its CI per
    seed (fold) and the verdict with its p-values (the headline's rules)."""
    header = (["task"] if with_task else []) + ["protocol", "fraction", "volume model [95% CI]",
                                                "central B-scan model [95% CI]", "volume − B-scan [95% CI]", "verdict"]
    rows = []
    for task, v in items:
        c = v.comparison
        better = c.verdict == rmodel.VOLUME_BETTER
        rows.append(([task] if with_task else []) + [
            v.protocol, fmt.frac(c.fraction),
            Cell(f"{v.volume_model} {estimate_text(c.pretrained, unit=v.unit)}", "primary" if better else ""),
            f"{v.image_model} {estimate_text(c.baseline, unit=v.unit)}",
            Cell(estimate_text(c.difference, fmt.signed, v.unit), "num" + (" sig" if better else "")),
            Cell(c.verdict_text, "sig" if better else "")])
    return table(header, rows) if rows else None


def _volume_headline(report: rmodel.ReportModel):
    """The headline's volume comparisons: per task and protocol, those at the task's largest label fraction."""
    items = []
    for task in report.tasks:
        found = report.volume.get(task, ())
        for protocol in dict.fromkeys(v.protocol for v in found):
            mine = [v for v in found if v.protocol == protocol]
            top = max(v.comparison.fraction for v in mine)
            items += [(task, v) for v in mine if v.comparison.fraction == top]
    return _volume_table(items, with_task=True)


def _task_view(task: str, report: rmodel.ReportModel, saliency: dict) -> dict:
    info = report.infos[task]
    spec, sig = info.spec, report.significance
    label = spec.label if spec else None
    view = {"name": task, "anchor": _anchor(task), "dataset": spec.dataset if spec else None,
            "label": ", ".join(map(str, label)) if isinstance(label, tuple) else label, "type": info.type,
            "primary": fmt.metric_label(info.primary) if info.primary else None,
            "primary_key": info.primary, "lower": bool(info.primary and info.lower_is_better(info.primary)),
            "empty": info.df.empty or info.internal.empty}
    if view["empty"]:
        return view
    runs = report.runs[task]
    folded = rmodel.is_folded(info.internal)
    n_seeds = info.internal.groupby(["protocol", "fraction", "model"])["fold" if folded else "seed"].nunique()
    picked = _pick_runs(info.df)
    eval_sets = sorted(info.df["eval_set"].unique(), key=lambda e: (e != "internal", e))
    view.update({
        "absent": sorted({c for t in info.internal["absent_classes"] for c in (t or ())}),
        "results": _results_table(info, sig),
        "two_seeds": bool((n_seeds == 2).any()), "three_seeds": bool((n_seeds >= 3).any()), "folded": folded,
        "has_sig": sig.has_task(task),
        "chance_runs": [r for r in runs if r.chance],
        "runs": _runs_table(info, runs),
        "kfold": _kfold_table(report.kfold.get(task, ())),
        "footprint": _footprint_table(report.footprint.get(task, ())),
        "volume": _volume_table([(task, v) for v in report.volume.get(task, ())], with_task=False),
        "all_metrics": _all_metrics_table(info, info.internal, info.metrics)
        if len(info.metrics) > len(info.key_metrics) + 1 else None,
        "pairs": table(["protocol", "fraction", "fold / seed" if folded else "seed", "metric", "model a", "model b",
                        "a", "b", "a − b [95% CI]", "p", "method", "best"], pairs_rows(sig, task)),
        "retfound": _retfound_table(info),
        "per_class": _per_class(info, picked),
        "overlays": _overlays(info, picked),
        "curves": [c for c in (_curves(info, e, picked) for e in eval_sets) if c],
        "confusions": _confusions(info, picked),
        "label_efficiency": None,
        "external": _external_view(info),
        "calibration": _calibration(info, picked),
        "saliency": None,
    })
    if info.primary and info.internal["fraction"].nunique() > 1:
        png = figures.label_efficiency_figure(info.df, task, info.primary, ["internal"], info.models, info.protocols)
        view["label_efficiency"] = figure(
            png, f"{fmt.metric_label(info.primary)} on the internal test set vs the fraction of training labels; "
                 "line = mean over seeds, bars/band = 95% CI (t interval with 3+ seeds; the span of the runs' "
                 "bootstrap CIs with 1-2 seeds).")
    if task in saliency:
        png_path, meta = saliency[task]
        run = meta.get("run") or "the first pretrained model, largest fraction, first seed"
        view["saliency"] = figure(
            Path(png_path).read_bytes(),
            f"{run}: per class a few test images, each as the image, its attention rollout (where the average-"
            "pooled representation draws from, class-agnostic) and its Grad-CAM for the predicted class (last "
            "block's patch tokens). Red title: misclassified. Maps show where the model looks, not why.", "photo")
    return view


# ---------------------------------------------------------------- summary
def _summary_table(report: rmodel.ReportModel):
    rows = []
    for task in report.tasks:
        info = report.infos[task]
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
            text = sig_cell(report.significance, task, protocol, best["fraction"], second["model"])[0] \
                if second is not None else ""
            units = int(best["n_seeds"])
            rows.append([task, fmt.metric_label(info.primary), protocol, fmt.frac(best["fraction"]),
                         f"{units} folds" if best["unit"] == "fold" else units, best["model"], _value_cell(best, info.primary, primary=True),
                         second["model"] if second is not None else None,
                         _value_cell(second, info.primary) if second is not None else None,
                         Cell(text or "–", "num" + (" sig" if "*" in text else ""))])
    return table(["task", "metric", "protocol", "fraction", "seeds / folds", "best model", "value", "runner-up", "value",
                  "p runner-up vs best"], rows, classes={6: "primary"})


# ---------------------------------------------------------------- pretraining, cost
def _pretrain_view(inputs: ReportInputs) -> dict:
    pre = collect_pretrain(inputs)
    if pre.empty:
        return {"table": None, "figures": []}
    imgs = []
    logs = {f"{r.method}/{r.modality}": r.log_csv for r in pre.itertuples() if r.log_csv}
    if logs:
        imgs.append(figure(figures.pretrain_loss_figure(logs),
                           "MAE training loss per epoch (reconstruction error on masked patches)."))
    for r in pre.itertuples():
        if r.figure_png:
            imgs.append(figure(Path(r.figure_png).read_bytes(),
                               f"{r.method}/{r.modality}: reconstructions (MAE) or training views", "photo"))
    return {"table": table(["method", "modality", "epochs", "final loss", "train seconds"],
                           [[r.method, r.modality, r.epochs, r.final_loss, r.seconds] for r in pre.itertuples()]),
            "figures": imgs}


def _cost_view(benchmarks_dir: Path | None, settings: ReportSettings) -> dict | None:
    cost = cost_frame(benchmarks_dir, settings.gpus)
    if cost.empty:
        return None
    has_cpu = bool(cost["cpu_h"].notna().any())
    tot = [cost["wall_h"].sum(), _sum(cost["cpu_h"]), cost["gpu_h"].sum()]
    by_step = cost.groupby("step").agg(jobs=("job", "count"), s=("s", "sum"), cpu_h=("cpu_h", _sum),
                                       gpu_h=("gpu_h", "sum"), gpus=("gpus", "max"), rss=("max_rss_mb", "max"))
    by_step = by_step.sort_values("s", ascending=False)
    steps = table(["step", "jobs", "seconds", "h:m:s", "CPU-hours", "GPUs per job", "GPU-hours", "peak RSS (MB)"],
                  [[k, int(r.jobs), round(r.s, 1), fmt.hms(r.s), _hours(r.cpu_h) if has_cpu else None, r.gpus,
                    _hours(r.gpu_h), None if pd.isna(r.rss) else round(r.rss, 1)] for k, r in by_step.iterrows()])
    models = None
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
            rows.append([model, int(r.jobs), round(r.s, 1), fmt.hms(r.s), _hours(r.cpu_h) if has_cpu else None,
                         _hours(r.gpu_h), f"{run}: {fmt.hms(mine['s'].sum())}, {_hours(mine['gpu_h'].sum())} GPU-h"
                         if len(mine) else None])
        models = table(["model", "jobs", "seconds", "h:m:s", "CPU-hours", "GPU-hours", "pretraining it starts from"],
                       rows)
    total_s = float(cost["s"].sum())
    peak = cost["max_rss_mb"].max()
    jobs = table(["job", "seconds", "h:m:s", "CPU-hours", "GPU-hours", "max RSS (MB)"],
                 [[r.job, round(r.s, 2), fmt.hms(r.s), _hours(r.cpu_h), _hours(r.gpu_h), r.max_rss_mb]
                  for r in cost.sort_values("s", ascending=False).itertuples()],
                 total=["total (sum of job times; peak RSS)", round(total_s, 1), fmt.hms(total_s), _hours(tot[1]),
                        _hours(tot[2]), None if pd.isna(peak) else peak])
    return {"n_jobs": len(cost), "wall": fmt.hms(tot[0] * 3600), "cpu_h": _hours(tot[1]) if has_cpu else "n/a",
            "gpu_h": _hours(tot[2]), "steps": steps, "models": models, "jobs": jobs}


# ---------------------------------------------------------------- the page
def environment() -> Environment:
    """The report's Jinja2 environment: templates of this package, autoescaped, undefined names are errors."""
    env = Environment(loader=PackageLoader("retflow.report", "templates"),
                      autoescape=select_autoescape(["html", "j2"], default_for_string=True, default=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(frac=fmt.frac, value=fmt.value, metric=fmt.metric_label, hms=fmt.hms)
    return env


def render(context: dict) -> str:
    return environment().get_template("report.html.j2").render(**context)


def build_report(inputs, benchmarks_dir, settings: ReportSettings, out_path) -> Path:
    """Write the self-contained HTML report to ``out_path`` (atomically) and return its path.

    ``inputs``: the report rule's declared inputs (:class:`~retflow.report.collect.ReportInputs`),
    or a results folder (a :class:`retflow.layout.Layout` root: what it holds, for a report built by
    hand); ``settings``: what the report reads of the config (:func:`retflow.settings.report.report`)."""
    inputs = inputs_of(inputs)
    results = collect_results(inputs)
    report = rmodel.build(results, collect_compare(inputs), settings, collect_fusion(inputs))
    saliency = collect_saliency(inputs)
    tasks = []
    for task in report.tasks:
        try:
            tasks.append(_task_view(task, report, saliency))
        except Exception as exc:  # noqa: BLE001 - one broken task must not cost the whole report
            tasks.append({"name": task, "anchor": _anchor(task), "error": repr(exc)})
            print(f"WARNING: task {task}: {exc!r}", file=sys.stderr)
    context = {
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "results_dir": inputs.results, "n_results": report.n_results,
        "headlines": [_headline_row(h) for h in report.headlines],
        "volume_headline": _volume_headline(report),
        "chance_margin": settings.chance_margin,
        "summary": _summary_table(report),
        "tasks": tasks,
        "fusion": [_fusion_view(f) for f in report.fusion],
        "pretrain": _pretrain_view(inputs),
        "synth": synth_view(inputs.results, settings.synth_modalities),
        "qc": _qc_view(inputs),
        "cost": _cost_view(Path(benchmarks_dir) if benchmarks_dir else None, settings),
        "config": _config_view(settings),
        "n_boot": settings.evaluate.n_boot, "boot_seed": settings.evaluate.seed,
    }
    write_text(render(context), out_path)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out_path, 0o666 & ~umask)  # the temporary file of the atomic write is private (0600)
    return Path(out_path)

