"""The data-stage pre-flight gate (rule ``preflight``): nothing expensive starts before every
dataset of the config has passed these checks.

It runs once every dataset is prepared and the cross-dataset leakage check has written its
report; every pretraining, synthesis, fine-tuning and segmentation job takes its output
(``{results}/data/preflight.json``) as input. It reads each store's ``qc.json`` and
``manifest.parquet`` and the leakage report, and lists every problem of every dataset and task
at once, one line each:

* a dataset with more quarantined inputs than ``preprocess.max_quarantine_fraction``;
* leakage findings set to ``error`` (within a dataset: its ``qc.json``; across datasets:
  ``leakage.json``);
* a pool member that gives its pool no image (:mod:`retflow.data.pools`);
* a task whose labels are mostly unusable -- more than ``preprocess.max_unusable_label_fraction``
  of its dataset's (or an external set's) images empty or outside the task's classes -- naming
  the column, the values with their counts and the ``label_map`` entry that maps them;
* what would otherwise fail only inside a fine-tuning job: a label column missing from the
  manifest, a split (train / val / test) without one usable label; a segmentation task without
  masks, without images in a split, or with mask values beyond its classes.

Warnings (a labelled dataset's val/test images in a pool, when ``pretrain.labelled_pool_splits``
asks for them) are printed and recorded in the output, which the report quotes
(:func:`pool_note`). The gate's evidence -- ``quarantine.csv``, ``qc.json``, ``leakage.json`` --
are its inputs, so a failed gate deletes none of them.

:func:`gate_checks` turns the config into what the gate checks: only what decides its verdict
(no fractions, models, protocols, nor a task type beyond the kind of label, nor the tasks' names:
:func:`task_names` only labels the messages), because a change there reruns the gate -- and with
it every job after it. The module imports no torch: the gate
runs in seconds.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from retflow import config as rfc
from retflow.atomic import write_json
from retflow.data.labels import normalise_label, usable_labels
from retflow.data.leakage import Finding
from retflow.data.pools import pool_mask, pool_members
from retflow.data.store import MASK_SHARD_DIR, ImageStore
from retflow.layout import Layout

SPLITS = ("train", "val", "test")
CLASSIFICATION = ("binary", "multiclass", "ordinal")
#: leakage findings listed one by one per dataset (and across datasets); the rest are counted
MAX_FINDINGS = 20
#: label values quoted in a message; the rest are counted
MAX_VALUES = 8


# ------------------------------------------------------------------------------ what is checked
def _kind(task_type: str) -> str:
    """The kind of label a task reads: classes | multilabel | regression | segmentation."""
    return "classes" if task_type in CLASSIFICATION else task_type


def _use(dataset: str, scope: str, kind: str, label, classes) -> dict:
    columns = list(label) if isinstance(label, list | tuple) else ([] if label is None else [label])
    domain = [str(c) for c in classes] if kind in ("classes", "segmentation") else (["0", "1"] if kind == "multilabel" else [])
    return {"dataset": dataset, "scope": scope, "kind": kind, "columns": columns, "classes": domain}


def use_key(use: dict) -> str:
    """One label use as text: ``scope:dataset:columns:kind:classes``."""
    return ":".join([use["scope"], use["dataset"], "/".join(use["columns"]), use["kind"], ",".join(use["classes"])])


def _task_uses(config: dict):
    """``(task name, use)`` for each task's own dataset and each external set it is evaluated on."""
    for name, task in sorted(config["tasks"].items()):
        yield name, _use(task["dataset"], "internal", _kind(task["type"]), task.get("label"),  # segmentation: none
                         task.get("classes") or [])
        for ext in rfc.external_sets(task):
            e = rfc.external_eval(config, name, ext["dataset"])
            yield name, _use(ext["dataset"], "external", _kind(e["type"]), e["label"], e["classes"])


def task_names(config: dict) -> dict[str, list[str]]:
    """``{use_key: [tasks]}``: who reads each label use, to name them in the gate's messages."""
    out: dict[str, list[str]] = {}
    for name, use in _task_uses(config):
        out.setdefault(use_key(use), []).append(name)
    return out


