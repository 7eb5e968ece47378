"""Label validation: every label value either names a task class or is quarantined with a reason.

A dataset's label columns are checked against what the config's tasks expect of them (the
``classes`` of each task that reads the column; 0/1 for ``multilabel_columns``). A bad label
does not discard the image -- it may still serve pretraining or another task's column -- the
cell is blanked and the problem is listed in ``quarantine.csv`` (``missing_label`` or
``unknown_label``, with the raw value).
"""

from __future__ import annotations

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


def label_specs(config: dict, dataset: str) -> dict[str, list[str]]:
    """Allowed values per label column of ``dataset``, from the tasks that use it."""
    spec = config["datasets"][dataset]
    allowed: dict[str, set[str]] = {}
    for task in config.get("tasks", {}).values():
        kind = task["type"]
        if kind not in ("binary", "multiclass", "ordinal", "multilabel"):
            continue  # regression targets are checked numerically when the task runs
        uses = []
        if dataset == task["dataset"]:
            cols = task["label"] if isinstance(task["label"], list) else [task["label"]]
            uses += [(c, ["0", "1"] if kind == "multilabel" else task["classes"]) for c in cols]
        for ext in task.get("external", []):
            ext = {"dataset": ext} if isinstance(ext, str) else ext
            if ext["dataset"] == dataset and kind != "multilabel":
                classes = ext["classes"] if ext.get("map") else task["classes"]
                uses.append((ext.get("label", task["label"]), classes))
        for col, classes in uses:
            allowed.setdefault(col, set()).update(str(c) for c in classes)
    for col in spec.get("multilabel_columns", []) or []:
        allowed.setdefault(col, set()).update({"0", "1"})
    return {col: sorted(values) for col, values in allowed.items()}


def check_labels(records: pd.DataFrame, allowed: dict[str, list[str]]) -> tuple[pd.DataFrame, list[dict]]:
    """Normalise checked label columns; blank and report missing / unknown values.

    Returns the records (checked columns as canonical strings or None) and one problem dict per
    bad cell: ``image_id, source, column, reason, detail``.
    """
    records = records.copy()
    problems = []
    for col, classes in allowed.items():
        if col not in records.columns:
            continue  # a missing column is a config error caught when the task runs
        lookup = set(classes)
        values = pd.Series([normalise_label(v) for v in records[col]], index=records.index, dtype=object)
        for idx, raw, value in zip(records.index, records[col], values):
            if records.at[idx, "issue"]:
                continue  # the whole record is quarantined already
            if value is None:
                problems.append({"image_id": records.at[idx, "image_id"], "source": records.at[idx, "source"],
                                 "column": col, "reason": "missing_label", "detail": f"{col} is empty/NaN"})
            elif value not in lookup:
                problems.append({"image_id": records.at[idx, "image_id"], "source": records.at[idx, "source"],
                                 "column": col, "reason": "unknown_label",
                                 "detail": f"{col}={raw!r} not in {classes}"})
                value = None
            values.at[idx] = value
        records[col] = values.astype(object)
    return records, problems
