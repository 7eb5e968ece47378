"""Gather workflow outputs (metrics.json, compare JSONs, benchmarks, pretraining logs, QC) into tables.

The report reads exactly the files its rule declares (rules/report.smk): a :class:`ReportInputs`
holds those lists (``workflow_scripts/report.py --metrics ... --compare ...``). Files that sit beside
a declared file are found through the :class:`retflow.layout.Layout` (a run's
``train_summary.json`` and ``predictions.parquet``, a store's ``quarantine.csv`` beside its
``qc.json``, a pretraining run's ``log.csv`` beside its ``figure.png``), and a run's protocol /
task / model / fraction / seed / eval set are read back with
:meth:`~retflow.layout.Layout.parse_run_file`.

Only a caller that has no lists (a report built by hand from a results folder, the library's
tests) asks :meth:`ReportInputs.found`, which lists what is in the folder.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from ..layout import Layout

RESULT_KEYS = ["task", "task_type", "protocol", "model", "fraction", "seed", "eval_set", "n"]
EXTRA_KEYS = ["fold", "primary_metric", "lower_is_better", "classes", "absent_classes", "path", "predictions",
              "best_epoch", "epochs", "chance_loss", "min_train_loss", "trainable_params", "total_params",
              "peak_mem_mb", "peak_mem_kind"]
#: train_summary.json keys the report shows (missing in results written before they existed: NaN)
SUMMARY_KEYS = ("best_epoch", "epochs", "chance_loss", "min_train_loss", "trainable_params", "total_params",
                "peak_mem_mb")
#: train_summary.json keys read as text (None where absent)
SUMMARY_TEXT_KEYS = ("peak_mem_kind",)


@dataclasses.dataclass(frozen=True)
class ReportInputs:
    """The files the report reads: the report rule's declared inputs, under the Layout root ``results``."""

    results: str
    metrics: tuple[str, ...] = ()  # every run's metrics.json, internal and external
    compare: tuple[str, ...] = ()  # compare JSONs
    saliency: tuple[str, ...] = ()  # saliency PNGs (the JSON beside each is read when present)
    pretrain: tuple[str, ...] = ()  # pretraining figure.png per run and modality
    qc: tuple[str, ...] = ()  # a prepared store's qc.json per dataset
    fusion: tuple[str, ...] = ()  # same-eyes compare.json per fusion run and protocol (rules/fusion.smk)

    @classmethod
    def of(cls, results, **lists: Sequence) -> ReportInputs:
        return cls(str(results), **{k: tuple(str(p) for p in v or ()) for k, v in lists.items()})

    @classmethod
    def found(cls, results_dir) -> ReportInputs:
        """What a results folder holds, for a report built by hand (the workflow passes its declared inputs)."""
        layout, pattern = Layout(results_dir), _pattern(results_dir)
        found = []
        for fold in (None, "fold*/"):  # the fixed split's runs, then cross-validation folds
            run = pattern.run_dir("*", "*", "*", "*", "*", fold)
            found += _glob(f"{run}/metrics.json") + _glob(f"{pattern.external_dir(run, '*')}/metrics.json")
        metrics = sorted(p for p in found if layout.parse_run_file(p) is not None)  # not data/, compare/, ...
        return cls.of(
            results_dir, metrics=metrics,
            compare=_glob(pattern.compare_json("*", "*", "*", "*")) + _glob(pattern.compare_json("*", "*", "*", "*", "fold*/")),
            saliency=_glob(pattern.saliency_png("*")),
            pretrain=[p for p in _glob(pattern.pretrain_figure("*", "*"))],
            qc=_glob(pattern.qc("*")),
            fusion=_glob(pattern.same_eyes_json("*", "*", "*", "*", "*")))

    @property
    def layout(self) -> Layout:
        return Layout(self.results)


def inputs_of(given) -> ReportInputs:
    """``given`` as :class:`ReportInputs` (a results folder: :meth:`ReportInputs.found`)."""
    return given if isinstance(given, ReportInputs) else ReportInputs.found(given)


