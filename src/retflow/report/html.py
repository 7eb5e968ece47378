"""Build the single-file HTML report (inline CSS, figures as base64 data URIs, no JS, no external assets).

Command line::

    python -m retflow.report.html --results results --benchmarks benchmarks \\
        --config config.yaml --out results/report.html
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import sys
from datetime import datetime, timezone
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd

from ..atomic import write_text
from ..evaluate.metrics import METRICS_BY_TYPE, PRIMARY_METRIC
from . import figures
from .collect import (
    collect_benchmarks,
    collect_pretrain,
    collect_qc,
    collect_quarantine,
    collect_quarantine_examples,
    collect_leakage,
    collect_results,
    load_metrics_json,
)

CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0 auto;max-width:1250px;
 padding:0 24px 48px;color:#222;line-height:1.4}
h1{border-bottom:3px solid #2b6cb0;padding-bottom:6px}h2{margin-top:40px;border-bottom:1px solid #ccc}
h3{margin-top:26px;color:#2b4c7e}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}
th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef2f7}tr:nth-child(even) td{background:#fafbfc}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.primary,th.primary{background:#fff8e1 !important;font-weight:600}
tr.total td{font-weight:700;background:#eef2f7}
.figs{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
figure{margin:0;border:1px solid #e1e4e8;padding:6px;background:#fff}
figure img{max-width:100%;height:auto;display:block}figcaption{font-size:12px;color:#555;max-width:560px}
.note{background:#f6f8fa;border-left:4px solid #2b6cb0;padding:8px 14px;font-size:14px}
.muted{color:#777}nav ul{columns:2}code{background:#f0f0f0;padding:0 3px}
"""


# ---------------------------------------------------------------- small HTML helpers
def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "<td class='muted'>&ndash;</td>"
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return f"<td class='num'>{escape(_num(value))}</td>"
    if isinstance(value, (dict, list, tuple)):
        value = json.dumps(value, default=str)
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
        f"<figure><img{style} alt='{escape(caption, quote=True)}' src='data:image/png;base64,{data}'>"
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
def _config_section(config: dict) -> str:
    parts = ["<h2 id='config'>Configuration</h2>"]
    datasets = config.get("datasets") or {}
    if isinstance(datasets, dict) and datasets:
        rows = []
        for name, ds in datasets.items():
            ds = ds if isinstance(ds, dict) else {}
            ph = ds.get("phantom") if isinstance(ds.get("phantom"), dict) else None
            origin = (
                f"phantom {ph.get('kind', '')} n={ph.get('n', '?')} style {ph.get('style', 'A')}"
                if ph
                else ds.get("path", "")
            )
            rows.append([name, ds.get("modality"), ds.get("role"), ds.get("source"), origin])
        parts.append("<h3>Datasets</h3>" + _table(["dataset", "modality", "role", "source", "origin"], rows))
    tasks = config.get("tasks") or {}
    if isinstance(tasks, dict) and tasks:
        rows = []
        for name, t in tasks.items():
            t = t if isinstance(t, dict) else {}
            ttype = t.get("type")
            rows.append(
                [
                    name,
                    t.get("dataset"),
                    t.get("label"),
                    ttype,
                    ", ".join(map(str, t.get("classes") or [])),
                    ", ".join(map(str, t.get("external") or [])) or None,
                    PRIMARY_METRIC.get(ttype),
                ]
            )
        parts.append(
            "<h3>Tasks</h3>"
            + _table(["task", "dataset", "label", "type", "classes", "external sets", "primary metric"], rows)
        )
    models = config.get("models") or {}
    if isinstance(models, dict) and models:
        rows = [[n, (m or {}).get("init"), (m or {}).get("method") or (m or {}).get("path")] for n, m in models.items()]
        parts.append("<h3>Models</h3>" + _table(["model", "init", "method / weights"], rows))
    grid = [
        [key, ", ".join(map(_frac if key == "fractions" else str, config[key]))]
        for key in ("protocols", "fractions", "seeds")
        if isinstance(config.get(key), list)
    ]
    if grid:
        parts.append("<h3>Run grid</h3>" + _table(["setting", "values"], grid))
    for key in ("vit", "pretrain", "finetune", "probe"):
        block = config.get(key)
        if isinstance(block, dict) and block:
            parts.append(
                f"<h3>{escape(key)} settings</h3>" + _table(["key", "value"], [[k, v] for k, v in block.items()])
            )
    if len(parts) == 1:
        parts.append("<p class='muted'>no configuration given</p>")
    return "\n".join(parts)


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
                     "Full lists: <code>results/data/&lt;dataset&gt;/quarantine.csv</code>.</p>")
        examples = collect_quarantine_examples(results_dir)
        parts.append("<details><summary>First quarantined entries per dataset</summary>"
                     + _table(list(examples.columns), examples.values.tolist()) + "</details>")
    leaks = collect_leakage(results_dir)
    parts.append("<h3>Leakage checks</h3>")
    parts.append("<p>No leakage warnings (patient, identical file or perceptual near-duplicate across splits, "
                 "and pretraining pools / training splits against test sets).</p>" if not leaks else
                 f"<p>{len(leaks)} warnings (checks set to <code>warn</code>):</p><ul>"
                 + "".join(f"<li>{escape(line)}</li>" for line in leaks[:50]) + "</ul>")
    return "\n".join(parts)