def gate_checks(config: dict) -> dict:
    """What the gate checks (JSON-able): thresholds, pools and the distinct label uses
    ``{dataset, scope: internal|external, kind, columns, classes}`` -- without the tasks' names
    (:func:`task_names`), so that adding a task that reads labels already checked changes nothing."""
    uses = {use_key(use): use for _, use in _task_uses(config)}
    prep = config["preprocess"]
    return {
        "max_quarantine_fraction": prep["max_quarantine_fraction"],
        "max_unusable_label_fraction": prep["max_unusable_label_fraction"],
        "labelled_pool_splits": list(config["pretrain"]["labelled_pool_splits"]),
        "pools": pool_members(config),
        "uses": [uses[k] for k in sorted(uses)],
    }


# ------------------------------------------------------------------------------ the verdict
@dataclass
class Verdict:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


@dataclass
class Store:
    name: str
    path: Path
    qc: dict
    manifest: pd.DataFrame

    def where(self, file: str) -> str:
        return str(self.path / file)


def _read_store(path: Path, columns: set[str]) -> Store:
    import pyarrow.parquet as pq

    present = set(pq.read_schema(path / "manifest.parquet").names)
    wanted = sorted({"split", "index"} | (columns & present))
    return Store(path.name, path, json.loads((path / "qc.json").read_text()),
                 pd.read_parquet(path / "manifest.parquet", columns=wanted))


def _counts(series: pd.Series) -> dict[str, int]:
    return {str(k): int(v) for k, v in series.value_counts().items()}


def _dataset_problems(store: Store, limit: float) -> list[str]:
    qc, out = store.qc, []
    n, bad = qc["n_sources"], qc["quarantined_inputs"]
    if bad / max(1, n) > limit:
        out.append(f"dataset '{store.name}': {bad}/{n} inputs quarantined ({bad / max(1, n):.1%} > "
                   f"preprocess.max_quarantine_fraction {limit:.1%}); reasons {qc['quarantine_reasons']}; "
                   f"the list: {store.where('quarantine.csv')} (fix or remove those files, or raise the limit)")
    folds = qc.get("folds") or {}  # qc.json of a cross-validated dataset only
    if folds.get("problem"):
        out.append(folds["problem"])
    errors = qc["leakage_errors"]
    for line in errors[:MAX_FINDINGS]:
        kind = line[1:line.index("]")] if line.startswith("[") else "<kind>"
        out.append(f"dataset '{store.name}': leakage between splits {line} (set leakage.{kind}: warn, or "
                   f"datasets.{store.name}.leakage.{kind}: warn, to continue)")
    if len(errors) > MAX_FINDINGS:
        out.append(f"dataset '{store.name}': {len(errors) - MAX_FINDINGS} more leakage findings, listed in "
                   f"{store.where('qc.json')}")
    return out


def _leakage_problems(report: dict, path: Path) -> list[str]:
    errors = [f for f in report["findings"] if f["action"] == "error"]
    out = [f"leakage {Finding(**f).line()} (set leakage.{f['kind']}: warn to continue)" for f in errors[:MAX_FINDINGS]]
    if len(errors) > MAX_FINDINGS:
        out.append(f"leakage: {len(errors) - MAX_FINDINGS} more findings between datasets, listed in {path}")
    return out


def _pools(stores: dict[str, Store], checks: dict, verdict: Verdict) -> dict:
    splits = checks["labelled_pool_splits"]
    summary: dict[str, dict[str, int]] = {}
    for name, keys in sorted(checks["pools"].items()):
        store = stores[name]
        n = int(pool_mask(store.manifest, splits).sum())
        for key in keys:
            summary.setdefault(key, {})[name] = n
        split_counts = _counts(store.manifest["split"])
        if n == 0:
            verdict.problems.append(
                f"{', '.join(keys)}: dataset '{name}' (role {store.qc['role']}) gives the pool no image: a pool takes "
                f"a pretrain dataset's images and the pretrain.labelled_pool_splits {splits} of the others, and "
                f"'{name}' has {split_counts}; remove it from the pool")
        held_out = {s: split_counts[s] for s in splits if s != "train" and s in split_counts}
        if held_out and store.qc["role"] != "pretrain":
            verdict.warnings.append(
                f"pretrain.labelled_pool_splits {splits}: {', '.join(keys)} takes the "
                f"{', '.join(f'{k} {s}' for s, k in held_out.items())} images of '{name}', which its tasks "
                f"validate or test on: pretraining sees them (the report says so)")
        folds = store.qc.get("folds") or {}  # qc.json of a cross-validated dataset only
        if n and folds.get("images") and store.qc["role"] != "pretrain":
            verdict.warnings.append(
                f"{', '.join(keys)} takes {n} images of '{name}', which is cross-validated ({folds['folds']} "
                f"folds): each of its patients is in one fold's test part, so every fold's model is tested on "
                f"images its encoder was pretrained on (remove '{name}' from {', '.join(keys)}, or set "
                f"datasets.{name}.folds: 1; the report says so)")
    return summary