def as_float(value) -> float:
    """JSON number or null -> float (null -> NaN)."""
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def load_metrics_json(path) -> dict | None:
    """Parse one JSON file (metrics.json, qc.json); warn and return None if it is unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        warnings.warn(f"skipping unreadable JSON file {path}: {exc}", stacklevel=2)
        return None


def _pattern(results_dir) -> Layout:
    """The Layout of ``results_dir`` with its root escaped for :func:`glob.glob` (``*`` = any name)."""
    return Layout(glob.escape(str(results_dir)))


def _glob(pattern: str) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(pattern))


def metrics_files(results_dir) -> list[Path]:
    """Every run's metrics.json in a results folder (:meth:`ReportInputs.found`)."""
    return [Path(p) for p in ReportInputs.found(results_dir).metrics]


def train_summary(layout: Layout, where: Mapping) -> dict:
    """The run's train_summary.json keys the report shows (:data:`SUMMARY_KEYS`, NaN where absent;
    :data:`SUMMARY_TEXT_KEYS`, None where absent)."""
    path = Path(layout.run_dir(where["protocol"], where["task"], where["model"], where["fraction"], where["seed"],
                               where["fold"]), "train_summary.json")
    data = load_metrics_json(path) if path.is_file() else None
    data = data if isinstance(data, dict) else {}
    return {**{k: as_float(data.get(k)) for k in SUMMARY_KEYS}, **{k: data.get(k) for k in SUMMARY_TEXT_KEYS}}


def collect_results(inputs) -> pd.DataFrame:
    """One row per declared metrics.json (internal test set and external sets).

    Columns: task, task_type, protocol, model, fraction, seed, eval_set, n, fold (the cross-validation
    fold from the path, NaN without folds), primary_metric,
    lower_is_better (tuple), classes (tuple), absent_classes (tuple), path (the JSON file),
    predictions (the predictions parquet beside it, None if absent), the run's train_summary.json
    ``best_epoch`` / ``epochs`` / ``chance_loss`` / ``min_train_loss`` (NaN where absent) and, per
    metric, ``<metric>``, ``<metric>_lo`` and ``<metric>_hi`` (NaN where undefined). Unknown metric
    names are kept. Fields missing from a JSON file are taken from its path. ``inputs``: a
    :class:`ReportInputs` (or a results folder: what it holds).
    """
    inputs = inputs_of(inputs)
    layout = inputs.layout
    rows = []
    for path in map(Path, inputs.metrics):
        where = layout.parse_run_file(path)
        data = load_metrics_json(path) if path.is_file() else None
        if where is None or not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
            continue
        row = {key: data.get(key) for key in RESULT_KEYS}
        for key, value in where.items():
            if row.get(key) is None:
                row[key] = value
        row["primary_metric"] = data.get("primary_metric")
        row["lower_is_better"] = tuple(data.get("lower_is_better") or ())
        row["classes"] = tuple(str(c) for c in data.get("classes") or ())
        row["absent_classes"] = tuple(str(c) for c in data.get("absent_classes") or ())
        row["path"] = str(path)
        pred = path.parent / "predictions.parquet"
        row["predictions"] = str(pred) if pred.is_file() else None
        row.update(train_summary(layout, where))
        for name, m in data["metrics"].items():
            m = m if isinstance(m, dict) else {"value": m}
            row[name] = as_float(m.get("value"))
            row[f"{name}_lo"] = as_float(m.get("ci_low"))
            row[f"{name}_hi"] = as_float(m.get("ci_high"))
        rows.append(row)
    df = pd.DataFrame(rows, columns=None if rows else RESULT_KEYS + EXTRA_KEYS)
    if rows:
        df["fraction"] = pd.to_numeric(df["fraction"], errors="coerce")
        df["seed"] = pd.to_numeric(df["seed"], errors="coerce")
        df["fold"] = pd.to_numeric(df["fold"], errors="coerce")
        df["n"] = pd.to_numeric(df["n"], errors="coerce")
    return df


def metric_names(df: pd.DataFrame) -> list[str]:
    """Metric columns of a results frame (those with ``_lo``/``_hi`` partners), in column order."""
    cols = set(df.columns)
    return [c for c in df.columns if f"{c}_lo" in cols and f"{c}_hi" in cols and not c.endswith(("_lo", "_hi"))]


