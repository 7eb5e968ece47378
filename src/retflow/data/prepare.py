"""Prepare one dataset: ingest -> check labels -> preprocess -> split by patient -> leakage -> store.

Writes into the output folder: ``shards/`` (uint8 image shards, see :mod:`retflow.data.store`;
with ``mask_column`` also ``mask_shards/``, the segmentation masks in step with the images; for a
volume dataset with ``preprocess.oct.volume`` set also ``volume_shards/``, each volume whole,
resampled, see :mod:`retflow.data.volume_store`), ``manifest.parquet`` (one row per stored image;
with ``volume_shards/`` its ``volume_index`` column), ``quarantine.csv`` (every input or label that
was not used, with its reason) and ``qc.json`` (counts for the report). Nothing is dropped
silently: an unusable file, a bad label or an unknown eye value is a row in ``quarantine.csv``.
The step fails only where no store can be made (an unreadable labels CSV, no usable image, no
patient split); it then still writes ``quarantine.csv`` and ``qc.json`` (with the ``error``),
and the CLI keeps copies of them in ``--keep-on-failure`` (Snakemake deletes a failed job's
outputs). Thresholds -- ``preprocess.max_quarantine_fraction``, label usability, leakage checks
set to ``error`` -- are judged by the pre-flight gate (:mod:`retflow.preflight_data`), which
reads these files.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import pandas as pd

from retflow.atomic import atomic_path, write_json
from retflow.data import leakage
from retflow.data.ingest import (DatasetError, eye_problem, is_volume_dataset, label_columns, list_records,
                                 unlisted_files)
from retflow.data.io import UnreadableInput
from retflow.data.labels import check_labels
from retflow.data.preprocess import process_record, process_record_with_mask
from retflow.data.splits import FOLD_COLUMN, assign_folds, complete_given_splits, fold_problem, patient_split
from retflow.data.store import MASK_SHARD_DIR, ShardWriter
from retflow.data.volume_store import VOLUME_INDEX, VOLUME_SHARD_DIR, process_volume_record

QUARANTINE_COLUMNS = ["image_id", "source", "reason", "detail", "column", "scope"]


def assign_splits(manifest: pd.DataFrame, spec: dict, labels: list[str], splits: dict) -> pd.Series:
    """Each image's split: ``pool`` (pretraining), ``test`` (external), else by patient with the
    ``splits`` section's ratios and seed (a dataset's own train/val/test kept)."""
    role = spec["role"]
    if role == "pretrain":
        return pd.Series("pool", index=manifest.index, name="split")
    if role == "external":
        return pd.Series("test", index=manifest.index, name="split")
    strata = manifest[labels[0]].astype(str) if labels else None
    seed = splits["seed"]
    if (manifest["given_split"] != "").all():
        return complete_given_splits(manifest["given_split"], manifest["patient_id"], strata, splits, seed)
    return patient_split(manifest["patient_id"], strata, splits, seed)


def add_folds(manifest: pd.DataFrame, name: str, spec: dict, labels: list[str], splits: dict) -> dict | None:
    """Cross-validation (``splits.folds`` >= 2, the dataset's effective count; labelled datasets only):
    the manifest's ``fold`` column (:func:`retflow.data.splits.assign_folds`, a given test split kept)
    and its qc.json entry; None without folds. Too few patients leave the column out and record the
    problem, which the pre-flight gate reports."""
    folds = splits["folds"]
    if spec["role"] != "labelled" or folds < 2:
        return None
    given_test = manifest["given_split"] == "test" if (manifest["given_split"] != "").all() else None
    if given_test is not None and not given_test.any():
        given_test = None
    rest = manifest["patient_id"] if given_test is None else manifest.loc[~given_test, "patient_id"]
    info = {"folds": folds, "patients": int(rest.nunique()), "given_test": given_test is not None}
    problem = fold_problem(name, info["patients"], folds)
    if problem:
        return {**info, "problem": problem}
    strata = manifest[labels[0]].astype(str) if labels else None
    manifest[FOLD_COLUMN] = assign_folds(manifest["patient_id"], strata, folds, splits["seed"], given_test).to_numpy()
    counts = manifest[FOLD_COLUMN].value_counts()
    return {**info, "images": {str(k): int(counts.get(k, 0)) for k in range(folds)}}


def _work(rec: dict, modality: str, prep: dict, volume: bool, masks: bool = False, jpeg_draft: bool = True,
          whole: bool = False):
    """Worker: ``("ok", rows, images[, masks | stack])`` or ``("bad", reason, detail)``; never raises.
    ``whole``: also the volume's resampled stack (``preprocess.oct.volume``). (``jpeg_draft=False``:
    the benchmark's full-decoding reference, never the workflow.)"""
    try:
        if masks:
            return ("ok", *process_record_with_mask(rec, modality, prep, volume, jpeg_draft=jpeg_draft))
        if whole:
            return ("ok", *process_volume_record(rec, prep))
        rows, images = process_record(rec, modality, prep, volume, jpeg_draft=jpeg_draft)
        return "ok", rows, images
    except UnreadableInput as exc:
        return "bad", exc.reason, exc.detail
    except MemoryError:
        return "bad", "too_large", "out of memory while decoding"
    except Exception as exc:  # a library failing on one odd file must not lose the dataset
        return "bad", "unreadable", f"{type(exc).__name__}: {exc}"


def _map(records: list[dict], worker, workers: int):
    if workers <= 1 or len(records) < 8:
        yield from map(worker, records)
        return
    with get_context("spawn").Pool(workers) as pool:  # spawn: no fork of a threaded parent
        yield from pool.imap(worker, records, chunksize=max(1, min(32, len(records) // (8 * workers))))


class _OptionalWriter:
    """Shards written beside the images -- the masks (``mask_shards/``, in step with the images) or
    the whole volumes (``volume_shards/``, one per volume record); a no-op without a ``shard_size``."""

    def __init__(self, out_dir: Path, folder: str, shard_size: int | None):
        self.writer = ShardWriter(out_dir, shard_size, folder=folder) if shard_size is not None else None

    def add(self, array) -> int | None:
        return self.writer.add(array) if self.writer is not None else None

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()

    def close(self) -> list[int] | None:
        return self.writer.close() if self.writer is not None else None


def _quarantine_row(rec: dict, reason: str, detail: str, column: str = "", scope: str = "input") -> dict:
    return {"image_id": rec["image_id"], "source": rec["source"], "reason": reason, "detail": detail,
            "column": column, "scope": scope}


def label_values(problems: list[dict], allowed: dict) -> dict:
    """Per checked label column: its allowed values, and the raw values that were not (with counts)
    and the empty cells -- what the pre-flight gate quotes when a task's labels are unusable."""
    out = {col: {"allowed": classes, "unknown": {}, "missing": 0} for col, classes in allowed.items()
           if classes is not None}
    for p in problems:
        entry = out.setdefault(p["column"], {"allowed": allowed.get(p["column"]), "unknown": {}, "missing": 0})
        if p["value"] is None:
            entry["missing"] += 1
        else:
            entry["unknown"][p["value"]] = entry["unknown"].get(p["value"], 0) + 1
    return out


def prepare(name: str, spec: dict, location: Path, image_dir: Path | None, prep: dict, splits: dict,
            leakage_cfg: dict, out_dir: Path, allowed_labels: dict | None = None, workers: int = 1) -> dict:
    """Prepare dataset ``name`` into ``out_dir``; returns its ``qc.json`` counts.

    ``spec`` is the validated ``datasets.<name>`` entry, ``prep`` / ``splits`` / ``leakage_cfg``
    the validated ``preprocess`` / ``splits`` / ``leakage`` sections (every schema default
    filled: :func:`retflow.settings.validate`); the dataset's own ``leakage`` entry overrides the
    keys it names. ``allowed_labels``: :func:`retflow.data.labels.label_specs` (None: the config
    reads no label column from it).
    """
    t0 = time.perf_counter()
    records = list_records(name, spec, location, image_dir, list(allowed_labels or {}))
    records, label_problems = check_labels(records, allowed_labels or {})
    labels = label_columns(records)
    quarantine = [_quarantine_row(p, p["reason"], p["detail"], p["column"], "label") for p in label_problems]
    if "eye_unknown" in records:
        for rec in records[records["eye_unknown"] != ""].to_dict("records"):
            quarantine.append(_quarantine_row(rec, "unknown_eye", eye_problem(name, rec["eye_unknown"]), "eye", "label"))
        records = records.drop(columns="eye_unknown")
    flagged = records[records["issue"] != ""]
    for rec in flagged.to_dict("records"):
        quarantine.append(_quarantine_row(rec, rec["issue"], rec["issue_detail"]))
    todo = records[records["issue"] == ""].drop(columns=["issue", "issue_detail"]).to_dict("records")

    masks = "mask_source" in records.columns
    if masks and is_volume_dataset(spec):
        raise DatasetError(f"dataset '{name}': mask_column is supported for 2-D image datasets only")
    volumes = is_volume_dataset(spec) and prep["oct"]["volume"] is not None  # whole volumes too
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out_dir, prep["shard_size"])
    mask_writer = _OptionalWriter(out_dir, MASK_SHARD_DIR, prep["shard_size"] if masks else None)
    volume_writer = _OptionalWriter(out_dir, VOLUME_SHARD_DIR,
                                    prep["oct"]["volume"]["shard_size"] if volumes else None)
    rows = []
    worker = partial(_work, modality=spec["modality"], prep=prep, volume=is_volume_dataset(spec), masks=masks,
                     whole=volumes)
    try:
        for rec, result in zip(todo, _map(todo, worker, workers)):
            if result[0] == "bad":
                quarantine.append(_quarantine_row(rec, result[1], result[2]))
                continue
            volume_index = volume_writer.add(result[3]) if volumes else None
            for k, (row, img) in enumerate(zip(result[1], result[2])):
                row["index"] = writer.add(img)
                mask_writer.add(result[3][k] if masks else None)
                if volumes:
                    row[VOLUME_INDEX] = volume_index
                rows.append(row)
    except BaseException:
        writer.abort()
        mask_writer.abort()
        volume_writer.abort()
        raise
    n_total = len(records)
    qdf = pd.DataFrame(quarantine, columns=QUARANTINE_COLUMNS)
    with atomic_path(out_dir / "quarantine.csv") as tmp:
        qdf.to_csv(tmp, index=False)
    inputs_out = qdf.loc[qdf.scope == "input", "source"].nunique()
    counts = qdf["reason"].value_counts().to_dict()
    # the counts the pre-flight gate judges (max_quarantine_fraction, label usability); written
    # with the error when no store can be made, so the evidence outlives the failure
    qc = {
        "dataset": name, "modality": spec["modality"], "role": spec["role"], "n_sources": n_total,
        "quarantined_inputs": int(inputs_out), "quarantined_labels": int((qdf.scope == "label").sum()),
        "quarantine_reasons": counts, "label_values": label_values(label_problems, allowed_labels or {}),
    }

    def fail(message: str):
        writer.abort()
        mask_writer.abort()
        volume_writer.abort()
        write_json({**qc, "error": message}, out_dir / "qc.json")
        raise DatasetError(message)

    if not rows:
        fail(f"dataset '{name}': no usable images among {n_total} inputs; reasons {counts}")
    manifest = pd.DataFrame(rows)
    manifest["bounds"] = manifest["bounds"].map(json.dumps)
    if spec["group_by"] == "image":  # toys only: B-scans of one eye may cross splits
        manifest["patient_id"] = manifest["image_id"]
    try:
        manifest["split"] = assign_splits(manifest, spec, labels, splits).to_numpy()
    except ValueError as exc:
        fail(f"dataset '{name}': cannot split {manifest['patient_id'].nunique()} patients into train/val/test ({exc})")
    folds = add_folds(manifest, name, spec, labels, splits)
    manifest["dataset"] = name
    leak_cfg = {**leakage_cfg, **(spec.get("leakage") or {})}  # a dataset's override is optional
    # findings set to `error` stop the workflow at the pre-flight gate (retflow.preflight_data), not here
    findings = leakage.within_dataset(manifest, name, leak_cfg)
    shape = writer.close()
    mask_shape = mask_writer.close()
    volume_shape = volume_writer.close()
    with atomic_path(out_dir / "manifest.parquet") as tmp:
        manifest.to_parquet(tmp, index=False)
    unlisted = unlisted_files(records, image_dir or (location.parent if location.is_file() else None))
    quality_cols = [c for c in manifest.columns if c.startswith("q_") and manifest[c].dtype == bool]
    qc.update({
        "n_images": int(len(manifest)), "shape": shape, "n_shards": writer.n_shards,
        "label_columns": labels, "split_counts": manifest["split"].value_counts().to_dict(),
        "unlisted_files": len(unlisted), "unlisted_examples": unlisted[:10],
        "quality_flags": {c[2:]: int(manifest[c].sum()) for c in quality_cols},
        "leakage_warnings": [f.line() for f in findings if f.action != "error"],
        "leakage_errors": [f.line() for f in findings if f.action == "error"],
        "seconds": round(time.perf_counter() - t0, 2), "workers": workers,
    })
    if folds is not None:
        qc["folds"] = folds
    if masks:
        qc["mask_shape"] = mask_shape
    if volumes:
        qc["volume_shape"] = volume_shape  # [n_volumes, D, H, W]
    write_json(qc, out_dir / "qc.json")
    return qc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Preprocess and split one dataset into a retflow store.")
    ap.add_argument("--name", required=True)
    ap.add_argument("--spec", required=True, help="the validated datasets.<name> entry (schema defaults filled), JSON")
    ap.add_argument("--location", required=True, help="raw phantom folder, labels CSV, or image folder")
    ap.add_argument("--images", default=None)
    ap.add_argument("--preprocess", required=True, help="the validated preprocess section, JSON")
    ap.add_argument("--splits", required=True, help="the validated splits section, JSON")
    ap.add_argument("--labels", default="{}", help="allowed values per label column, JSON")
    ap.add_argument("--leakage", required=True, help="the validated leakage section, JSON")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--keep-on-failure", default=None,
                    help="folder that receives copies of quarantine.csv and qc.json when the step fails")
    args = ap.parse_args(argv)
    keep = Path(args.keep_on_failure) if args.keep_on_failure else None
    if keep is not None:
        shutil.rmtree(keep, ignore_errors=True)  # evidence of an earlier failure is stale now
    try:
        qc = prepare(args.name, json.loads(args.spec), Path(args.location),
                     Path(args.images) if args.images else None, json.loads(args.preprocess),
                     json.loads(args.splits), json.loads(args.leakage), Path(args.out_dir),
                     json.loads(args.labels), args.workers)
    except DatasetError as exc:
        print(f"ERROR: {exc}{keep_evidence(Path(args.out_dir), keep)}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in qc.items() if k not in ("leakage_warnings", "leakage_errors")}))
    for line in qc["leakage_warnings"]:
        print(f"WARNING: leakage {line}", file=sys.stderr)
    for line in qc["leakage_errors"]:
        print(f"LEAKAGE (stops the workflow at the pre-flight gate): {line}", file=sys.stderr)
    return 0


def keep_evidence(out_dir: Path, keep: Path | None) -> str:
    """Copy a failed step's quarantine.csv and qc.json into ``keep``; the text naming them for the error."""
    files = [out_dir / f for f in ("quarantine.csv", "qc.json") if (out_dir / f).is_file()]
    if not files:
        return ""
    if keep is None:
        return f"; see {' and '.join(str(f) for f in files)}"
    keep.mkdir(parents=True, exist_ok=True)
    files = [Path(shutil.copy2(f, keep / f.name)) for f in files]
    return f"; the quarantine list and counts are kept in {' and '.join(str(f) for f in files)}"


if __name__ == "__main__":
    sys.exit(main())