def _quote(text: str) -> str:
    """A YAML scalar as a person would type it in the config."""
    special = {"yes", "no", "true", "false", "on", "off", "null", "y", "n", "~", "<class>"}
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_ .-]*", text) and text.lower() not in special and text == text.strip():
        return text
    return "'" + text.replace("'", "''") + "'"


def _label_map_fix(dataset: str, column: str, values: list[str], classes: list[str]) -> str:
    lookup = {c.lower(): c for c in classes}
    entries = ", ".join(f"{_quote(v)}: {_quote(lookup.get(v.lower(), '<class>'))}" for v in values[:MAX_VALUES])
    more = ", ..." if len(values) > MAX_VALUES else ""
    return (f"datasets.{dataset}.label_map: {{{column}: {{{entries}{more}}}}} "
            f"(<class> one of {', '.join(_quote(c) for c in classes)})")


def _bad_values(use: dict, store: Store, column: str) -> tuple[Counter, int]:
    """The values of ``column`` no use of this task can take, with counts (the raw values the data
    stage quarantined + stored values outside the task's classes), and the empty cells."""
    entry = store.qc["label_values"].get(column) or {"unknown": {}, "missing": None}  # only checked columns
    values = Counter(entry["unknown"])
    raw = store.manifest[column]
    canon = raw.map(normalise_label)
    if use["kind"] == "regression":
        bad = canon.notna() & pd.to_numeric(raw, errors="coerce").isna()
    else:
        bad = canon.notna() & ~canon.isin(use["classes"])
    values.update(raw[bad].astype(str).str.strip())
    empty = entry["missing"] if entry["missing"] is not None else int(canon.isna().sum())
    return values, empty


def _who(tasks: list[str]) -> str:
    """``task 'a'`` or ``tasks 'a', 'b'``."""
    return ("task " if len(tasks) == 1 else "tasks ") + ", ".join(f"'{t}'" for t in tasks)


def _unusable(use: dict, tasks: list[str], store: Store, n_bad: int, n: int, limit: float) -> str:
    ds = store.name
    what, fixes = [], []
    for col in use["columns"]:
        values, empty = _bad_values(use, store, col)
        ranked = sorted(values, key=lambda v: (-values[v], v))  # most frequent first, then by name
        listed = ", ".join(f"'{v}' ({values[v]})" for v in ranked[:MAX_VALUES])
        if len(values) > MAX_VALUES:
            listed += f", {len(values) - MAX_VALUES} more values"
        if values and use["kind"] == "regression":
            what.append(f"column '{col}' holds {listed}, which are not numbers")
            fixes.append(f"make '{col}' numeric in the labels CSV")
        elif values:
            what.append(f"column '{col}' holds {listed}, not the task's classes "
                        f"{', '.join(repr(c) for c in use['classes'])}")
            fixes.append(_label_map_fix(ds, col, ranked, use["classes"]))
        if empty:
            what.append(f"'{col}' is empty in {empty} rows")
    if not fixes:
        fixes.append(f"fill the column in the labels CSV, or read another one (tasks.{tasks[0]}.label)")
    return (f"{_who(tasks)}: {n_bad} of {n} images of dataset '{ds}' have no usable label ({n_bad / max(1, n):.0%} "
            f"> preprocess.max_unusable_label_fraction {limit:.0%}): {'; '.join(what)}; fix: {'; '.join(fixes)}; "
            f"the quarantined labels: {store.where('quarantine.csv')}")