def collect_compare(inputs) -> list[dict]:
    """Every declared compare JSON (:meth:`~retflow.layout.Layout.compare_json`: pairwise model
    comparisons); task, protocol, fraction and seed missing from a file are read from its path, the
    cross-validation fold (None without folds) always."""
    inputs = inputs_of(inputs)
    layout = inputs.layout
    out = []
    for path in map(Path, inputs.compare):
        where = layout.parse_compare_file(path)
        data = load_metrics_json(path) if path.is_file() else None
        if not isinstance(data, dict) or where is None:
            continue
        data.setdefault("task", where["task"])
        data["protocol"] = data.get("protocol") or where["protocol"]
        data["fraction"] = as_float(data.get("fraction") if data.get("fraction") is not None else where["fraction"])
        data["seed"] = int(data["seed"]) if data.get("seed") is not None else int(where["seed"])
        data["fold"] = None if where["fold"] is None else int(where["fold"])
        data["path"] = str(path)
        out.append(data)
    return out


def collect_saliency(inputs) -> dict[str, tuple[Path, dict]]:
    """``{task: (png path, meta dict)}`` of the declared saliency PNGs (+ the JSON beside each when present)."""
    inputs = inputs_of(inputs)
    out = {}
    for png in map(Path, inputs.saliency):
        if not png.is_file():
            continue
        meta_path = Path(inputs.layout.saliency_json(png.stem))
        meta = load_metrics_json(meta_path) if meta_path.is_file() else None
        out[png.stem] = (png, meta if isinstance(meta, dict) else {})
    return out


def collect_benchmarks(benchmarks_dir) -> pd.DataFrame:
    """One row per Snakemake benchmark TSV under ``benchmarks_dir``.

    Columns: job (path relative to the folder, without ``.tsv``), s (seconds; mean over repeats),
    max_rss_mb (max over repeats; NaN where Snakemake wrote ``-``), cpu_time (where recorded).
    """
    rows = []
    root = Path(benchmarks_dir)
    for path in sorted(root.glob("**/*.tsv")) if root.is_dir() else []:
        try:
            tab = pd.read_csv(path, sep="\t", na_values=["-", "NA"])
        except (OSError, ValueError) as exc:
            warnings.warn(f"skipping unreadable benchmark file {path}: {exc}", stacklevel=2)
            continue
        if "s" not in tab.columns or tab.empty:
            continue
        rows.append(
            {
                "job": path.relative_to(root).with_suffix("").as_posix(),
                "s": pd.to_numeric(tab["s"], errors="coerce").mean(),
                "max_rss_mb": pd.to_numeric(tab.get("max_rss", pd.Series(dtype=float)), errors="coerce").max(),
                "cpu_time": pd.to_numeric(tab.get("cpu_time", pd.Series(dtype=float)), errors="coerce").mean(),
            }
        )
    return pd.DataFrame(rows, columns=["job", "s", "max_rss_mb", "cpu_time"])


def collect_pretrain(inputs) -> pd.DataFrame:
    """One row per declared pretraining figure (:meth:`~retflow.layout.Layout.pretrain_figure`:
    ``{run}/{modality}/figure.png``).

    Columns: method (the run), modality, dir, log_csv / figure_png (paths, None when absent), epochs,
    final_loss and seconds (total of the log's ``seconds`` column) from log.csv.
    """
    inputs = inputs_of(inputs)
    rows = []
    layout = inputs.layout
    for figure in map(Path, inputs.pretrain):
        run, modality = figure.parent.parent.name, figure.parent.name
        log = Path(layout.pretrain_log(run, modality))
        row = {
            "method": run,
            "modality": modality,
            "dir": layout.pretrain_dir(run, modality),
            "log_csv": str(log) if log.is_file() else None,
            "figure_png": str(figure) if figure.is_file() else None,
            "epochs": math.nan,
            "final_loss": math.nan,
            "seconds": math.nan,
        }
        if log.is_file():
            try:
                tab = pd.read_csv(log)
                row["epochs"] = len(tab)
                if "loss" in tab and len(tab):
                    row["final_loss"] = float(tab["loss"].iloc[-1])
                if "seconds" in tab:
                    row["seconds"] = float(pd.to_numeric(tab["seconds"], errors="coerce").sum())
            except (OSError, ValueError) as exc:
                warnings.warn(f"unreadable pretraining log {log}: {exc}", stacklevel=2)
        rows.append(row)
    return pd.DataFrame(
        rows, columns=["method", "modality", "dir", "log_csv", "figure_png", "epochs", "final_loss", "seconds"]
    )


