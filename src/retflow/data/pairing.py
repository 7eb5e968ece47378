"""Pair a CFP store with an OCT store by patient + eye (+ visit): the inputs of a fusion task.

An *eye* is ``(patient_id, eye)`` of a manifest row, plus the ``visit`` column's text when the
task names one (:class:`~retflow.settings.stages.PairingSettings`). Every eye of either store
ends as exactly one row of ``pairs.parquet`` or ``unpaired.csv`` -- nothing is dropped silently:

* ``pairs.parquet``: one row per eye with both modalities: ``pair_id`` (``patient/eye[/visit]``,
  the ``image_id`` of the fusion run's predictions), ``patient_id``, ``eye``, ``visit``,
  ``cfp_index`` / ``oct_index`` (store positions), ``cfp_image_id`` / ``oct_image_id``,
  ``n_cfp`` / ``n_oct`` (images of the eye in each store: the pair takes one -- quality_ok first,
  then the B-scan nearest the volume's centre, then the first stored), ``cfp_split`` /
  ``oct_split`` (each store's), ``split`` (the pair's) and the task's label column(s), read from
  the store of the task's ``dataset`` (``label_from``; empty where that image has no usable label);
* ``unpaired.csv``: ``modality`` (the one present), ``patient_id``, ``eye``, ``visit``,
  ``image_id``, ``n_images``, ``reason`` (``no OCT for this eye``, ``no CFP for this eye``,
  ``visit differs``, ``eye unknown``, ``visit missing``) and ``detail``;
* ``pairing.json``: the counts, by reason and by split, and where the pairs' split came from.

Splits: a pair's two images may sit in different splits of their stores (stores split
independently, a ``group_by: image`` store): training on one and testing on the other would leak.
When every paired patient has one split in both stores the pairs keep it (``split_source:
stores``); otherwise ALL pairs are re-split by patient with :func:`retflow.data.splits.patient_split`
(the ``splits`` ratios and seed, stratified by the label; ``split_source: resplit``) and a warning
names the patients. The per-store splits stay in the table, so a comparison with single-modality
models (:mod:`retflow.data.same_eyes`) uses only eyes in every test set.

Command line (``workflow_scripts/pair_eyes.py`` is the same)::

    python -m retflow.data.pairing --settings '<PairingSettings JSON>' --cfp-store results/data/<cfp>
        --oct-store results/data/<oct> --out-dir results/data/pairs/<task>
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from retflow.atomic import atomic_path, write_json
from retflow.data.dataset import load_manifest
from retflow.data.labels import normalise_label
from retflow.data.splits import patient_split
from retflow.errors import UserError
from retflow.settings.stages import PairingSettings

MODALITIES = ("cfp", "oct")
NAMES = {"cfp": "CFP", "oct": "OCT"}
UNPAIRED_COLUMNS = ["modality", "patient_id", "eye", "visit", "image_id", "n_images", "reason", "detail"]
SPLITS = ("train", "val", "test")


def _label_columns(s: PairingSettings) -> list[str]:
    label = s.task.label
    return list(label) if isinstance(label, (list, tuple)) else [label]


def _check_columns(manifest: pd.DataFrame, s: PairingSettings, modality: str, where: str) -> None:
    dataset = getattr(s, modality)
    need = {"patient_id": None, "eye": None, "split": None, "image_id": None, "index": None}
    if s.visit:
        need[s.visit] = (f"tasks.{s.task.name}.fusion.visit: column '{s.visit}' is not in {where} "
                         f"(keep it: datasets.{dataset}.label_columns)")
    if modality == s.label_from:
        for col in _label_columns(s):
            need[col] = f"tasks.{s.task.name}.label: column '{col}' is not in {where}"
    for col, message in need.items():
        if col not in manifest.columns:
            raise UserError(message or f"{where}: no column '{col}' (rebuild the store: prepare_dataset)")


def _eyes(manifest: pd.DataFrame, s: PairingSettings) -> pd.DataFrame:
    """One row per eye key of a store: the chosen image's row + ``n_images``; rows without a key
    (eye unknown, visit missing) are returned with ``reason`` set, one per image."""
    m = manifest.copy()
    m["patient_id"] = m["patient_id"].astype(str)
    m["eye"] = m["eye"].fillna("").astype(str)
    m["visit"] = m[s.visit].map(normalise_label) if s.visit else None
    m["reason"] = None
    m.loc[m["eye"] == "", "reason"] = "eye unknown"
    if s.visit:
        m.loc[m["reason"].isna() & m["visit"].isna(), "reason"] = "visit missing"
    keyless = m[m["reason"].notna()].assign(n_images=1)
    keyed = m[m["reason"].isna()].copy()
    # the pair's image: quality_ok first, then the B-scan nearest its volume's centre, then the first stored
    quality = keyed["q_quality_ok"].fillna(False).astype(bool) if "q_quality_ok" in keyed else True
    keyed["_bad"] = ~pd.Series(quality, index=keyed.index).astype(bool)
    frame = keyed["frame"] if "frame" in keyed else pd.Series(-1, index=keyed.index)
    n_frames = keyed["n_frames"] if "n_frames" in keyed else pd.Series(1, index=keyed.index)
    keyed["_off"] = np.where(frame.to_numpy() < 0, 0.0, np.abs(frame.to_numpy() - (n_frames.to_numpy() - 1) / 2))
    keys = ["patient_id", "eye", "visit"] if s.visit else ["patient_id", "eye"]
    keyed = keyed.sort_values(["_bad", "_off", "index"], kind="stable")
    counts = keyed.groupby(keys, sort=False).size().rename("n_images")
    chosen = keyed.groupby(keys, sort=False).head(1).join(counts, on=keys).drop(columns=["_bad", "_off"])
    return chosen.sort_values("index", kind="stable"), keyless


def pair_id(patient: str, eye: str, visit: str | None) -> str:
    return f"{patient}/{eye}" + (f"/{visit}" if visit is not None else "")


def _unpaired_rows(rows: pd.DataFrame, modality: str, reason_of) -> list[dict]:
    out = []
    for r in rows.itertuples(index=False):
        reason, detail = reason_of(r)
        out.append({"modality": modality, "patient_id": r.patient_id, "eye": r.eye, "visit": r.visit,
                    "image_id": r.image_id, "n_images": int(r.n_images), "reason": reason, "detail": detail})
    return out


def _split_conflicts(pairs: pd.DataFrame) -> list[str]:
    """Patients whose pairs do not sit in one split of both stores (sorted)."""
    same = pairs["cfp_split"] == pairs["oct_split"]
    per_patient = pairs.assign(_s=pairs["cfp_split"] + ":" + pairs["oct_split"]).groupby("patient_id")["_s"].nunique()
    bad = set(pairs.loc[~same | ~pairs["cfp_split"].isin(SPLITS), "patient_id"]) | set(per_patient[per_patient > 1].index)
    return sorted(bad)


def pair_stores(cfp: pd.DataFrame, oct: pd.DataFrame, s: PairingSettings,
                where: tuple[str, str] = ("the CFP manifest", "the OCT manifest")) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """``(pairs, unpaired, summary)`` of two manifests (module docstring)."""
    for manifest, modality, w in ((cfp, "cfp", where[0]), (oct, "oct", where[1])):
        _check_columns(manifest, s, modality, w)
    eyes, keyless = {}, {}
    eyes["cfp"], keyless["cfp"] = _eyes(cfp, s)
    eyes["oct"], keyless["oct"] = _eyes(oct, s)
    keys = ["patient_id", "eye", "visit"] if s.visit else ["patient_id", "eye"]
    labels = _label_columns(s)
    sides = {}
    for m in MODALITIES:
        cols = {"index": f"{m}_index", "image_id": f"{m}_image_id", "n_images": f"n_{m}", "split": f"{m}_split"}
        keep = keys + list(cols) + (labels if m == s.label_from else [])
        sides[m] = eyes[m][keep].rename(columns=cols)
    merged = sides["cfp"].merge(sides["oct"], on=keys, how="outer", indicator=True)
    both = merged[merged["_merge"] == "both"].drop(columns="_merge").copy()
    if not s.visit:
        both["visit"] = None
    both.insert(0, "pair_id", [pair_id(p, e, v) for p, e, v in zip(both["patient_id"], both["eye"], both["visit"])])
    for col in ("cfp_index", "oct_index", "n_cfp", "n_oct"):
        both[col] = both[col].astype(np.int64)

    # unpaired eyes, each with why
    unpaired: list[dict] = []
    for m, other in (("cfp", "oct"), ("oct", "cfp")):
        present = merged["_merge"] == ("left_only" if m == "cfp" else "right_only")
        ids = set(zip(*(merged.loc[present, k] for k in keys))) if present.any() else set()
        rows = eyes[m][[tuple(r) in ids for r in eyes[m][keys].itertuples(index=False)]]
        rows = rows.assign(visit=rows["visit"] if s.visit else None)
        visits = eyes[other].groupby(["patient_id", "eye"])["visit"].agg(lambda v: sorted(map(str, v))) \
            if s.visit and len(eyes[other]) else pd.Series(dtype=object)

        def reason_of(r, m=m, other=other, visits=visits):
            seen = visits.get((r.patient_id, r.eye)) if len(visits) else None
            if seen:
                return "visit differs", f"{NAMES[m]} visit {r.visit}, {NAMES[other]} visit(s) {', '.join(seen)}"
            return f"no {NAMES[other]} for this eye", f"{getattr(s, other)} has no image of {r.patient_id} eye {r.eye}"

        unpaired += _unpaired_rows(rows, m, reason_of)
        k = keyless[m].assign(visit=keyless[m]["visit"] if s.visit else None)
        unpaired += _unpaired_rows(k, m, lambda r, m=m: (r.reason, f"{getattr(s, m)} image {r.image_id}: "
                                                     + ("no R/L eye value" if r.reason == "eye unknown"
                                                        else f"{s.visit} is empty")))
    unpaired = pd.DataFrame(unpaired, columns=UNPAIRED_COLUMNS)

    # nothing lost: every keyed eye of each store is a pair or an unpaired row, every keyless image a row
    for m in MODALITIES:
        n_rows = int((unpaired["modality"] == m).sum())
        if len(eyes[m]) + len(keyless[m]) != len(both) + n_rows:  # a bug, never the user's input
            raise RuntimeError(f"pairing lost {m} eyes: {len(eyes[m])} + {len(keyless[m])} != {len(both)} + {n_rows}")

    # the pairs' split
    conflicts = _split_conflicts(both) if len(both) else []
    if conflicts:
        strata = both[labels[0]].astype(str) if labels else None
        both["split"] = patient_split(both["patient_id"], strata, dict(s.splits), int(s.splits["seed"])).to_numpy()
        source = "resplit"
        print(f"WARNING: {len(conflicts)} patients sit in different splits of {s.cfp} and {s.oct} "
              f"(e.g. {', '.join(conflicts[:5])}): all {len(both)} pairs were re-split by patient; a comparison with "
              f"the single-modality models uses only eyes in every test set (give both datasets the same "
              f"patient split, e.g. datasets.<name>.split_column, to compare on every test eye)", flush=True)
    else:
        both["split"] = both["cfp_split"]
        source = "stores"
    summary = {
        "task": s.task.name, "cfp": s.cfp, "oct": s.oct, "visit": s.visit, "label_from": s.label_from,
        "n_pairs": len(both), "n_patients": int(both["patient_id"].nunique()),
        "pairs_by_split": {k: int(v) for k, v in both["split"].value_counts().items()},
        "n_unpaired": len(unpaired),
        "unpaired_by_reason": {f"{m}: {r}": int(n) for (m, r), n in
                               unpaired.groupby(["modality", "reason"]).size().items()},
        "images_not_paired": {m: int((both[f"n_{m}"] - 1).sum()) for m in MODALITIES},
        "split_source": source, "split_conflict_patients": conflicts,
    }
    return both.reset_index(drop=True), unpaired, summary


def write_pairs(out_dir: Path | str, pairs: pd.DataFrame | None, unpaired: pd.DataFrame, summary: dict) -> None:
    """``unpaired.csv``, ``pairing.json`` and (unless None) ``pairs.parquet`` into ``out_dir`` (atomic)."""
    out = Path(out_dir)
    with atomic_path(out / "unpaired.csv") as tmp:
        unpaired.to_csv(tmp, index=False)
    write_json(summary, out / "pairing.json")
    if pairs is None:
        return
    with atomic_path(out / "pairs.parquet") as tmp:  # last: the rule's main output
        pairs.to_parquet(tmp, index=False)


def run(s: PairingSettings, cfp_store: str, oct_store: str, out_dir: Path) -> dict:
    out_dir = Path(out_dir)
    s.write(out_dir / "settings.json")
    where = (f"{cfp_store}/manifest.parquet", f"{oct_store}/manifest.parquet")
    pairs, unpaired, summary = pair_stores(load_manifest(cfp_store), load_manifest(oct_store), s, where)
    if len(pairs) == 0:  # the evidence first: every eye with its reason
        write_pairs(out_dir, None, unpaired, summary)
        raise UserError(f"tasks.{s.task.name}.fusion: no eye of '{s.cfp}' has an image in '{s.oct}' "
                        f"(same patient_id and eye{' and ' + s.visit if s.visit else ''}); see {out_dir}/unpaired.csv")
    write_pairs(out_dir, pairs, unpaired, summary)
    print(f"{s.task.name}: {summary['n_pairs']} pairs of {summary['n_patients']} patients "
          f"{summary['pairs_by_split']} (split: {summary['split_source']}); {summary['n_unpaired']} unpaired eyes "
          f"{summary['unpaired_by_reason']}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Pair a CFP store with an OCT store by patient + eye (+ visit).")
    ap.add_argument("--settings", required=True, help="PairingSettings JSON (retflow.settings.build.pairing)")
    ap.add_argument("--cfp-store", required=True)
    ap.add_argument("--oct-store", required=True)
    ap.add_argument("--out-dir", required=True, help="writes pairs.parquet, unpaired.csv, pairing.json, settings.json")
    args = ap.parse_args(argv)
    run(PairingSettings.from_json(args.settings), args.cfp_store, args.oct_store, Path(args.out_dir))
    return 0


if __name__ == "__main__":
    from retflow.errors import run_main

    sys.exit(run_main(main))