def _metric_table(df: pd.DataFrame, metrics: list[str], primary: str) -> str:
    keys = ["protocol", "model", "fraction", "eval_set"]
    summary = None
    for metric in metrics:
        s = figures.seed_summary(df, metric, keys)
        s = s.rename(columns={"value": metric, "lo": f"{metric}_lo", "hi": f"{metric}_hi", "sd": f"{metric}_sd"})
        summary = s if summary is None else summary.merge(s.drop(columns="n_seeds"), on=keys, how="outer")
    n_cases = df.groupby(keys, dropna=False)["n"].mean().rename("n_cases").reset_index()
    summary = summary.merge(n_cases, on=keys, how="left")
    summary["_ext"] = summary["eval_set"] != "internal"
    summary = summary.sort_values(["_ext", "eval_set", "protocol", "model", "fraction"])
    order = [primary] + [m for m in metrics if m != primary]
    rows = []
    for _, r in summary.iterrows():
        row = [
            r["protocol"],
            r["model"],
            _frac(r["fraction"]),
            r["eval_set"],
            int(r["n_seeds"]),
            None if pd.isna(r["n_cases"]) else int(r["n_cases"]),
        ]
        row += [
            f"<td class='num{' primary' if m == primary else ''}'>{escape(_ci(r[m], r[f'{m}_lo'], r[f'{m}_hi']))}</td>"
            for m in order
        ]
        rows.append(row)
    header = ["protocol", "model", "fraction", "eval set", "seeds", "n"] + order
    return _table(header, rows, classes={6: "primary"})