def _quarantine_files(inputs: ReportInputs) -> list[Path]:
    """The quarantine.csv beside each declared qc.json (the store of that dataset)."""
    files = (Path(inputs.layout.quarantine(Path(qc).parent.name)) for qc in inputs.qc)
    return [p for p in files if p.is_file()]


def collect_quarantine(inputs) -> pd.DataFrame:
    """Counts of rejected inputs per dataset and reason from each store's ``quarantine.csv``.

    Columns: dataset, reason, count (long format; empty frame when nothing was quarantined).
    """
    parts = []
    for path in _quarantine_files(inputs_of(inputs)):
        try:
            tab = pd.read_csv(path)
        except pd.errors.EmptyDataError:
            continue
        except (OSError, ValueError) as exc:
            warnings.warn(f"unreadable quarantine file {path}: {exc}", stacklevel=2)
            continue
        if tab.empty:
            continue
        reasons = tab["reason"].fillna("unknown").astype(str) if "reason" in tab else pd.Series(["unknown"] * len(tab))
        counts = reasons.value_counts().rename_axis("reason").reset_index(name="count")
        counts.insert(0, "dataset", path.parent.name)
        parts.append(counts)
    if not parts:
        return pd.DataFrame(columns=["dataset", "reason", "count"])
    return pd.concat(parts, ignore_index=True).sort_values(
        ["dataset", "count"], ascending=[True, False], ignore_index=True
    )


def collect_qc(inputs) -> pd.DataFrame:
    """Per-dataset summary from the declared ``qc.json`` files.

    Columns: dataset, modality, role, n_sources, n_images, quarantined, splits (e.g.
    ``"train 300, val 100, test 100"``). Unreadable files are skipped with a warning.
    """
    rows = []
    for path in map(Path, inputs_of(inputs).qc):
        data = load_metrics_json(path) if path.is_file() else None
        if not isinstance(data, dict):
            continue
        splits = data.get("split_counts") or {}
        flags = data.get("quality_flags") or {}
        n_images = data.get("n_images")
        low_quality = None if "quality_ok" not in flags or n_images is None else n_images - flags["quality_ok"]
        rows.append(
            {
                "dataset": data.get("dataset", path.parent.name),
                "modality": data.get("modality"),
                "role": data.get("role"),
                "n_sources": data.get("n_sources"),
                "n_images": n_images,
                "quarantined": data.get("quarantined_inputs", data.get("quarantined")),
                "bad_labels": data.get("quarantined_labels"),
                "unlisted_files": data.get("unlisted_files"),
                "low_quality": low_quality,
                "leakage_warnings": len(data.get("leakage_warnings") or []),
                "splits": ", ".join(f"{k} {v}" for k, v in splits.items()),
            }
        )
    return pd.DataFrame(rows, columns=QC_COLUMNS)


QC_COLUMNS = ["dataset", "modality", "role", "n_sources", "n_images", "quarantined", "bad_labels", "unlisted_files",
              "low_quality", "leakage_warnings", "splits"]


def collect_quarantine_examples(inputs, per_dataset: int = 20) -> pd.DataFrame:
    """The first quarantined entries of each dataset (what a user opens to fix the data)."""
    parts = []
    for path in _quarantine_files(inputs_of(inputs)):
        try:
            tab = pd.read_csv(path, keep_default_na=False, nrows=per_dataset)
        except (OSError, ValueError):
            continue
        if tab.empty:
            continue
        tab.insert(0, "dataset", path.parent.name)
        parts.append(tab[[c for c in ("dataset", "image_id", "reason", "detail", "source") if c in tab]])
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["dataset", "image_id", "reason"])


def collect_leakage(inputs) -> list[str]:
    """Leakage findings (warnings; errors stop the workflow) within and across datasets: each
    declared qc.json's and the cross-dataset :meth:`~retflow.layout.Layout.leakage` file's."""
    inputs = inputs_of(inputs)
    lines = []
    for path in map(Path, inputs.qc):
        data = load_metrics_json(path) if path.is_file() else None
        if isinstance(data, dict):
            lines += list(data.get("leakage_warnings") or [])
    path = Path(inputs.layout.leakage())
    report = load_metrics_json(path) if path.exists() else None
    if isinstance(report, dict):
        for f in report.get("findings", []):
            ids = ", ".join(f.get("ids", [])[:6])
            lines.append(f"[{f.get('kind')}] {f.get('where')}: {ids} -- {f.get('detail', '')}")
    return lines