def _label_use(use: dict, tasks: list[str], store: Store, limit: float, verdict: Verdict) -> dict:
    ds, m = store.name, store.manifest
    entry = {"tasks": tasks, "dataset": ds, "scope": use["scope"], "columns": use["columns"], "images": len(m)}
    missing = [c for c in use["columns"] if c not in m.columns]
    if missing:
        verdict.problems.append(
            f"{_who(tasks)}: dataset '{ds}' has no label column {', '.join(repr(c) for c in missing)} in "
            f"{store.where('manifest.parquet')} (its label columns: {store.qc['label_columns']}); fix "
            f"tasks.{tasks[0]}.label or the dataset's columns")
        return entry
    kind = {"classes": "multiclass"}.get(use["kind"], use["kind"])
    valid = usable_labels(m, kind, use["columns"], use["classes"])
    split = m["split"].to_numpy()
    entry["usable"] = int(valid.sum())
    entry["usable_per_split"] = {s: int(valid[split == s].sum()) for s in (SPLITS if use["scope"] == "internal" else ())}
    n_bad = len(m) - entry["usable"]
    if n_bad / max(1, len(m)) > limit or entry["usable"] == 0:
        verdict.problems.append(_unusable(use, tasks, store, n_bad, len(m), limit))
        return entry
    for s, k in entry["usable_per_split"].items():
        if k == 0:
            verdict.problems.append(
                f"{_who(tasks)}: no usable {'/'.join(use['columns'])} label in split '{s}' of dataset '{ds}' "
                f"({int((split == s).sum())} images in that split); fine-tuning needs labelled train, val and test "
                f"images (see datasets.{ds}.split_column / the splits section, and {store.where('quarantine.csv')})")
    return entry


def _segmentation_use(use: dict, tasks: list[str], store: Store, verdict: Verdict) -> dict:
    ds, who = store.name, _who(tasks)
    split = store.manifest["split"]
    entry = {"tasks": tasks, "dataset": ds, "scope": use["scope"], "images": len(store.manifest),
             "images_per_split": {s: int((split == s).sum()) for s in SPLITS}}
    if "mask_shape" not in store.qc:
        verdict.problems.append(f"{who}: dataset '{ds}' has no masks (no {store.where('mask_shards')}); "
                                f"give it a mask_column (csv) or phantom masks: true")
        return entry
    for s, k in entry["images_per_split"].items():
        if k == 0:
            verdict.problems.append(f"{who}: no images in split '{s}' of dataset '{ds}'; segmentation needs "
                                    f"train, val and test images")
    # retflow.data.seg_dataset.max_mask_value's one pass, without importing torch (the gate stays cheap)
    top = max(int(np.load(p, mmap_mode="r").max()) for p in ImageStore(store.path, MASK_SHARD_DIR).paths)
    if top >= len(use["classes"]):
        verdict.problems.append(f"{who}: the masks of dataset '{ds}' hold value {top}, but tasks.{tasks[0]}.classes "
                                f"has {len(use['classes'])} classes {use['classes']} (mask value = class index)")
    return entry


def run_gate(stores: list[str | Path], leakage_report: str | Path, checks: dict, names: dict[str, list[str]],
             weights_report: str | Path | None = None) -> Verdict:
    """Every check of the gate over the prepared ``stores``, the cross-dataset ``leakage_report`` and
    the weights files' check (:mod:`retflow.preflight_weights`, when the config names any);
    ``names``: the tasks of each label use (:func:`task_names`), for the messages."""
    columns = {c for use in checks["uses"] for c in use["columns"]}
    by_name = {Path(s).name: _read_store(Path(s), columns) for s in stores}
    verdict = Verdict()
    for store in by_name.values():
        verdict.problems += _dataset_problems(store, checks["max_quarantine_fraction"])
    report = json.loads(Path(leakage_report).read_text())
    verdict.problems += _leakage_problems(report, Path(leakage_report))
    weights = json.loads(Path(weights_report).read_text()) if weights_report else {"checked": [], "problems": []}
    verdict.problems += weights["problems"]
    pools = _pools(by_name, checks, verdict)
    tasks = []
    for use in checks["uses"]:
        store, who = by_name[use["dataset"]], names[use_key(use)]
        if use["kind"] == "segmentation":
            tasks.append(_segmentation_use(use, who, store, verdict))
        else:
            tasks.append(_label_use(use, who, store, checks["max_unusable_label_fraction"], verdict))
    verdict.summary = {
        "status": "ready" if not verdict.problems else "failed",
        "datasets": {s.name: {"role": s.qc["role"], "modality": s.qc["modality"], "sources": s.qc["n_sources"],
                              "images": len(s.manifest), "splits": _counts(s.manifest["split"]),
                              "quarantined_inputs": s.qc["quarantined_inputs"],
                              "quarantined_labels": s.qc["quarantined_labels"]} for s in by_name.values()},
        "pools": pools,
        "labelled_pool_splits": checks["labelled_pool_splits"],
        "tasks": tasks,
        "leakage": {"errors": report["n_errors"], "warnings": report["n_warnings"],
                    "warnings_within_datasets": sum(len(s.qc["leakage_warnings"]) for s in by_name.values())},
        "weights": [{k: c[k] for k in ("key", "path", "layout", "problem")} for c in weights["checked"]],
        "warnings": verdict.warnings,
    }
    return verdict


