"""Label validation: every label value either names a task class or is quarantined with a reason.

:func:`label_specs` (built on :func:`label_reads`, which the startup column check shares) names
the label columns the config reads from a dataset -- the data stage keeps exactly these (plus an
explicit ``label_columns``), never "every other column" -- and what each may hold: the
``classes`` of each task that reads the column; 0/1 for multilabel tasks and
``multilabel_columns``; None for a column that is kept but not checked here (a regression target,
checked numerically when the task runs; a synthetic generator's conditioning label, whose other
values train it unconditionally). A bad label does not discard the image -- it may still serve
pretraining or another task's column -- the cell is blanked and the problem is listed in
``quarantine.csv`` (``missing_label`` or ``unknown_label``, with the raw value).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd


def normalise_label(value) -> str | None:
    """Canonical text of a raw label value (``" 2.0 "`` -> ``"2"``); None for missing."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    text = str(value).strip()
    if text == "" or text.lower() in ("nan", "na", "n/a", "none", "null"):
        return None
    if text.endswith(".0") and text[:-2].lstrip("-").isdigit():
        text = text[:-2]
    return text


def label_reads(config: dict, dataset: str) -> Iterator[tuple[str, str, list | None]]:
    """``(config key, column, allowed values)`` for every label column the config reads from
    ``dataset``, in config order: the tasks' labels (key ``tasks.<task>.label``) and external labels
    (``tasks.<task>.external.<dataset>.label`` when the external set names its own), then
    ``multilabel_columns`` and a synthetic generator's conditioning label; a fusion task's ``visit``
    column in both of its datasets. Allowed values: the
    classes of a classification task, 0/1 for multilabel, None for a column kept but not checked
    here (a regression target, a conditioning label). The key names where the column is set,
    for messages (:func:`retflow.preflight.startup_errors`)."""
    spec = config["datasets"][dataset]
    for name, task in config["tasks"].items():
        kind = task["type"]
        if kind == "segmentation":
            continue  # masks, no label column
        binary = ["0", "1"] if kind == "multilabel" else None
        checked = kind in ("binary", "multiclass", "ordinal")  # regression: checked when the task runs
        if dataset == task["dataset"]:
            cols = task["label"] if isinstance(task["label"], list) else [task["label"]]
            for col in cols:
                yield f"tasks.{name}.label", col, binary or (task["classes"] if checked else None)
        for ext in task["external"]:
            ext = {"dataset": ext} if isinstance(ext, str) else ext
            if ext["dataset"] != dataset:
                continue
            label = ext.get("label", task["label"])  # optional: the task's column
            key = f"tasks.{name}.external.{dataset}.label" if "label" in ext else f"tasks.{name}.label"
            classes = ext["classes"] if ext.get("map") else task.get("classes")  # both optional
            for col in label if isinstance(label, list) else [label]:
                yield key, col, binary or (classes if checked else None)
        block = task.get("fusion")  # optional: fusion tasks only
        if block and block["visit"] and dataset in (block["cfp"], block["oct"]):
            yield f"tasks.{name}.fusion.visit", block["visit"], None  # pairs must share it: kept, not checked
    for col in spec["multilabel_columns"]:
        yield f"datasets.{dataset}.multilabel_columns", col, ["0", "1"]
    yield from _conditioning_labels(config, dataset)


def label_specs(config: dict, dataset: str) -> dict[str, list[str] | None]:
    """The label columns the config reads from ``dataset`` (:func:`label_reads`), each with its
    allowed values (None: kept, not checked against classes)."""
    allowed: dict[str, set[str] | None] = {}
    for _, col, classes in label_reads(config, dataset):
        if classes is None:
            allowed.setdefault(col, None)
        else:
            allowed[col] = (allowed.get(col) or set()) | {str(c) for c in classes}
    return {col: None if values is None else sorted(values) for col, values in allowed.items()}


def _conditioning_labels(config: dict, dataset: str) -> Iterator[tuple[str, str, None]]:
    """A synthetic generator's conditioning label: read from its pools and its TSTR dataset."""
    from retflow.synth import settings as synth

    if not synth.enabled(config):
        return
    for modality in synth.modalities(config):
        cond = synth.condition(config, modality)
        if cond and (dataset in synth.pools(config, modality) or dataset == synth.tstr_dataset(config, modality)):
            yield f"synth.condition.{modality}.label", cond["label"], None


def usable_labels(manifest: pd.DataFrame, kind: str, columns: list[str], classes: list[str]) -> np.ndarray:
    """Rows whose label a task of ``kind`` can use (what :func:`retflow.train.targets.encode_targets`
    counts as valid, without importing torch): binary / multiclass / ordinal: a value in
    ``classes``; multilabel: 0/1 in every column; regression: a finite number."""
    if kind in ("binary", "multiclass", "ordinal"):
        return manifest[columns[0]].map(normalise_label).isin([str(c) for c in classes]).to_numpy()
    if kind == "multilabel":
        return np.all([manifest[c].map(normalise_label).isin(["0", "1"]).to_numpy() for c in columns], axis=0)
    return np.isfinite(pd.to_numeric(manifest[columns[0]], errors="coerce").to_numpy(dtype=float))


def check_labels(records: pd.DataFrame, allowed: dict[str, list[str] | None]) -> tuple[pd.DataFrame, list[dict]]:
    """Normalise checked label columns; blank and report missing / unknown values.

    Returns the records (checked columns as canonical strings or None) and one problem dict per
    bad cell: ``image_id, source, column, reason, detail, value`` (``value``: the raw text as a
    ``label_map`` key matches it, None when empty).
    """
    records = records.copy()
    problems = []
    for col, classes in allowed.items():
        if col not in records.columns or classes is None:
            continue  # a missing column is a config error caught when the task runs; None: not checked here
        lookup = set(classes)
        values = pd.Series([normalise_label(v) for v in records[col]], index=records.index, dtype=object)
        for idx, raw, value in zip(records.index, records[col], values):
            if records.at[idx, "issue"]:
                continue  # the whole record is quarantined already
            if value is None:
                problems.append({"image_id": records.at[idx, "image_id"], "source": records.at[idx, "source"],
                                 "column": col, "reason": "missing_label", "detail": f"{col} is empty/NaN",
                                 "value": None})
            elif value not in lookup:
                problems.append({"image_id": records.at[idx, "image_id"], "source": records.at[idx, "source"],
                                 "column": col, "reason": "unknown_label",
                                 "detail": f"{col}={raw!r} not in {classes}", "value": str(raw).strip()})
                value = None
            values.at[idx] = value
        records[col] = values.astype(object)
    return records, problems