def _pick_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Per protocol/model: rows of its largest label fraction (all seeds)."""
    largest = df.groupby(["protocol", "model"])["fraction"].transform("max")
    return df[df["fraction"] == largest]


def _task_section(task: str, task_cfg: dict, df: pd.DataFrame) -> str:
    parts = [f"<h2 id='{_anchor(task)}'>Task: {escape(str(task))}</h2>"]
    task_type = task_cfg.get("type") or (
        df["task_type"].dropna().iloc[0] if len(df) and df["task_type"].notna().any() else None
    )
    primary = PRIMARY_METRIC.get(task_type, "auroc")
    desc = ", ".join(f"{k} {escape(str(task_cfg[k]))}" for k in ("dataset", "label", "type") if task_cfg.get(k))
    parts.append(f"<p>{desc}{'; ' if desc else ''}primary metric <b>{escape(primary)}</b>.</p>")
    if df.empty:
        parts.append("<p class='muted'>No results for this task yet.</p>")
        return "\n".join(parts)
    metrics = [m for m in METRICS_BY_TYPE.get(task_type, METRICS_BY_TYPE["multiclass"]) if m in df.columns]
    parts.append("<h3>Metrics (value [95% CI])</h3>" + _metric_table(df, metrics, primary))

    picked = _pick_runs(df)
    eval_sets = sorted(df["eval_set"].unique(), key=lambda e: (e != "internal", e))
    roc_imgs = []
    for eval_set in eval_sets:
        runs = picked[picked["eval_set"] == eval_set].sort_values(["protocol", "model", "seed"])
        first_seed = runs.groupby(["protocol", "model"], as_index=False).head(1)
        dicts = [d for d in (load_metrics_json(p) for p in first_seed["path"]) if d]
        if dicts:
            png = figures.roc_figure(dicts, f"{task}: {eval_set}")
            roc_imgs.append(
                _img(png, f"ROC, {eval_set} set: each model/protocol at its largest label fraction, lowest seed.", 480)
            )
    if roc_imgs:
        parts.append("<h3>ROC curves</h3><div class='figs'>" + "".join(roc_imgs) + "</div>")

    cm_imgs = []
    internal = picked[picked["eval_set"] == "internal"].sort_values(["protocol", "model", "seed"])
    for (protocol, model), group in internal.groupby(["protocol", "model"], sort=True):
        total, classes = None, None
        for d in (load_metrics_json(p) for p in group["path"]):
            if d and d.get("confusion_matrix"):
                cm = np.asarray(d["confusion_matrix"], dtype=int)
                total = cm if total is None else total + cm
                classes = d.get("classes") or list(range(cm.shape[0]))
        if total is not None:
            frac = _frac(group["fraction"].iloc[0])
            title = f"{model} ({protocol}), fraction {frac}, internal"
            caption = f"{title}; summed over {len(group)} seed(s)."
            cm_imgs.append(_img(figures.confusion_figure(total, classes, title), caption))
    if cm_imgs:
        parts.append(
            "<h3>Confusion matrices (largest label fraction)</h3><div class='figs'>" + "".join(cm_imgs) + "</div>"
        )

    if primary in df.columns:
        png = figures.label_efficiency_figure(df, task, primary, eval_sets)
        parts.append(
            "<h3>Label efficiency</h3><div class='figs'>"
            + _img(
                png,
                f"{primary} vs fraction of training labels; line = mean over seeds, band = mean 95% bootstrap CI, "
                "error bars = SD across seeds (when several).",
            )
            + "</div>"
        )
    return "\n".join(parts)


def _pretrain_section(results_dir: Path) -> str:
    parts = ["<h2 id='pretrain'>MAE pretraining</h2>"]
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
        if r.recon_png:
            imgs.append(_img(Path(r.recon_png).read_bytes(), f"Reconstructions: {r.method}/{r.modality} (recon.png)"))
    parts.append("<div class='figs'>" + "".join(imgs) + "</div>")
    return "\n".join(parts)


def _hms(seconds: float) -> str:
    if seconds is None or math.isnan(seconds):
        return ""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def job_step(job: str) -> str:
    """Workflow step of a benchmark job name: ``report`` -> report, ``data/prepare_x`` -> data,
    ``finetune/{task}/{model}/frac{f}/seed{s}/predict_ext`` -> ``finetune predict``."""
    parts = job.split("/")
    if len(parts) <= 2:
        return parts[0]
    return f"{parts[0]} {parts[-1].split('_')[0]}"


def _timings_section(benchmarks_dir: Path | None) -> str:
    parts = ["<h2 id='timings'>Timings</h2>"]
    bench = collect_benchmarks(benchmarks_dir) if benchmarks_dir else pd.DataFrame()
    if bench.empty:
        parts.append("<p class='muted'>No benchmark files found.</p>")
        return "\n".join(parts)
    bench = bench.sort_values("s", ascending=False)
    by_rule = bench.assign(rule=bench["job"].map(job_step)).groupby("rule")["s"].agg(["count", "sum"])
    by_rule = by_rule.sort_values("sum", ascending=False)
    parts.append(
        "<h3>By rule</h3>"
        + _table(
            ["step", "jobs", "seconds", "h:m:s"],
            [[k, int(c), round(s, 1), _hms(s)] for k, (c, s) in by_rule.iterrows()],
        )
    )
    rows = [[r.job, round(r.s, 2), _hms(r.s), r.max_rss_mb] for r in bench.itertuples()]
    total_s = float(bench["s"].sum())
    peak = bench["max_rss_mb"].max()
    total = ["total (sum of job times; peak RSS)", round(total_s, 1), _hms(total_s), None if pd.isna(peak) else peak]
    parts.append("<h3>Jobs</h3>" + _table(["job", "seconds", "h:m:s", "max RSS (MB)"], rows, total=total))
    return "\n".join(parts)


HOW_TO_READ = """
<h2 id='how'>How to read this report</h2>
<div class='note'><p>Each metric is shown as <code>value [low, high]</code>: the value on the full test set
and a 95% percentile-bootstrap confidence interval (test cases resampled with replacement). The interval
describes uncertainty from the finite test set only, not from training randomness; with several seeds the
table shows the mean over seeds of the value and of each bound, and the label-efficiency error bars show the
spread across seeds. Overlapping intervals do not prove two models equal, and intervals from the same test set
are correlated, so compare models on paired results. Multiclass AUROC/AUPR are macro one-vs-rest averages over the
classes present in the test set; QWK (quadratic-weighted kappa) is the primary metric for ordinal grading.
External sets come from a different device and show how well a model transfers.</p></div>
"""


def build_report(results_dir, benchmarks_dir, config: dict | None, out_path) -> Path:
    """Write the self-contained HTML report to ``out_path`` (atomically) and return its path."""
    results_dir = Path(results_dir)
    config = config if isinstance(config, dict) else {}
    results = collect_results(results_dir)
    task_cfgs = config.get("tasks") if isinstance(config.get("tasks"), dict) else {}
    tasks = list(task_cfgs)
    if not results.empty:
        tasks += [t for t in sorted(results["task"].dropna().unique()) if t not in task_cfgs]
    body = [
        "<h1>retflow report</h1>",
        f"<p>Generated {escape(datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC'))} from "
        f"<code>{escape(str(results_dir))}</code>; {len(results)} evaluation result(s).</p>",
        "<nav><ul><li><a href='#config'>Configuration</a></li><li><a href='#qc'>Data QC</a></li>"
        + "".join(f"<li><a href='#{_anchor(t)}'>Task: {escape(str(t))}</a></li>" for t in tasks)
        + "<li><a href='#pretrain'>MAE pretraining</a></li><li><a href='#timings'>Timings</a></li>"
        "<li><a href='#how'>How to read this report</a></li></ul></nav>",
        _config_section(config),
        _qc_section(results_dir),
    ]
    for task in tasks:
        sub = results[results["task"] == task] if not results.empty else results
        body.append(_task_section(task, task_cfgs.get(task) or {}, sub))
    body += [
        _pretrain_section(results_dir),
        _timings_section(Path(benchmarks_dir) if benchmarks_dir else None),
        HOW_TO_READ,
    ]
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>retflow report</title><style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    write_text(page, out_path)
    return Path(out_path)


def main(argv=None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(prog="python -m retflow.report.html", description="Build the retflow HTML report.")
    ap.add_argument("--results", default="results")
    ap.add_argument("--benchmarks", default="benchmarks")
    ap.add_argument("--config", default=None, help="workflow config YAML (optional)")
    ap.add_argument("--out", default="results/report.html")
    args = ap.parse_args(argv)
    config = {}
    if args.config:
        import yaml

        try:
            config = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise SystemExit(f"cannot read config {args.config}: {exc}") from None
    out = build_report(args.results, args.benchmarks, config, args.out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