# ------------------------------------------------------------------------------ what a person reads
def summary_lines(summary: dict) -> list[str]:
    """What the gate checked, for the console."""
    ds = summary["datasets"]
    lines = [f"pre-flight: {len(ds)} datasets, {sum(d['images'] for d in ds.values())} images "
             f"({sum(d['quarantined_inputs'] for d in ds.values())} inputs and "
             f"{sum(d['quarantined_labels'] for d in ds.values())} labels quarantined), {len(summary['tasks'])} task uses"]
    for name, d in ds.items():
        splits = ", ".join(f"{s} {k}" for s, k in d["splits"].items())
        lines.append(f"  dataset {name} ({d['role']} {d['modality']}): {d['images']} images from {d['sources']} "
                     f"inputs ({splits}); quarantined {d['quarantined_inputs']} inputs, {d['quarantined_labels']} labels")
    for key, members in summary["pools"].items():
        lines.append(f"  {key}: " + ", ".join(f"{n} {k} images" for n, k in members.items()))
    for t in summary["tasks"]:
        if "images_per_split" in t:
            counts = ", ".join(f"{s} {k}" for s, k in t["images_per_split"].items())
            lines.append(f"  {_who(t['tasks'])} (segmentation, {t['dataset']}): images {counts}")
        elif "usable" in t:
            counts = (", ".join(f"{s} {k}" for s, k in t["usable_per_split"].items()) if t["scope"] == "internal"
                      else f"{t['usable']} of {t['images']}")
            lines.append(f"  {_who(t['tasks'])} ({t['scope']} {t['dataset']}: {'/'.join(t['columns'])}): usable labels {counts}")
    for c in summary["weights"]:
        lines.append(f"  weights {c['key']}: {c['path']} ({c['layout']}){': does not fit' if c['problem'] else ': fits'}")
    leak = summary["leakage"]
    lines.append(f"  leakage: {leak['errors']} errors, {leak['warnings']} warnings across datasets, "
                 f"{leak['warnings_within_datasets']} within datasets")
    return lines


def pool_note(results_dir: str | Path) -> str:
    """One sentence for the report: what each pool took from each dataset (``preflight.json``)."""
    path = Path(Layout(str(results_dir)).preflight())
    if not path.is_file():
        return ""
    summary = json.loads(path.read_text())
    if not summary["pools"]:
        return ""
    parts = [f"{key}: " + ", ".join(f"{n} ({k} images)" for n, k in members.items())
             for key, members in summary["pools"].items()]
    text = (f"Pretraining pools: {'; '.join(parts)}. Labelled datasets give a pool their "
            f"{', '.join(summary['labelled_pool_splits'])} images (pretrain.labelled_pool_splits).")
    if summary["warnings"]:
        text += " Warning: " + " ".join(summary["warnings"])
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="The pre-flight gate: every dataset's checks before anything expensive.")
    ap.add_argument("--stores", nargs="+", required=True, help="prepared dataset folders (every dataset)")
    ap.add_argument("--leakage-report", required=True, help="the cross-dataset leakage report (leakage.json)")
    ap.add_argument("--checks", required=True, help="what to check, JSON (retflow.preflight_data.gate_checks)")
    ap.add_argument("--names", required=True, help="the tasks of each label use, JSON (task_names)")
    ap.add_argument("--weights-report", default=None, help="weights.json (retflow.preflight_weights), when the "
                                                               "config names weights files")
    ap.add_argument("--out", required=True, help="preflight.json, written when every check passes")
    args = ap.parse_args(argv)
    verdict = run_gate(args.stores, args.leakage_report, json.loads(args.checks), json.loads(args.names),
                       args.weights_report)
    for line in summary_lines(verdict.summary):
        print(line)
    for line in verdict.warnings:
        print(f"WARNING: {line}")
    if verdict.problems:
        for line in verdict.problems:
            print(f"ERROR: {line}")
        print(f"ERROR: the pre-flight gate found {len(verdict.problems)} problem(s), listed above; no pretraining, "
              f"synthesis or fine-tuning has started (`snakemake preflight` runs these checks alone)")
        return 1
    write_json(verdict.summary, Path(args.out))
    print("ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
