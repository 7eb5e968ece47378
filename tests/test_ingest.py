"""Dataset ingestion a user can trust: explicit label columns, eye_map, a misplaced external map,
one id per source file, symbolic links followed to regular files only."""

from __future__ import annotations

import hashlib
import os
import signal
from contextlib import contextmanager

import pandas as pd
import pytest
import yaml
from PIL import Image

from bad_inputs import fundus
from conftest import ROOT, dataset_spec, preprocess_section
from retflow.config import semantic_errors
from retflow.data.ingest import DatasetError, list_records
from retflow.data.io import UnreadableInput, read_image, sha256_file
from retflow.data.labels import label_specs
from retflow.data.prepare import prepare
from retflow.data.volumes import read_volume
from retflow.settings import section_defaults, validate

# the sections rule prepare_dataset passes, schema defaults filled (small images for speed)
PREP = preprocess_section({"cfp": {"size": 32}, "oct": {"size": 32}, "min_side": 16})
SPLITS = section_defaults("splits")
LEAKAGE = section_defaults("leakage")


def demo_config(edit=None) -> dict:
    """The demo config, edited, validated (schema defaults filled)."""
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    if edit:
        edit(cfg)
    return validate(cfg)


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""
    def fire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def write_csv_dataset(root, rows, n_patients=10, extra=None):
    """``images/P{p}_{R,L}.png`` + labels.csv (image, patient, eye, grade[, extra columns])."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    table = []
    for p in range(n_patients):
        for k, eye in enumerate(("R", "L")):
            name = f"P{p}_{eye}.png"
            Image.fromarray(fundus(2 * p + k)).save(root / "images" / name)
            table.append({"image": name, "patient": f"P{p}", "eye": eye, "grade": str(p % 2),
                          **{c: f(p, k) for c, f in (extra or {}).items()}})
    table += rows
    pd.DataFrame(table).to_csv(root / "labels.csv", index=False)
    return root / "labels.csv"


def csv_spec(**over) -> dict:
    """A validated csv dataset entry."""
    cfg = demo_config(lambda c: c["datasets"].update(toy={
        "modality": "cfp", "role": "labelled", "source": "csv", "path": "labels.csv", "id_column": "image",
        "patient_column": "patient", "eye_column": "eye", **over}))
    return cfg["datasets"]["toy"]


# ---------------------------------------------------------------- 1. explicit label columns ---

def test_empty_label_columns_is_a_startup_error_saying_what_to_do():
    cfg = demo_config(lambda c: c["datasets"]["cfp_clinic"].update(label_columns=[]))
    msg = ("datasets.cfp_clinic.label_columns: [] keeps no label column; leave the key out to keep the "
           "columns the tasks read, or list the columns to keep")
    assert msg in semantic_errors(cfg)
    with pytest.raises(DatasetError, match=r"label_columns: \[\] keeps no label column"):
        list_records("cfp_clinic", cfg["datasets"]["cfp_clinic"], ROOT / "absent", None)  # phantom: no files read
    assert not any("label_columns" in e for e in semantic_errors(demo_config()))


def test_segmentation_csv_keeps_no_unread_column_and_does_not_stratify_on_fov(tmp_path):
    """A DRIVE-like CSV: image, mask, fov. No task reads 'fov': it is not a label, not a stratum."""
    root = tmp_path / "drive"
    (root / "masks").mkdir(parents=True)
    csv = write_csv_dataset(root, [], extra={"mask": lambda p, k: f"masks/{p}_{k}.png",
                                             "fov": lambda p, k: "wide" if p < 2 else "narrow"})
    for p in range(10):
        for k in range(2):
            Image.fromarray((fundus(2 * p + k)[..., 0] > 150).astype("uint8")).save(root / "masks" / f"{p}_{k}.png")

    def edit(c):
        c["datasets"]["drive"] = {"modality": "cfp", "role": "labelled", "source": "csv", "path": str(csv),
                                  "id_column": "image", "patient_column": "patient", "mask_column": "mask"}
        c["tasks"]["vessels"] = {"dataset": "drive", "type": "segmentation", "classes": ["bg", "vessel"]}
    cfg = demo_config(edit)
    allowed = label_specs(cfg, "drive")
    assert allowed == {}
    qc = prepare("drive", cfg["datasets"]["drive"], csv, root / "images", PREP, SPLITS, LEAKAGE, tmp_path / "out",
                 allowed_labels=allowed)
    assert qc["label_columns"] == [] and qc["n_images"] == 20
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert "fov" not in manifest and "grade" not in manifest


def test_unset_label_columns_keep_what_the_tasks_read(tmp_path):
    csv = write_csv_dataset(tmp_path, [], extra={"site": lambda p, k: "A" if p < 5 else "B"})

    def edit(c):
        c["datasets"]["toy"] = {"modality": "cfp", "role": "labelled", "source": "csv", "path": str(csv),
                                "id_column": "image", "patient_column": "patient"}
        c["tasks"]["toy_grade"] = {"dataset": "toy", "label": "grade", "type": "binary", "classes": ["0", "1"]}
    cfg = demo_config(edit)
    records = list_records("toy", cfg["datasets"]["toy"], csv, tmp_path / "images", label_specs(cfg, "toy"))
    assert [c for c in records.columns if c in ("grade", "site", "eye")] == ["eye", "grade"]
    given = {**cfg["datasets"]["toy"], "label_columns": ["site"]}  # explicit: kept first, task columns too
    records = list_records("toy", given, csv, tmp_path / "images", label_specs(cfg, "toy"))
    assert list(records.columns[-2:]) == ["site", "grade"]


def test_phantom_datasets_still_get_the_columns_their_tasks_read(tmp_path):
    from retflow.phantoms.generate import generate_dataset

    generate_dataset("cfp", tmp_path / "raw", n=12, seed=3, size=48)
    cfg = demo_config()
    allowed = label_specs(cfg, "cfp_clinic")
    assert allowed == {"dr_grade": ["0", "1", "2", "3", "4"], "glaucoma": ["0", "1"], "cdr": None}
    records = list_records("cfp_clinic", cfg["datasets"]["cfp_clinic"], tmp_path / "raw", None, allowed)
    assert {"dr_grade", "glaucoma", "cdr"} <= set(records.columns)
    ext = list_records("cfp_device_b", cfg["datasets"]["cfp_device_b"], tmp_path / "raw", None,
                       label_specs(cfg, "cfp_device_b"))  # its label_map still applies
    assert set(ext["dr_grade"]) <= {"non_referable", "referable"}
    pool = list_records("cfp_pool", cfg["datasets"]["cfp_pool"], tmp_path / "raw", None, label_specs(cfg, "cfp_pool"))
    assert "dr_grade" not in pool  # nothing reads a label from a pretraining pool


def test_a_generators_conditioning_label_is_kept_in_its_pool():
    cfg = validate(yaml.safe_load((ROOT / "config" / "demo_synth.yaml").read_text()))
    assert label_specs(cfg, "cfp_pool") == {"dr_grade": None}


# ---------------------------------------------------------------------------- 2. eye_map ---

def test_eye_map_adds_values_and_an_unknown_one_names_eye_map(tmp_path):
    csv = write_csv_dataset(tmp_path, [])
    table = pd.read_csv(csv, dtype=str)
    table["eye"] = ["OD", "OI"] * 9 + ["oi", "X"]
    table.to_csv(csv, index=False)
    qc = prepare("toy", csv_spec(eye_map={"OI": "L"}), csv, tmp_path / "images", PREP, SPLITS, LEAKAGE,
                 tmp_path / "out")
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert manifest.eye.tolist() == ["R", "L"] * 9 + ["L", ""]
    q = pd.read_csv(tmp_path / "out" / "quarantine.csv")
    assert q.reason.tolist() == ["unknown_eye"] and qc["n_images"] == 20
    assert q.detail[0] == ("eye value 'X' is not R/L (OD/OS, right/left, RE/LE); map it in datasets.toy.eye_map, "
                           "e.g. {X: L}")


def test_eye_map_values_are_checked_by_the_schema():
    from retflow.settings import ConfigError

    with pytest.raises(ConfigError, match=r"datasets.cfp_clinic.eye_map.OI: 'izquierdo' is not one of: R, L"):
        demo_config(lambda c: c["datasets"]["cfp_clinic"].update(eye_map={"OI": "izquierdo"}))


# -------------------------------------------------------------- 3. a misplaced external map ---

def _external(**entry):
    def edit(c):
        c["tasks"]["dr3"] = {"dataset": "cfp_clinic", "label": "dr_grade", "type": "multiclass",
                             "classes": ["noDR", "NPDR", "PDR"], "external": [{"dataset": "cfp_device_b", **entry}]}
    return [e for e in semantic_errors(demo_config(edit)) if e.startswith("tasks.dr3")]


def test_raw_grade_map_as_external_map_points_to_label_map():
    raw = {"0": "noDR", "1": "NPDR", "2": "NPDR", "3": "NPDR", "4": "PDR"}
    (error,) = _external(map=raw)
    assert error == ("tasks.dr3.external.cfp_device_b: a 'map' (model class -> external class) needs the external "
                     "'classes'; this one maps raw values to the task's classes ['noDR', 'NPDR', 'PDR'], which "
                     "belongs in datasets.cfp_device_b.label_map: {dr_grade: {\"0\": \"noDR\", \"1\": \"NPDR\", "
                     "\"2\": \"NPDR\", \"3\": \"NPDR\", ...}} (and drop this 'map')")
    errors = _external(map=raw, classes=["noDR", "NPDR", "PDR"])
    assert errors[0].startswith("tasks.dr3.external.cfp_device_b.map: no entry for model classes ['noDR', 'NPDR', "
                                "'PDR']; this one maps raw values to the task's classes")
    assert "datasets.cfp_device_b.label_map: {dr_grade: {" in errors[0]


def test_a_proper_external_map_passes_and_a_gap_still_points_to_label_map():
    good = {"noDR": "healthy", "NPDR": "dr", "PDR": "dr"}
    assert _external(map=good, classes=["healthy", "dr"]) == []
    (error,) = _external(map={"noDR": "healthy", "NPDR": "dr"}, classes=["healthy", "dr"])
    assert error.startswith("tasks.dr3.external.cfp_device_b.map: no entry for model classes ['PDR']; to map the "
                            "dataset's raw values to the task's classes, use datasets.cfp_device_b.label_map")


# ------------------------------------------------------------------- 4. one id per file ---

def test_files_differing_only_by_extension_are_both_read_csv(tmp_path):
    csv = write_csv_dataset(tmp_path, [
        {"image": "x.jpg", "patient": "X", "eye": "R", "grade": "0"},
        {"image": "x.png", "patient": "X", "eye": "L", "grade": "1"},
        {"image": "x.png", "patient": "X", "eye": "L", "grade": "1"},  # a repeated row: one file, one read
    ])
    Image.fromarray(fundus(500)).save(tmp_path / "images" / "x.jpg")
    Image.fromarray(fundus(501)).save(tmp_path / "images" / "x.png")
    prepare("toy", csv_spec(label_columns=["grade"]), csv, tmp_path / "images", PREP, SPLITS, LEAKAGE,
            tmp_path / "out")
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet").set_index("image_id")
    assert {"x.jpg", "x.png", "P0_R"} <= set(manifest.index)  # other ids keep dropping the extension
    assert manifest.loc["x.jpg", "sha256"] != manifest.loc["x.png", "sha256"]
    assert manifest.loc["x.jpg", "patient_id"] == manifest.loc["x.png", "patient_id"] == "X"
    q = pd.read_csv(tmp_path / "out" / "quarantine.csv")
    assert q[["image_id", "reason"]].values.tolist() == [["x.png", "duplicate_row"]]


def test_files_differing_only_by_extension_are_both_read_imagefolder(tmp_path):
    seed = 0
    for cls in ("a", "b"):
        (tmp_path / "root" / cls).mkdir(parents=True)
        for i in range(6):
            seed += 1
            Image.fromarray(fundus(seed)).save(tmp_path / "root" / cls / f"{i}.png")
    Image.fromarray(fundus(600)).save(tmp_path / "root" / "a" / "0.jpg")
    spec = dataset_spec(modality="cfp", role="labelled", source="imagefolder")
    qc = prepare("folder", spec, tmp_path / "root", None, PREP, SPLITS, LEAKAGE, tmp_path / "out")
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert qc["n_images"] == 13 and qc["quarantined_inputs"] == 0
    assert {"a/0.jpg", "a/0.png", "a/1", "b/0"} <= set(manifest.image_id)


# ---------------------------------------------------------------------- 5. symbolic links ---

def test_symlink_to_a_regular_image_is_read_csv_with_link_source_and_target_hash(tmp_path):
    farm = tmp_path / "store"  # the real files live elsewhere; the dataset folder holds links
    farm.mkdir()
    Image.fromarray(fundus(700)).save(farm / "real.png")
    csv = write_csv_dataset(tmp_path / "ds", [{"image": "link.png", "patient": "Z", "eye": "R", "grade": "1"},
                                              {"image": "../store/real.png", "patient": "Y", "eye": "R", "grade": "1"}])
    link = tmp_path / "ds" / "images" / "link.png"
    os.symlink(farm / "real.png", link)
    prepare("toy", csv_spec(label_columns=["grade"]), csv, tmp_path / "ds" / "images", PREP, SPLITS, LEAKAGE,
            tmp_path / "out")
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet").set_index("image_id")
    assert manifest.loc["link", "source"] == str(link)
    assert manifest.loc["link", "sha256"] == hashlib.sha256((farm / "real.png").read_bytes()).hexdigest()
    q = pd.read_csv(tmp_path / "out" / "quarantine.csv")
    assert q.reason.tolist() == ["unsafe_path"]  # '..' in the CSV entry still leaves the folder
    assert "'../store/real.png' leaves" in q.detail[0]


def test_symlink_to_a_regular_image_is_read_imagefolder(tmp_path):
    farm = tmp_path / "store"
    farm.mkdir()
    for cls in ("a", "b"):
        (tmp_path / "root" / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(fundus(800 + 10 * (cls == "b") + i)).save(farm / f"{cls}{i}.png")
            os.symlink(farm / f"{cls}{i}.png", tmp_path / "root" / cls / f"{i}.png")
    (tmp_path / "more").mkdir()
    for i in range(3):
        Image.fromarray(fundus(850 + i)).save(tmp_path / "more" / f"m{i}.png")
    os.symlink(tmp_path / "more", tmp_path / "root" / "b" / "more")  # a linked folder: its files are listed too
    os.symlink(tmp_path / "root" / "a", tmp_path / "root" / "a" / "self")  # a loop is walked once
    spec = dataset_spec(modality="cfp", role="labelled", source="imagefolder")
    qc = prepare("farm", spec, tmp_path / "root", None, PREP, SPLITS, LEAKAGE, tmp_path / "out")
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet").set_index("image_id")
    assert qc["n_images"] == 12 + 3 and qc["quarantined_inputs"] == 0
    assert manifest.loc["a/3", "source"] == str(tmp_path / "root" / "a" / "3.png")
    assert manifest.loc["a/3", "sha256"] == sha256_file(farm / "a3.png")
    assert manifest.loc["b/more/m2", "label"] == "b"


def test_device_fifo_and_links_to_them_are_refused_without_being_opened(tmp_path):
    os.symlink("/dev/zero", tmp_path / "zero.png")
    os.mkfifo(tmp_path / "pipe.png")
    os.symlink(tmp_path / "pipe.png", tmp_path / "to_pipe.png")
    (tmp_path / "dir.png").mkdir()
    expected = {"zero.png": "symbolic link to /dev/zero, a character device, not a regular file",
                "pipe.png": "a FIFO (named pipe), not a regular file",
                "to_pipe.png": f"symbolic link to {tmp_path / 'pipe.png'}, a FIFO (named pipe), not a regular file",
                "dir.png": "a directory, not a regular file"}
    with deadline(20):
        for name, detail in expected.items():
            for read in (read_image, sha256_file):
                with pytest.raises(UnreadableInput) as info:
                    read(tmp_path / name)
                assert (info.value.reason, info.value.detail) == ("not_a_file", detail)
            if name != "dir.png":  # a folder is a B-scan volume
                with pytest.raises(UnreadableInput) as info:
                    read_volume(tmp_path / name)
                assert (info.value.reason, info.value.detail) == ("not_a_file", detail)


def test_device_and_fifo_in_an_imagefolder_are_quarantined(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "root" / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(fundus(900 + 10 * (cls == "b") + i)).save(tmp_path / "root" / cls / f"{i}.png")
    os.symlink("/dev/zero", tmp_path / "root" / "a" / "zero.png")
    os.mkfifo(tmp_path / "root" / "b" / "pipe.png")
    spec = dataset_spec(modality="cfp", role="labelled", source="imagefolder")
    with deadline(60):
        prepare("folder", spec, tmp_path / "root", None, PREP, SPLITS, LEAKAGE, tmp_path / "out")
    q = pd.read_csv(tmp_path / "out" / "quarantine.csv")
    assert dict(zip(q.image_id, q.reason)) == {"a/zero": "not_a_file", "b/pipe": "not_a_file"}


def test_symlinked_volumes_are_read_with_link_source_and_target_hash(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    (tmp_path / "store").mkdir()
    (tmp_path / "ds" / "volumes").mkdir(parents=True)
    rows = []
    for i in range(10):
        np.save(tmp_path / "store" / f"v{i}.npy", rng.integers(0, 255, (3, 40, 40), dtype=np.uint8))
        os.symlink(tmp_path / "store" / f"v{i}.npy", tmp_path / "ds" / "volumes" / f"v{i}.npy")
        rows.append({"volume": f"v{i}.npy", "patient": f"P{i}", "label": str(i % 2)})
    os.symlink("/dev/zero", tmp_path / "ds" / "volumes" / "zero.npy")
    rows.append({"volume": "zero.npy", "patient": "Z", "label": "0"})
    pd.DataFrame(rows).to_csv(tmp_path / "ds" / "labels.csv", index=False)
    spec = dataset_spec(modality="oct", role="labelled", source="volumes", id_column="volume",
                        patient_column="patient", label_columns=["label"])
    with deadline(60):
        prepare("vols", spec, tmp_path / "ds" / "labels.csv", tmp_path / "ds" / "volumes", PREP, SPLITS, LEAKAGE,
                tmp_path / "out")
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet").set_index("image_id")
    assert manifest.loc["v3", "source"] == str(tmp_path / "ds" / "volumes" / "v3.npy")
    assert manifest.loc["v3", "sha256"] == sha256_file(tmp_path / "store" / "v3.npy")
    q = pd.read_csv(tmp_path / "out" / "quarantine.csv")
    assert q[["image_id", "reason"]].values.tolist() == [["zero", "not_a_file"]]
