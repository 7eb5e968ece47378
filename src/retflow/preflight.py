"""The pre-flight gate: the cheap checks that run before anything expensive.

* :func:`startup_errors` runs when the workflow starts (dry-runs included): every CSV dataset's
  id / patient / eye / split / mask / label columns, and every column a task reads from it, are
  checked against the file's header (one line read per CSV).
"""

from __future__ import annotations

import csv
import difflib
from pathlib import Path

from retflow import config as rfc
from retflow.data.labels import label_reads

COLUMN_KEYS = ("id_column", "patient_column", "eye_column", "split_column", "mask_column")


def csv_header(path: Path) -> list[str]:
    """The column names of a CSV file (its first line), stripped as the data stage strips them."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        row = next(csv.reader(fh), [])
    return [c.strip() for c in row]


def task_columns(config: dict, dataset: str) -> list[tuple[str, str]]:
    """``(key, column)`` for every label column a task reads from ``dataset`` (its own label, an
    external set's): the task part of :func:`retflow.data.labels.label_reads`."""
    return [(key, col) for key, col, _ in label_reads(config, dataset) if key.startswith("tasks.")]


def _missing(key: str, column: str, header: list[str], path: Path) -> str:
    near = difflib.get_close_matches(column, header, n=1, cutoff=0.6)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    return f"{key}: column '{column}' is not in {path} (its columns: {', '.join(header)}){hint}"


def startup_errors(config: dict) -> list[str]:
    """Columns named in the config that a CSV dataset's header lacks, one line each."""
    errors = []
    for name, ds in config["datasets"].items():
        if ds["source"] not in ("csv", "volumes"):
            continue
        path = rfc.dataset_path(config, name, "path")
        if path is None or not path.is_file():
            continue  # a missing file is reported by missing_paths
        try:
            header = csv_header(path)
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            errors.append(f"datasets.{name}.path: cannot read the header of {path} ({exc})")
            continue
        wanted = [(f"datasets.{name}.{key}", ds[key]) for key in COLUMN_KEYS if ds[key]]
        for key in ("label_columns", "multilabel_columns"):
            wanted += [(f"datasets.{name}.{key}", c) for c in ds[key] or []]
        wanted += [(f"datasets.{name}.label_map", c) for c in ds["label_map"]]
        wanted += task_columns(config, name)
        for key, column in dict.fromkeys(wanted):
            if column not in header:
                errors.append(_missing(key, column, header, path))
    return errors
