"""Data stage: preprocessing, splits, label fractions, quarantine and leakage checks."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import subprocess
import sys

from bad_inputs import make_cfp_corpus, make_volume_corpus
from conftest import ROOT, dataset_spec, preprocess_section
from retflow.data.dataset import encode_labels
from retflow.data.ingest import DatasetError
from retflow.data.io import UnreadableInput, read_image
from retflow.data.leakage import across_datasets, near_duplicates, phash, within_dataset
from retflow.data.prepare import prepare
from retflow.data.preprocess import preprocess_cfp
from retflow.data.splits import label_fraction_indices, patient_split
from retflow.data.store import ImageStore
from retflow.data.volumes import read_volume
from retflow.settings import section_defaults

# the sections rule prepare_dataset passes, schema defaults filled (small images for speed)
SMALL = {"cfp": {"size": 32}, "oct": {"size": 32}, "min_side": 16}
PREP = preprocess_section(SMALL)
SPLITS = section_defaults("splits")
LEAKAGE = section_defaults("leakage")


def fundus_like(h=60, w=80, cx=40, cy=30, r=25, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    img = np.zeros((h, w, 3), np.uint8)
    tex = rng.integers(0, 80, (h, w))  # every image different (duplicates are flagged as leakage)
    img[..., 0] = np.where(inside, 120 + tex, 0)
    img[..., 1] = np.where(inside, 70 + tex // 2, 0)
    img[..., 2] = np.where(inside, 40 + tex // 4, 0)
    return img


def test_preprocess_cfp_crops_pads_and_resizes():
    out, info = preprocess_cfp(fundus_like(), 32, PREP["cfp"]["crop_border"], PREP["cfp"]["enhance"])
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert info["field_fraction"] < 1.0
    assert out[16, 16, 0] > 100  # centre is fundus, not border


def png_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def make_csv_dataset(root, n_patients=10, bad=()):
    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    rows = []
    for p in range(n_patients):
        for eye in ("R", "L"):
            name = f"P{p}_{eye}.png"
            Image.fromarray(fundus_like(seed=p * 2 + (eye == "L"))).save(img_dir / name)
            rows.append({"image": name, "patient_id": f"P{p}", "eye": eye, "grade": p % 2})
    for name, content in bad:
        (img_dir / name).write_bytes(content)
        rows.append({"image": name, "patient_id": f"X{name}", "eye": "R", "grade": 0})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return dataset_spec(modality="cfp", role="labelled", source="csv", id_column="image",
                        patient_column="patient_id", eye_column="eye")


def test_prepare_quarantines_bad_files_and_splits_by_patient(tmp_path):
    spec = make_csv_dataset(tmp_path / "raw", bad=[("empty.png", b""), ("text.png", b"not an image"),
                                                   ("trunc.png", png_bytes()[:300])])
    qc = prepare("toy", spec, tmp_path / "raw" / "labels.csv", tmp_path / "raw" / "images", PREP, SPLITS, LEAKAGE,
                 tmp_path / "out")
    assert qc["n_images"] == 20 and qc["quarantined_inputs"] == 3
    q = pd.read_csv(tmp_path / "out" / "quarantine.csv")
    assert dict(zip(q.image_id, q.reason)) == {"empty": "zero_bytes", "text": "not_an_image", "trunc": "truncated"}
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert manifest.groupby("patient_id")["split"].nunique().max() == 1
    assert set(manifest.split) == {"train", "val", "test"}
    store = ImageStore(tmp_path / "out")
    assert len(store) == 20 and store[int(manifest["index"].iloc[-1])].shape == (32, 32, 3)
    for col in ("sha256", "phash", "bounds", "field_found", "q_quality_ok", "eye", "source", "split"):
        assert col in manifest


def test_quarantine_limit_fails_at_the_gate_naming_the_dataset(tmp_path):
    # the store is made (its quarantine.csv and qc.json are the evidence); the pre-flight gate judges the limit
    from retflow.preflight_data import run_gate

    spec = make_csv_dataset(tmp_path / "raw", n_patients=10, bad=[(f"e{i}.png", b"") for i in range(3)])
    qc = prepare("toy", spec, tmp_path / "raw" / "labels.csv", tmp_path / "raw" / "images", PREP, SPLITS, LEAKAGE,
                 tmp_path / "toy")
    assert qc["quarantined_inputs"] == 3 and qc["n_sources"] == 23
    leak = tmp_path / "leakage.json"
    leak.write_text(json.dumps({"findings": [], "n_errors": 0, "n_warnings": 0}))
    checks = {"max_quarantine_fraction": 0.1, "max_unusable_label_fraction": 0.5, "labelled_pool_splits": ["train"],
              "pools": {}, "uses": []}
    (problem,) = run_gate([tmp_path / "toy"], leak, checks, {}).problems
    assert problem.startswith("dataset 'toy': 3/23 inputs quarantined (13.0% > preprocess.max_quarantine_fraction 10.0%)")
    assert "zero_bytes" in problem and str(tmp_path / "toy" / "quarantine.csv") in problem
    assert run_gate([tmp_path / "toy"], leak, {**checks, "max_quarantine_fraction": 0.2}, {}).problems == []


def test_missing_csv_column_is_named(tmp_path):
    spec = make_csv_dataset(tmp_path / "raw", n_patients=2)
    spec = dataset_spec(**{**spec, "patient_column": "subject"})
    with pytest.raises(DatasetError, match="patient_column.*'subject'"):
        prepare("toy", spec, tmp_path / "raw" / "labels.csv", tmp_path / "raw" / "images", PREP, SPLITS, LEAKAGE,
                tmp_path / "out")


def test_leakage_within_dataset_lists_patients_files_and_near_duplicates():
    base = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    other = np.random.default_rng(1).integers(0, 255, (64, 64), dtype=np.uint8)
    noisy = np.clip(base.astype(int) + np.random.default_rng(2).integers(-3, 4, base.shape), 0, 255).astype(np.uint8)
    manifest = pd.DataFrame({"image_id": ["a", "b", "c", "d", "e"], "patient_id": ["p1", "p1", "p2", "p3", "p4"],
                             "split": ["train", "test", "val", "test", "train"], "sha256": ["x", "y", "x", "z", "w"],
                             "phash": [phash(base), phash(other), phash(other), phash(noisy), phash(other[::-1])]})
    findings = within_dataset(manifest, "toy", section_defaults("leakage", {"perceptual": "warn"}))
    kinds = {(f.kind, f.action, tuple(sorted(f.ids))) for f in findings}
    assert ("patient", "error", ("a", "b")) in kinds
    assert ("exact", "error", ("a", "c")) in kinds
    assert ("perceptual", "warn", ("a", "d")) in kinds  # re-noised copy in another split
    assert not any(f.kind == "perceptual" and "e" in f.ids for f in findings)


def test_leakage_settings_come_from_the_schema_and_a_dataset_overrides_only_what_it_names():
    import yaml

    from retflow.settings import validate

    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["leakage"] = {"perceptual": "warn"}  # a partial section: the schema fills the other keys
    cfg["datasets"]["cfp_clinic"]["leakage"] = {"patient": "warn"}
    full = validate(cfg)
    assert full["leakage"] == {"patient": "error", "exact": "error", "perceptual": "warn", "phash_distance": 12,
                               "across_datasets": True}
    assert full["datasets"]["cfp_clinic"]["leakage"] == {"patient": "warn"}  # no defaults: an override
    assert "leakage" not in full["datasets"]["cfp_pool"]


def test_near_duplicate_search_matches_brute_force():
    rng = np.random.default_rng(3)
    rows = [rng.integers(0, 2, 256, dtype=np.uint8)]
    for i in range(1, 60):
        bits = rows[-1].copy() if i % 3 == 0 else rng.integers(0, 2, 256, dtype=np.uint8)
        bits[rng.choice(256, 5, replace=False)] ^= 1  # every third hash is a near copy of the previous
        rows.append(bits)
    hashes = [np.packbits(b).tobytes().hex() for b in rows]
    fast = {(i, j) for i, j, _ in near_duplicates(hashes, None, 8)}
    bits = np.array([np.unpackbits(np.frombuffer(bytes.fromhex(h), np.uint8)) for h in hashes])
    brute = {(i, j) for i in range(60) for j in range(i + 1, 60) if (bits[i] != bits[j]).sum() <= 8}
    assert fast == brute and brute


def test_pool_versus_test_leakage_across_datasets():
    img = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    pool = pd.DataFrame({"image_id": ["p0", "p1"], "split": ["pool", "pool"], "sha256": ["s", "t"],
                         "phash": [phash(img), phash(img[::-1])]})
    clinic = pd.DataFrame({"image_id": ["c0", "c1"], "split": ["test", "train"], "sha256": ["s", "u"],
                           "phash": [phash(img), phash(img[::-1])]})
    findings = across_datasets({"pool": pool, "clinic": clinic}, LEAKAGE)
    assert [(f.kind, f.ids) for f in findings] == [("exact", ["p0", "c0"])]  # c1 is train: no leak


def test_patient_split_is_grouped_stratified_and_seeded():
    patients = pd.Series([f"p{i // 2}" for i in range(200)])
    labels = pd.Series([(i // 2) % 4 for i in range(200)])
    a = patient_split(patients, labels, SPLITS, seed=3)
    b = patient_split(patients, labels, SPLITS, seed=3)
    assert (a == b).all()
    frame = pd.DataFrame({"p": patients, "s": a, "y": labels})
    assert frame.groupby("p")["s"].nunique().max() == 1
    counts = frame.s.value_counts(normalize=True)
    assert abs(counts["train"] - 0.6) < 0.05 and abs(counts["test"] - 0.2) < 0.05
    assert frame[frame.s == "test"].y.nunique() == 4


def test_label_fractions_are_nested_and_stratified():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    small = set(label_fraction_indices(labels, 0.1, seed=1))
    mid = set(label_fraction_indices(labels, 0.3, seed=1))
    assert small < mid
    assert np.bincount(labels[list(small)]).tolist() == [5, 3, 2]
    assert set(label_fraction_indices(labels, 0.1, seed=2)) != small


def test_file_ids_drop_double_extensions():
    from retflow.data.ingest import file_id

    assert file_id("vols/P01_R.nii.gz") == "vols/P01_R" and file_id("b.PNG") == "b"


def test_encode_labels_marks_unknown_and_nan_invalid():
    idx, valid = encode_labels(pd.Series(["0", "2", None, "7", "1.0"]), ["0", "1", "2"])
    assert idx.tolist()[:2] == [0, 2] and valid.tolist() == [True, True, False, False, True]


def test_read_image_classifies_failures(tmp_path):
    (tmp_path / "z.jpg").write_bytes(b"")
    with pytest.raises(UnreadableInput) as exc:
        read_image(tmp_path / "z.jpg")
    assert exc.value.reason == "zero_bytes"
    with pytest.raises(UnreadableInput) as exc:
        read_image(tmp_path / "absent.jpg")
    assert exc.value.reason == "missing_file"


def test_read_image_formats(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "a.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(tmp_path / "b.png")
    Image.fromarray(rgb).save(tmp_path / "c.tif")
    Image.fromarray(rgb[..., 0] > 128).save(tmp_path / "mask.gif")
    assert read_image(tmp_path / "a.png")[0].tolist() == rgb.tolist()
    sixteen, shape = read_image(tmp_path / "b.png")
    assert sixteen.dtype == np.uint8 and sixteen.max() == 255 and shape == (40, 50)
    assert read_image(tmp_path / "c.tif")[0].shape == (40, 50, 3)
    assert set(np.unique(read_image(tmp_path / "mask.gif")[0])) <= {0, 255}


def test_jpeg_draft_decoding_keeps_enough_pixels(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (800, 1200, 3), dtype=np.uint8)).save(tmp_path / "x.jpg")
    img, orig = read_image(tmp_path / "x.jpg", draft_size=128)
    assert orig == (800, 1200) and 128 <= img.shape[0] < 800


def test_bad_input_corpus_every_kind_gets_its_reason(tmp_path):
    spec, expected = make_cfp_corpus(tmp_path / "raw")
    assert len(set(expected.values()) | set(make_volume_corpus(tmp_path / "v")[1].values())) >= 25
    qc = prepare("corpus", spec, tmp_path / "raw" / "labels.csv", tmp_path / "raw" / "images", PREP, SPLITS, LEAKAGE,
                 tmp_path / "out", allowed_labels={"label": ["0", "1"]}, workers=2)
    q = pd.read_csv(tmp_path / "out" / "quarantine.csv", keep_default_na=False)
    got = {}
    for rec in q.to_dict("records"):
        got.setdefault(rec["image_id"], rec["reason"])
    assert {k: got.get(k) for k in expected} == expected
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    kept = set(manifest.image_id)
    assert {"nolabel", "sevenlabel", "weirdeye", "rgba", "palette", "linked"} <= kept  # label problems keep the image
    details = dict(zip(q.image_id, q.detail))
    assert "a character device, not a regular file" in details["devzero"] and "/dev/zero" in details["devzero"]
    assert "FIFO" in details["pipe"] and "broken symbolic link" in details["dangling"]
    assert "datasets.corpus.eye_map" in details["weirdeye"]
    assert manifest.loc[manifest.image_id == "sevenlabel", "label"].isna().all()
    assert set(manifest.eye) <= {"R", "L", ""}
    assert qc["unlisted_files"] == 2  # unlisted.png and sixteen_gray.png
    assert sum(qc["quarantine_reasons"].values()) == len(q)


def test_bad_volume_corpus_every_kind_gets_its_reason(tmp_path):
    spec, expected = make_volume_corpus(tmp_path / "raw")
    prep = preprocess_section({**SMALL, "oct": {"size": 32, "bscans": 3}})
    qc = prepare("vols", spec, tmp_path / "raw" / "labels.csv", tmp_path / "raw" / "volumes", prep, SPLITS, LEAKAGE,
                 tmp_path / "out", allowed_labels={"label": ["0", "1"]})
    q = pd.read_csv(tmp_path / "out" / "quarantine.csv")
    assert dict(zip(q.image_id, q.reason)) == expected
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert qc["n_images"] == 36 and manifest.groupby("patient_id")["split"].nunique().max() == 1
    assert ImageStore(tmp_path / "out")[0].shape == (32, 32, 1)


def test_cli_reports_errors_without_traceback(tmp_path):
    spec = make_csv_dataset(tmp_path / "raw", n_patients=0, bad=[("e.png", b""), ("t.png", b"not an image")])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "workflow_scripts" / "prepare_dataset.py"), "--name", "corpus",
         "--spec", json.dumps(spec), "--location", str(tmp_path / "raw" / "labels.csv"),
         "--images", str(tmp_path / "raw" / "images"),
         "--preprocess", json.dumps(PREP), "--splits", json.dumps(SPLITS), "--leakage", json.dumps(LEAKAGE),
         "--out-dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "dataset 'corpus': no usable images among 2 inputs" in proc.stderr
    assert str(tmp_path / "out" / "quarantine.csv") in proc.stderr  # the evidence it leaves


def test_given_splits_are_kept_and_val_carved_from_train(tmp_path):
    root = tmp_path / "folder"
    seed = 0
    for split, n in (("train", 16), ("test", 4)):
        for cls in ("healthy", "glaucoma"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                seed += 1
                Image.fromarray(fundus_like(seed=seed)).save(root / split / cls / f"{i}.png")
    spec = dataset_spec(modality="cfp", role="labelled", source="imagefolder")
    prepare("folder", spec, root, None, PREP, SPLITS, LEAKAGE, tmp_path / "out")
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    test_ids = set(manifest.loc[manifest.split == "test", "image_id"])
    assert test_ids == {i for i in manifest.image_id if i.startswith("test/")}
    assert (manifest.split == "val").sum() == 8 and set(manifest.label) == {"healthy", "glaucoma"}


def test_multilabel_columns_accept_only_zero_and_one(tmp_path):
    spec = make_csv_dataset(tmp_path / "raw", n_patients=4)
    table = pd.read_csv(tmp_path / "raw" / "labels.csv")
    table["drusen"] = ["1", "0", "yes", None, "1", "0", "1.0", "0"]
    table.to_csv(tmp_path / "raw" / "labels.csv", index=False)
    spec = dataset_spec(**{**spec, "label_columns": ["grade"], "multilabel_columns": ["drusen"]})
    prepare("ml", spec, tmp_path / "raw" / "labels.csv", tmp_path / "raw" / "images", PREP,
            section_defaults("splits", {"train": 0.5, "val": 0.25, "test": 0.25}), LEAKAGE, tmp_path / "out",
            allowed_labels={"drusen": ["0", "1"]})
    q = pd.read_csv(tmp_path / "out" / "quarantine.csv")
    assert sorted(q.reason) == ["missing_label", "unknown_label"], q.to_string()
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert manifest["drusen"].dropna().tolist() == ["1", "0", "1", "0", "1", "0"]


def test_hrf_prepares_with_bounds_in_source_pixels(real_data, tmp_path):
    spec = dataset_spec(modality="cfp", role="labelled", source="csv", id_column="file",
                        label_columns=["class", "glaucoma"])
    prep = preprocess_section({**SMALL, "cfp": {"size": 64}})
    qc = prepare("hrf", spec, real_data / "hrf" / "labels.csv", None, prep, SPLITS, LEAKAGE, tmp_path / "out",
                 allowed_labels={"glaucoma": ["0", "1"]}, workers=2)
    assert qc["n_images"] == 45 and qc["quarantined_inputs"] == 0 and qc["unlisted_files"] == 0
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    top, bottom, left, right = json.loads(manifest.bounds.iloc[0])
    # HRF fields (3504 x 2336 photos) are clipped top and bottom, with black side borders
    assert 0.6 * 3504 < right - left < 3504 and bottom - top > 0.8 * 2336
    assert manifest.groupby("split")["glaucoma"].apply(lambda s: (s == "1").sum()).min() >= 2


def test_jhu_volumes_as_a_toy_task(real_data, tmp_path):
    spec = dataset_spec(modality="oct", role="labelled", source="volumes", id_column="stack_npz",
                        patient_column="volume", label_columns=["label"])
    prep = preprocess_section({**SMALL, "oct": {"size": 32, "bscans": 9}})
    with pytest.raises(DatasetError, match="cannot split 2 patients"):
        prepare("jhu", spec, real_data / "jhu_oct_volumes" / "labels.csv", None, prep, SPLITS, LEAKAGE, tmp_path / "a")
    toy = dataset_spec(**{**spec, "group_by": "image", "leakage": {"patient": "warn", "exact": "warn",
                                                                   "perceptual": "warn"}})
    qc = prepare("jhu", toy, real_data / "jhu_oct_volumes" / "labels.csv", None, prep, SPLITS, LEAKAGE,
                 tmp_path / "b")
    assert qc["n_images"] == 18 and qc["leakage_warnings"]
    manifest = pd.read_parquet(tmp_path / "b" / "manifest.parquet")
    assert manifest.frame.tolist()[:9] == list(range(20, 29))


def test_unsupported_volume_is_reported_not_crashed(real_data):
    with pytest.raises(UnreadableInput) as exc:
        read_volume(real_data / "heidelberg_vol" / "onh.vol")
    assert exc.value.reason == "unsupported_scan_pattern"


def test_leakage_rule_writes_every_finding_for_the_gate(tmp_path):
    from retflow.data.cross_dataset_leakage import main as leakage_main

    img = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    for name, split, sha in (("pool", "pool", "s1"), ("clinic", "test", "s1")):
        (tmp_path / name).mkdir()
        pd.DataFrame({"image_id": [f"{name}_0"], "split": [split], "sha256": [sha],
                      "phash": [phash(img)]}).to_parquet(tmp_path / name / "manifest.parquet")
    out = tmp_path / "leakage.json"
    stores = [str(tmp_path / "pool"), str(tmp_path / "clinic")]
    assert leakage_main(["--stores", *stores, "--out", str(out), "--leakage", json.dumps(LEAKAGE)]) == 0  # the gate stops on errors
    report = json.loads(out.read_text())
    assert report["n_errors"] == 1 and report["findings"][0]["action"] == "error"
    warn = section_defaults("leakage", {"exact": "warn"})
    assert leakage_main(["--stores", *stores, "--out", str(out), "--leakage", json.dumps(warn)]) == 0
    report = json.loads(out.read_text())
    assert report["n_warnings"] == 1 and report["findings"][0]["ids"] == ["pool_0", "clinic_0"]


def test_split_column_is_kept_with_aliases_and_bad_values_quarantined(tmp_path):
    spec = make_csv_dataset(tmp_path / "raw", n_patients=6)
    table = pd.read_csv(tmp_path / "raw" / "labels.csv")
    table["part"] = ["Training"] * 6 + ["valid"] * 2 + ["test"] * 3 + ["holdout"]
    table.to_csv(tmp_path / "raw" / "labels.csv", index=False)
    spec = dataset_spec(**{**spec, "split_column": "part", "label_columns": ["grade"]})
    prepare("given", spec, tmp_path / "raw" / "labels.csv", tmp_path / "raw" / "images", PREP, SPLITS, LEAKAGE,
            tmp_path / "out")
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert manifest.split.value_counts().to_dict() == {"train": 6, "test": 3, "val": 2}
    q = pd.read_csv(tmp_path / "out" / "quarantine.csv")
    assert q.reason.tolist() == ["unknown_split"] and "holdout" in q.detail[0]
