"""Data stage: preprocessing, splits, label fractions, quarantine and leakage checks."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from retflow.data.dataset import encode_labels
from retflow.data.ingest import DatasetError
from retflow.data.io import UnreadableInput, central_bscans, read_image, read_volume
from retflow.data.prepare import check_leakage, prepare
from retflow.data.preprocess import fundus_bounds, preprocess_cfp
from retflow.data.splits import label_fraction_indices, patient_split

PREP = {"cfp": {"size": 32, "crop_border": True}, "oct": {"size": 32, "bscans": 1}, "min_side": 16,
        "max_quarantine_fraction": 0.5}
SPLITS = {"train": 0.6, "val": 0.2, "test": 0.2, "seed": 0}


def fundus_like(h=60, w=80, cx=40, cy=30, r=25, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    img = np.zeros((h, w, 3), np.uint8)
    img[inside] = (rng.integers(120, 200), 70, 40)
    img[cy, cx, 1] = seed % 256  # every image unique (identical files would be flagged as leakage)
    return img


def test_fundus_bounds_finds_the_field():
    top, bottom, left, right = fundus_bounds(fundus_like())
    assert abs(top - 5) <= 1 and abs(bottom - 56) <= 1
    assert abs(left - 15) <= 1 and abs(right - 66) <= 1


def test_preprocess_cfp_crops_pads_and_resizes():
    out, info = preprocess_cfp(fundus_like(), 32)
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
    return {"modality": "cfp", "role": "labelled", "source": "csv", "id_column": "image",
            "patient_column": "patient_id", "eye_column": "eye"}


def test_prepare_quarantines_bad_files_and_splits_by_patient(tmp_path):
    spec = make_csv_dataset(tmp_path / "raw", bad=[("empty.png", b""), ("text.png", b"not an image"),
                                                   ("trunc.png", png_bytes()[:300])])
    qc = prepare("toy", spec, tmp_path / "raw" / "labels.csv", tmp_path / "raw" / "images", PREP, SPLITS, tmp_path / "out")
    assert qc["n_images"] == 20 and qc["quarantined"] == 3
    q = pd.read_csv(tmp_path / "out" / "quarantine.csv")
    assert dict(zip(q.image_id, q.reason)) == {"empty": "zero_bytes", "text": "not_an_image",
                                                "trunc": "truncated_or_corrupt"}
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert manifest.groupby("patient_id")["split"].nunique().max() == 1
    assert set(manifest.split) == {"train", "val", "test"}
    images = np.load(tmp_path / "out" / "images.npy")
    assert images.shape == (20, 32, 32, 3)


def test_prepare_fails_above_quarantine_limit_naming_the_dataset(tmp_path):
    spec = make_csv_dataset(tmp_path / "raw", n_patients=2, bad=[(f"e{i}.png", b"") for i in range(3)])
    with pytest.raises(DatasetError, match="dataset 'toy'.*quarantined.*zero_bytes"):
        prepare("toy", spec, tmp_path / "raw" / "labels.csv", tmp_path / "raw" / "images", {**PREP, "max_quarantine_fraction": 0.1},
                SPLITS, tmp_path / "out")
    assert (tmp_path / "out" / "quarantine.csv").exists()


def test_missing_csv_column_is_named(tmp_path):
    spec = make_csv_dataset(tmp_path / "raw", n_patients=2)
    spec["patient_column"] = "subject"
    with pytest.raises(DatasetError, match="patient_column.*'subject'"):
        prepare("toy", spec, tmp_path / "raw" / "labels.csv", tmp_path / "raw" / "images", PREP, SPLITS, tmp_path / "out")


def test_leakage_check_lists_patients_and_duplicate_images():
    manifest = pd.DataFrame({"image_id": ["a", "b", "c"], "patient_id": ["p1", "p1", "p2"],
                             "split": ["train", "test", "val"], "sha256": ["x", "y", "x"]})
    problems = check_leakage(manifest)
    assert any("patient p1" in p for p in problems)
    assert any("identical image" in p and "'a'" in p and "'c'" in p for p in problems)


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

    assert file_id("vols/P01_R.nii.gz") == "P01_R" and file_id("a/b.PNG") == "b"


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


def test_hrf_fundus_crop_on_real_images(real_data):
    path = sorted((real_data / "hrf" / "images").glob("*"))[0]
    img = read_image(path)
    out, info = preprocess_cfp(img, 64)
    assert out.shape == (64, 64, 3)
    top, bottom, left, right = info["bounds"]
    # HRF fields are wider than tall with black side borders: the crop removes some width
    assert right - left < img.shape[1] and bottom - top > 0.8 * img.shape[0]


def test_jhu_volume_central_bscan(real_data):
    path = sorted((real_data / "jhu_oct_volumes").glob("*_stack.npz"))[0]
    vol = read_volume(path)
    assert vol.shape[0] == 49
    (index, bscan), = central_bscans(vol, 1)
    assert index == 24 and bscan.shape == vol.shape[1:]


def test_unsupported_volume_is_reported_not_crashed(real_data):
    with pytest.raises(UnreadableInput) as exc:
        read_volume(real_data / "heidelberg_vol" / "onh.vol")
    assert exc.value.reason == "unsupported_volume_format"
