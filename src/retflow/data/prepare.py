"""Prepare one dataset: ingest -> preprocess -> patient-level split -> checks -> store.

Writes ``images.npy`` (uint8 N x H x W x C), ``manifest.parquet``, ``quarantine.csv`` and
``qc.json`` into the output folder. Unusable inputs are quarantined with a reason, never
dropped silently; the step fails only when the quarantined fraction exceeds the configured limit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from retflow.atomic import atomic_path, write_json
from retflow.data.ingest import DatasetError, is_volume_dataset, list_records
from retflow.data.io import UnreadableInput, central_bscans, read_image, read_volume, sha256_file
from retflow.data.preprocess import preprocess_cfp, preprocess_oct
from retflow.data.splits import patient_split

BASE_COLUMNS = ("image_id", "source", "patient_id", "eye", "given_split")


class LeakageError(ValueError):
    """The same patient or the same image appears in two splits."""


def _preprocess_record(rec: dict, spec: dict, prep: dict, volume: bool):
    """Yield (row, image) pairs for one record (several for a multi-B-scan volume)."""
    modality = spec["modality"]
    min_side = prep.get("min_side", 32)
    if volume:
        vol = read_volume(rec["source"])
        if min(vol.shape[1:]) < min_side:
            raise UnreadableInput(rec["source"], "too_small", f"B-scan {vol.shape[1:]}")
        k = prep["oct"].get("bscans", 1)
        for index, bscan in central_bscans(vol, k):
            img, info = preprocess_oct(bscan, prep["oct"]["size"])
            suffix = f"_b{index:03d}" if k > 1 else ""
            yield {**rec, "image_id": rec["image_id"] + suffix, "frame": index, **info}, img
        return
    raw = read_image(rec["source"])
    if min(raw.shape[:2]) < min_side:
        raise UnreadableInput(rec["source"], "too_small", f"{raw.shape[1]}x{raw.shape[0]}")
    if modality == "cfp":
        img, info = preprocess_cfp(raw, prep["cfp"]["size"], prep["cfp"].get("crop_border", True))
    else:
        img, info = preprocess_oct(raw, prep["oct"]["size"])
    yield {**rec, "frame": -1, **info}, img


def assign_splits(manifest: pd.DataFrame, role: str, label_columns: list[str], splits: dict) -> pd.Series:
    if role == "pretrain":
        return pd.Series("pool", index=manifest.index)
    if role == "external":
        return pd.Series("test", index=manifest.index)
    given = manifest["given_split"]
    if (given != "").all():
        return given.rename("split")
    strata = manifest[label_columns[0]] if label_columns else None
    return patient_split(manifest["patient_id"], strata, splits, splits.get("seed", 0))


def check_leakage(manifest: pd.DataFrame) -> list[str]:
    """Problems where a patient or an identical source file is in more than one split."""
    problems = []
    per_patient = manifest.groupby("patient_id")["split"].nunique()
    for patient in per_patient[per_patient > 1].index[:20]:
        splits = sorted(manifest.loc[manifest.patient_id == patient, "split"].unique())
        problems.append(f"patient {patient} in splits {splits}")
    per_hash = manifest.groupby("sha256")["split"].nunique()
    for digest in per_hash[per_hash > 1].index[:20]:
        ids = manifest.loc[manifest.sha256 == digest, "image_id"].tolist()
        problems.append(f"identical image in several splits: {ids}")
    return problems


def prepare(name: str, spec: dict, location: Path, image_dir: Path | None, prep: dict,
            splits: dict, out_dir: Path) -> dict:
    records = list_records(name, spec, location, image_dir)
    label_columns = [c for c in records.columns if c not in BASE_COLUMNS]
    volume = is_volume_dataset(spec)
    rows, images, quarantine = [], [], []
    for rec in records.to_dict("records"):
        try:
            digest = sha256_file(rec["source"])
            for row, img in _preprocess_record(rec, spec, prep, volume):
                rows.append({**row, "sha256": digest})
                images.append(img)
        except (UnreadableInput, FileNotFoundError) as exc:
            reason = getattr(exc, "reason", "missing_file")
            quarantine.append({"source": rec["source"], "image_id": rec["image_id"], "reason": reason,
                               "detail": getattr(exc, "detail", str(exc))})
    n_total = len(records)
    frac = len(quarantine) / max(1, n_total)
    limit = prep.get("max_quarantine_fraction", 0.05)
    out_dir.mkdir(parents=True, exist_ok=True)
    qdf = pd.DataFrame(quarantine, columns=["source", "image_id", "reason", "detail"])
    with atomic_path(out_dir / "quarantine.csv") as tmp:
        qdf.to_csv(tmp, index=False)
    if frac > limit:
        counts = qdf["reason"].value_counts().to_dict()
        raise DatasetError(
            f"dataset '{name}': {len(quarantine)}/{n_total} inputs quarantined ({frac:.1%} > "
            f"preprocess.max_quarantine_fraction {limit:.1%}); reasons {counts}; see {out_dir / 'quarantine.csv'}"
        )
    if not rows:
        raise DatasetError(f"dataset '{name}': no usable images")
    manifest = pd.DataFrame(rows)
    manifest["bounds"] = manifest["bounds"].map(json.dumps)
    manifest["split"] = assign_splits(manifest, spec["role"], label_columns, splits).to_numpy()
    manifest["index"] = np.arange(len(manifest))
    manifest["dataset"] = name
    leaks = check_leakage(manifest)
    if leaks:
        raise DatasetError(f"dataset '{name}': leakage between splits:\n  " + "\n  ".join(leaks))
    stack = np.stack(images).astype(np.uint8)
    with atomic_path(out_dir / "images.npy") as tmp:
        np.save(tmp, stack)
    with atomic_path(out_dir / "manifest.parquet") as tmp:
        manifest.to_parquet(tmp, index=False)
    qc = {
        "dataset": name, "modality": spec["modality"], "role": spec["role"], "n_sources": n_total,
        "n_images": int(len(manifest)), "shape": list(stack.shape), "label_columns": label_columns,
        "split_counts": manifest["split"].value_counts().to_dict(),
        "quarantined": int(len(quarantine)), "quarantine_reasons": qdf["reason"].value_counts().to_dict(),
    }
    write_json(qc, out_dir / "qc.json")
    return qc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Preprocess and split one dataset into a retflow store.")
    ap.add_argument("--name", required=True)
    ap.add_argument("--spec", required=True, help="dataset config entry, JSON")
    ap.add_argument("--location", required=True, help="raw phantom folder, labels CSV, or image folder")
    ap.add_argument("--images", default=None)
    ap.add_argument("--preprocess", required=True, help="preprocess config, JSON")
    ap.add_argument("--splits", required=True, help="splits config, JSON")
    ap.add_argument("--out-dir", required=True)
    args = ap.parse_args(argv)
    try:
        qc = prepare(args.name, json.loads(args.spec), Path(args.location),
                     Path(args.images) if args.images else None, json.loads(args.preprocess),
                     json.loads(args.splits), Path(args.out_dir))
    except DatasetError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(qc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