# ---------------------------------------------------------------- compute cost
def _is_run_job(parts: list[str]) -> bool:
    """``{protocol}/{task}/{model}/frac{f}/[fold{k}/]seed{s}/<step>``."""
    if len(parts) == 7 and parts[4].startswith("fold"):
        parts = parts[:4] + parts[5:]
    return len(parts) == 6 and parts[3].startswith("frac") and parts[4].startswith("seed")


def job_step(job: str) -> str:
    """Workflow step of a benchmark job name: ``report`` -> report, ``data/prepare_x`` -> data,
    ``pretrain/mae_cfp`` -> pretrain, ``compare/...`` -> compare, ``saliency/x`` -> saliency,
    ``{protocol}/{task}/{model}/frac{f}/seed{s}/predict_ext`` -> ``{protocol} predict``."""
    parts = job.split("/")
    if _is_run_job(parts):
        return f"{parts[0]} {parts[-1].split('_')[0]}"
    return parts[0]


def job_model(job: str) -> str | None:
    """Model of a downstream job (``{protocol}/{task}/{model}/...``), else None."""
    parts = job.split("/")
    return parts[2] if _is_run_job(parts) else None


def job_gpus(job: str, gpus: Mapping[str, float]) -> float:
    """GPUs a job held: ``gpus[kind]`` of its rule's resource kind (pretrain -> ``pretrain``,
    downstream training -> ``finetune``; :attr:`retflow.settings.report.ReportSettings.gpus`);
    other rules ask for none."""
    parts = job.split("/")
    if parts[0] == "pretrain":
        return float(gpus["pretrain"])
    if _is_run_job(parts) and parts[-1] == "train":
        return float(gpus["finetune"])
    return 0.0


def cost_frame(benchmarks_dir, gpus: Mapping[str, float]) -> pd.DataFrame:
    """Benchmarks with the step, model, GPU count and hours: columns job, step, model, s, cpu_time,
    max_rss_mb, gpus, wall_h, cpu_h (cpu_time / 3600; NaN where not recorded) and gpu_h (s x gpus)."""
    bench = collect_benchmarks(benchmarks_dir) if benchmarks_dir else pd.DataFrame()
    cols = ["job", "step", "model", "s", "cpu_time", "max_rss_mb", "gpus", "wall_h", "cpu_h", "gpu_h"]
    if bench.empty:
        return pd.DataFrame(columns=cols)
    bench["step"] = bench["job"].map(job_step)
    bench["model"] = bench["job"].map(job_model)
    bench["gpus"] = bench["job"].map(lambda j: job_gpus(j, gpus))
    bench["wall_h"] = bench["s"] / 3600
    bench["cpu_h"] = bench["cpu_time"] / 3600
    bench["gpu_h"] = bench["s"] * bench["gpus"] / 3600
    return bench[cols]


# ---------------------------------------------------------------- fusion vs single modality
def collect_fusion(inputs) -> list[dict]:
    """Every declared same-eyes compare.json (:meth:`~retflow.layout.Layout.same_eyes_json`, written by
    :func:`retflow.data.same_eyes.run`) with ``path`` and ``unpaired``: ``[(modality, reason, count)]``
    counted from the task's ``unpaired.csv`` beside its pairs (None where it is absent)."""
    inputs = inputs_of(inputs)
    out = []
    for path in map(Path, inputs.fusion):
        data = load_metrics_json(path) if path.is_file() else None
        if not isinstance(data, dict) or "task" not in data:
            continue
        data["path"] = str(path)
        unpaired = Path(inputs.layout.unpaired(str(data["task"])))
        data["unpaired"] = None
        if unpaired.is_file():
            try:
                tab = pd.read_csv(unpaired, keep_default_na=False)
                counts = tab.groupby(["modality", "reason"]).size() if len(tab) else pd.Series(dtype=int)
                data["unpaired"] = [(str(m), str(r), int(n)) for (m, r), n in counts.items()]
            except (OSError, ValueError, KeyError) as exc:
                warnings.warn(f"unreadable unpaired list {unpaired}: {exc}", stacklevel=2)
        out.append(data)
    return out
