"""Leakage checks: one patient or one image on both sides of a train/test boundary.

Three kinds of evidence, each with its own action (``error`` or ``warn``) in the config's
``leakage`` section:

- ``patient``: a patient id in more than one split of a dataset;
- ``exact``: byte-identical source files (sha256) in different splits or datasets;
- ``perceptual``: near-identical images after preprocessing (a 256-bit DCT perceptual hash,
  :func:`imagehash.phash` with ``hash_size=16``, within ``phash_distance`` bits), which catches
  re-encoded, resized or re-exported copies that a file hash misses.

Within a dataset, any two different splits are a leak. Across datasets (``across_datasets``),
an image used for training anything -- the pretraining pool, or train/val of a labelled set --
must not reappear in another dataset's test split or in an external test set. A dataset is also
checked against itself: the images it gives a pretraining pool (:mod:`retflow.data.pools`) that
are in its own test split are a ``test_in_pool`` finding (only possible when
``pretrain.labelled_pool_splits`` names ``test``; then a warning, recorded for the report).

Near-duplicate search uses the pigeonhole principle: two 256-bit hashes within ``d`` bits agree
exactly on at least one of ``d + 1`` disjoint chunks, so candidates come from exact chunk
buckets and are then verified, which scales to a million-image pool against a test set.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import imagehash
import numpy as np
import pandas as pd
from PIL import Image

from retflow.data.pools import pool_mask

HASH_SIZE = 16  # 256-bit hashes: distinct fundus photos measured >= 24 bits apart
TRAINING_SPLITS = ("pool", "train", "val")


@dataclass
class Finding:
    kind: str  # patient | exact | perceptual
    action: str  # error | warn
    where: str  # "within <dataset>" or "<dataset>:<split> vs <dataset>:<split>"
    ids: list[str]
    detail: str = ""

    def line(self) -> str:
        ids = ", ".join(self.ids[:6]) + (f", ... ({len(self.ids)} ids)" if len(self.ids) > 6 else "")
        return f"[{self.kind}] {self.where}: {ids}{' -- ' + self.detail if self.detail else ''}"


def phash(img: np.ndarray) -> str:
    """Perceptual hash of a preprocessed uint8 image (H, W[, C]) as 64 hex characters."""
    arr = img[..., 0] if img.ndim == 3 and img.shape[2] == 1 else img
    return str(imagehash.phash(Image.fromarray(arr), hash_size=HASH_SIZE))


def _bits(hexes) -> np.ndarray:
    raw = np.frombuffer(b"".join(bytes.fromhex(h) for h in hexes), dtype=np.uint8)
    return np.unpackbits(raw.reshape(len(hexes), -1), axis=1).astype(bool)


def near_duplicates(hex_a, hex_b, max_distance: int) -> list[tuple[int, int, int]]:
    """Pairs ``(i, j, distance)`` with Hamming distance <= ``max_distance``.

    ``hex_b`` None: pairs ``i < j`` within ``hex_a``; else pairs across the two lists.
    ``max_distance``: the ``leakage.phash_distance`` setting.
    """
    a = _bits(list(hex_a)) if len(hex_a) else np.zeros((0, HASH_SIZE**2), bool)
    same = hex_b is None
    b = a if same else (_bits(list(hex_b)) if len(hex_b) else np.zeros((0, HASH_SIZE**2), bool))
    if not len(a) or not len(b):
        return []
    n_bits = a.shape[1]
    chunks = np.array_split(np.arange(n_bits), max_distance + 1)
    candidates: set[tuple[int, int]] = set()
    for cols in chunks:
        weights = 1 << np.arange(len(cols), dtype=np.int64)
        keys_a = a[:, cols].astype(np.int64) @ weights
        keys_b = keys_a if same else b[:, cols].astype(np.int64) @ weights
        buckets: dict[int, list[int]] = defaultdict(list)
        for j, key in enumerate(keys_b):
            buckets[int(key)].append(j)
        for i, key in enumerate(keys_a):
            for j in buckets.get(int(key), ()):
                if not same or j > i:
                    candidates.add((i, j))
    out = []
    for i, j in sorted(candidates):
        d = int((a[i] != b[j]).sum())
        if d <= max_distance:
            out.append((i, j, d))
    return out


def within_dataset(manifest: pd.DataFrame, name: str, cfg: dict) -> list[Finding]:
    """Patients, identical files and near-identical images shared by two splits of one dataset;
    ``cfg``: the validated ``leakage`` section (with the dataset's own overrides)."""
    findings = []
    splits = manifest["split"].to_numpy()
    per_patient = manifest.groupby("patient_id")["split"].nunique()
    for patient in per_patient[per_patient > 1].index:
        rows = manifest[manifest.patient_id == patient]
        findings.append(Finding("patient", cfg["patient"], f"within {name}", rows.image_id.tolist(),
                                f"patient {patient} in splits {sorted(rows.split.unique())}"))
    per_hash = manifest.groupby("sha256")["split"].nunique()
    for digest in per_hash[per_hash > 1].index:
        rows = manifest[manifest.sha256 == digest]
        findings.append(Finding("exact", cfg["exact"], f"within {name}", rows.image_id.tolist(),
                                f"identical files in splits {sorted(rows.split.unique())}"))
    if "phash" in manifest and manifest["sha256"].nunique() > 1:
        ids = manifest["image_id"].to_numpy()
        digests = manifest["sha256"].to_numpy()
        for i, j, d in near_duplicates(manifest["phash"].tolist(), None, cfg["phash_distance"]):
            if splits[i] != splits[j] and digests[i] != digests[j]:
                findings.append(Finding("perceptual", cfg["perceptual"], f"within {name}", [ids[i], ids[j]],
                                        f"{d} bits apart, splits {splits[i]}/{splits[j]}"))
    return findings


def pooled_test_images(manifest: pd.DataFrame, name: str, splits: Sequence[str]) -> list[Finding]:
    """A dataset against itself: its test images among the images it gives a pretraining pool."""
    rows = manifest[pool_mask(manifest, splits) & (manifest["split"] == "test").to_numpy()]
    if rows.empty:
        return []
    return [Finding("test_in_pool", "warn", f"{name}:pool vs {name}:test", rows.image_id.tolist(),
                    f"{len(rows)} test images of '{name}' are in the pretraining pool "
                    f"(pretrain.labelled_pool_splits {list(splits)} names test)")]


def across_datasets(manifests: dict[str, pd.DataFrame], cfg: dict,
                    pool_splits: Mapping[str, Sequence[str]] | None = None) -> list[Finding]:
    """Images used for training in one dataset that reappear in another dataset's test set.
    ``pool_splits``: the labelled splits each pool member gives its pool
    (:func:`retflow.data.pools.pool_splits`), which train the encoder too; none when no dataset
    is in a pool. (A pool member against itself: :func:`pooled_test_images`.) ``cfg``: the
    validated ``leakage`` section."""
    pool_splits = pool_splits or {}
    findings = []
    for train_name, train_df in manifests.items():
        training = train_df["split"].isin(TRAINING_SPLITS).to_numpy()
        if train_name in pool_splits:  # what it gives a pool trains the encoder
            training = training | pool_mask(train_df, pool_splits[train_name])
        train_rows = train_df[training]
        for test_name, test_df in manifests.items():
            test_rows = test_df[test_df["split"] == "test"]
            if train_name == test_name or train_rows.empty or test_rows.empty:
                continue
            where = f"{train_name}:{'/'.join(sorted(train_rows.split.unique()))} vs {test_name}:test"
            shared = set(train_rows.sha256) & set(test_rows.sha256)
            for digest in sorted(shared):
                ids = (train_rows.image_id[train_rows.sha256 == digest].tolist()
                       + test_rows.image_id[test_rows.sha256 == digest].tolist())
                findings.append(Finding("exact", cfg["exact"], where, ids, "identical files"))
            if "phash" not in train_rows or "phash" not in test_rows:
                continue
            a_ids, b_ids = train_rows.image_id.to_numpy(), test_rows.image_id.to_numpy()
            a_sha, b_sha = train_rows.sha256.to_numpy(), test_rows.sha256.to_numpy()
            pairs = near_duplicates(train_rows.phash.tolist(), test_rows.phash.tolist(), cfg["phash_distance"])
            for i, j, d in pairs:
                if a_sha[i] != b_sha[j]:
                    findings.append(Finding("perceptual", cfg["perceptual"], where, [a_ids[i], b_ids[j]],
                                            f"{d} bits apart"))
    return findings


def summarise(findings: list[Finding]) -> dict:
    """JSON-ready summary: counts by kind/action and every finding."""
    counts: dict[str, int] = defaultdict(int)
    for f in findings:
        counts[f"{f.kind}:{f.action}"] += 1
    return {"n_errors": sum(f.action == "error" for f in findings),
            "n_warnings": sum(f.action == "warn" for f in findings),
            "counts": dict(counts), "findings": [asdict(f) for f in findings]}
