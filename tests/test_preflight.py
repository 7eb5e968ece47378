"""The data-stage pre-flight gate (retflow.preflight_data, rule preflight), evidence that outlives a
failed data job, and pools that never take a labelled dataset's test images (retflow.data.pools).

Unit tests prepare tiny CSV datasets in-process (seconds); the Snakemake runs are marked slow.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from bad_inputs import fundus
from conftest import ROOT, dataset_spec, make_workdir, snakemake, write_config
from retflow.data import cross_dataset_leakage
from retflow.data.labels import label_specs
from retflow.data.leakage import pooled_test_images
from retflow.data.pools import pool_indices, pool_splits
from retflow.data.prepare import prepare
from retflow.preflight_data import gate_checks, pool_note, run_gate, task_names
from retflow.settings import section_defaults, validate

GLAUCOMA = {"dataset": "clinic", "label": "diagnosis", "type": "binary", "classes": ["0", "1"]}


def csv_dataset(root, n_patients=20, labels=None, seed=0, broken=0):
    """``n_patients`` x 2 eyes of distinct fundus-like PNGs + labels.csv; ``labels(i)`` gives row i's
    diagnosis (None: no column); ``broken`` more rows whose files are not images."""
    images = root / "images"
    images.mkdir(parents=True)
    rows = []
    for p in range(n_patients):
        for e, eye in enumerate(("R", "L")):
            i = 2 * p + e
            Image.fromarray(fundus(seed * 1000 + i)).save(images / f"{root.name}_{i}.png")
            row = {"image": f"{root.name}_{i}.png", "patient": f"{root.name}P{p}", "eye": eye}
            if labels is not None:
                row["diagnosis"] = labels(i)
            rows.append(row)
    for k in range(broken):
        (images / f"broken_{k}.png").write_bytes(b"not an image")
        rows.append({"image": f"broken_{k}.png", "patient": f"X{k}", "eye": "R",
                     **({"diagnosis": "0"} if labels is not None else {})})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return {"modality": "cfp", "source": "csv", "path": str(root / "labels.csv"), "images": str(images),
            "id_column": "image", "patient_column": "patient", "eye_column": "eye"}


def good_labels(i):
    return str((i // 2) % 2)  # per patient, both classes in every split


def wrong_labels(i):
    return "Glaucoma" if (i // 2) % 2 else "normal"


def demo_with(tmp_path, datasets, tasks, models=None, pools=None, **pretrain):
    """The demo config.yaml with these datasets/tasks, MAE pretraining on ``pools``, tiny epochs."""
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg.update(datasets=datasets, tasks=tasks, results=str(tmp_path / "results"),
               models=models or {"mae": {"init": "pretrained", "method": "mae"}, "scratch": {"init": "random"}})
    cfg["pretrain"].update(methods=["mae"], pools=pools or {"cfp": ["pool"]}, epochs=1, **pretrain)
    cfg["pretrain"].pop("recipes", None)
    cfg["pretrain"].pop("simclr", None)
    cfg["finetune"]["epochs"] = 1
    return cfg


def prepare_all(cfg, root):
    """What rules prepare_dataset + leakage_check write, in-process: the stores and leakage.json."""
    cfg = validate(cfg)
    prep = {k: v for k, v in cfg["preprocess"].items() if not k.startswith("max_")}
    stores = []
    for name, ds in cfg["datasets"].items():
        prepare(name, ds, Path(ds["path"]), Path(ds["images"]), prep, cfg["splits"], cfg["leakage"], root / name,
                label_specs(cfg, name))
        stores.append(str(root / name))
    leak = root / "leakage.json"
    assert cross_dataset_leakage.main(["--stores", *stores, "--out", str(leak), "--leakage", json.dumps(cfg["leakage"]),
                                       "--pool-splits", json.dumps(pool_splits(cfg))]) == 0
    return cfg, stores, leak


@pytest.fixture
def pool_spec(tmp_path):
    return {**csv_dataset(tmp_path / "pool", n_patients=10, seed=7), "role": "pretrain"}


def test_wrong_label_values_fail_the_gate_naming_dataset_column_values_and_the_label_map(tmp_path, pool_spec):
    clinic = {**csv_dataset(tmp_path / "clinic", labels=wrong_labels), "role": "labelled"}
    cfg = demo_with(tmp_path, {"clinic": clinic, "pool": pool_spec}, {"glaucoma": GLAUCOMA})
    cfg, stores, leak = prepare_all(cfg, tmp_path / "data")  # the data stage itself does not fail
    verdict = run_gate(stores, leak, gate_checks(cfg), task_names(cfg))
    assert len(verdict.problems) == 1, verdict.problems
    line = verdict.problems[0]
    assert "\n" not in line and "task 'glaucoma'" in line and "dataset 'clinic'" in line
    assert "40 of 40 images" in line and "column 'diagnosis'" in line
    assert "'Glaucoma' (20)" in line and "'normal' (20)" in line
    assert "preprocess.max_unusable_label_fraction 50%" in line
    assert "datasets.clinic.label_map: {diagnosis: {Glaucoma: '<class>', normal: '<class>'}}" in line
    assert str(tmp_path / "data/clinic/quarantine.csv") in line


def test_a_case_slip_is_mapped_for_the_user_and_a_few_bad_labels_pass(tmp_path, pool_spec):
    labels = lambda i: {0: "Normal", 1: "Glaucoma"}[(i // 2) % 2] if i < 4 else ["normal", "glaucoma"][(i // 2) % 2]  # noqa: E731
    clinic = {**csv_dataset(tmp_path / "clinic", labels=labels), "role": "labelled"}
    task = {**GLAUCOMA, "classes": ["normal", "glaucoma"]}
    cfg = demo_with(tmp_path, {"clinic": clinic, "pool": pool_spec}, {"glaucoma": task})
    cfg, stores, leak = prepare_all(cfg, tmp_path / "data")
    verdict = run_gate(stores, leak, gate_checks(cfg), task_names(cfg))
    assert verdict.problems == [], verdict.problems  # 4 of 40 unusable: under the threshold
    cfg["preprocess"]["max_unusable_label_fraction"] = 0.05
    line = run_gate(stores, leak, gate_checks(cfg), task_names(cfg)).problems[0]
    assert "{diagnosis: {Glaucoma: glaucoma, Normal: normal}}" in line and "4 of 40 images" in line


def test_gate_lists_every_problem_of_every_dataset_at_once(tmp_path, pool_spec):
    clinic = {**csv_dataset(tmp_path / "clinic", labels=wrong_labels), "role": "labelled"}
    other = {**csv_dataset(tmp_path / "other", n_patients=10, labels=good_labels, seed=3, broken=4),
             "role": "labelled"}
    tasks = {"glaucoma": GLAUCOMA, "other_task": {**GLAUCOMA, "dataset": "other"}}
    cfg = demo_with(tmp_path, {"clinic": clinic, "other": other, "pool": pool_spec}, tasks)
    cfg, stores, leak = prepare_all(cfg, tmp_path / "data")
    problems = run_gate(stores, leak, gate_checks(cfg), task_names(cfg)).problems
    assert any(p.startswith("task 'glaucoma'") for p in problems), problems
    quarantine = [p for p in problems if p.startswith("dataset 'other'")]
    assert len(quarantine) == 1 and "4/24 inputs quarantined" in quarantine[0]
    assert "preprocess.max_quarantine_fraction" in quarantine[0] and "not_an_image" in quarantine[0]
    assert str(tmp_path / "data/other/quarantine.csv") in quarantine[0]
    assert len(problems) == 2 and all("\n" not in p for p in problems)


def test_a_split_without_labels_fails_at_the_gate_not_in_the_finetune_job(tmp_path, pool_spec):
    clinic = {**csv_dataset(tmp_path / "clinic", labels=lambda i: "1"), "role": "labelled"}
    table = pd.read_csv(tmp_path / "clinic/labels.csv")
    table["part"] = ["train"] * 24 + ["val"] * 8 + ["test"] * 8
    table.loc[table.part == "val", "diagnosis"] = None  # val rows unlabelled
    table.to_csv(tmp_path / "clinic/labels.csv", index=False)
    clinic["split_column"] = "part"
    cfg = demo_with(tmp_path, {"clinic": clinic, "pool": pool_spec}, {"glaucoma": GLAUCOMA})
    cfg, stores, leak = prepare_all(cfg, tmp_path / "data")
    problems = run_gate(stores, leak, gate_checks(cfg), task_names(cfg)).problems
    assert problems == [f"task 'glaucoma': no usable diagnosis label in split 'val' of dataset 'clinic' (8 images in "
                        f"that split); fine-tuning needs labelled train, val and test images (see "
                        f"datasets.clinic.split_column / the splits section, and "
                        f"{tmp_path / 'data/clinic/quarantine.csv'})"], problems


def test_startup_names_each_missing_task_column_by_its_key_and_reads_what_the_data_stage_keeps(tmp_path):
    """The startup header check (retflow.preflight.task_columns) and the data stage
    (retflow.data.labels.label_specs) take the task columns from one place: label_reads."""
    from retflow.preflight import startup_errors, task_columns

    clinic = {**csv_dataset(tmp_path / "clinic", n_patients=2, labels=good_labels), "role": "labelled"}
    ext = {**csv_dataset(tmp_path / "ext", n_patients=2, labels=good_labels), "role": "external",
           "multilabel_columns": ["drusen"]}
    tasks = {"glaucoma": {**GLAUCOMA, "external": [{"dataset": "ext", "label": "dx", "classes": ["a", "b"],
                                                    "map": {"0": "a", "1": "b"}}]},
             "grade": {"dataset": "clinic", "label": "grade", "type": "multiclass", "classes": ["0", "1", "2"],
                       "external": ["ext"]}}
    cfg = validate(demo_with(tmp_path, {"clinic": clinic, "ext": ext}, tasks, pools={"cfp": ["clinic"]}))
    header = "image, patient, eye, diagnosis"
    where = {name: tmp_path / name / "labels.csv" for name in ("clinic", "ext")}
    assert startup_errors(cfg) == [
        f"tasks.grade.label: column 'grade' is not in {where['clinic']} (its columns: {header})",
        f"datasets.ext.multilabel_columns: column 'drusen' is not in {where['ext']} (its columns: {header})",
        f"tasks.glaucoma.external.ext.label: column 'dx' is not in {where['ext']} (its columns: {header})",
        f"tasks.grade.label: column 'grade' is not in {where['ext']} (its columns: {header})"]
    assert task_columns(cfg, "ext") == [("tasks.glaucoma.external.ext.label", "dx"), ("tasks.grade.label", "grade")]
    assert label_specs(cfg, "ext") == {"dx": ["a", "b"], "grade": ["0", "1", "2"], "drusen": ["0", "1"]}
    assert label_specs(cfg, "clinic") == {"diagnosis": ["0", "1"], "grade": ["0", "1", "2"]}
    assert [c for _, c in task_columns(cfg, "clinic")] == list(label_specs(cfg, "clinic"))


def demo_preprocess() -> dict:
    """The demo's preprocess section with every schema default, as rule prepare_dataset passes it."""
    prep = validate(yaml.safe_load((ROOT / "config.yaml").read_text()))["preprocess"]
    return {k: v for k, v in prep.items() if not k.startswith("max_")}


def test_a_failed_prepare_keeps_quarantine_and_qc_and_names_them(tmp_path):
    spec = dataset_spec(**csv_dataset(tmp_path / "raw", n_patients=0, labels=good_labels, broken=3), role="labelled")
    out, keep = tmp_path / "results/data/bad", tmp_path / "logs/data/prepare_bad.failed"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "workflow_scripts/prepare_dataset.py"), "--name", "bad", "--spec", json.dumps(spec),
         "--location", spec["path"], "--images", spec["images"], "--preprocess", json.dumps(demo_preprocess()),
         "--splits", json.dumps(section_defaults("splits")), "--leakage", json.dumps(section_defaults("leakage")),
         "--out-dir", str(out),
         "--keep-on-failure", str(keep)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("ERROR: dataset 'bad': no usable images among 3 inputs")
    assert f"kept in {keep / 'quarantine.csv'} and {keep / 'qc.json'}" in message
    for f in ("quarantine.csv", "qc.json"):  # Snakemake deletes the outputs; the copies stay
        (out / f).unlink()
    assert pd.read_csv(keep / "quarantine.csv").reason.tolist() == ["not_an_image"] * 3
    qc = json.loads((keep / "qc.json").read_text())
    assert qc["quarantined_inputs"] == 3 and qc["error"] in message


def make_store(root, name, split):
    from retflow.data.store import write_images

    write_images(root / name, [fundus(k)[:32, :32] for k in range(len(split))])
    pd.DataFrame({"image_id": [f"{name}{k}" for k in range(len(split))], "split": split, "index": range(len(split)),
                  "sha256": [f"{name}{k}" for k in range(len(split))],
                  "phash": ["0" * 64] * len(split)}).to_parquet(root / name / "manifest.parquet")
    return str(root / name)


def test_a_labelled_dataset_in_a_pool_gives_only_its_train_split(tmp_path):
    from retflow.models.vit import ViTSpec
    from retflow.synth.pool import PoolImages
    from retflow.train.pretrain import build_pool

    clinic = make_store(tmp_path, "clinic", ["train"] * 6 + ["val"] * 2 + ["test"] * 3)
    pool = make_store(tmp_path, "pool", ["pool"] * 5)
    manifest = pd.read_parquet(f"{clinic}/manifest.parquet")
    assert pool_indices(manifest, ["train"]).tolist() == list(range(6))
    assert pool_indices(manifest, ["train", "test"]).tolist() == [0, 1, 2, 3, 4, 5, 8, 9, 10]
    spec = ViTSpec("vit_tiny_patch16_224", img_size=32, patch_size=8)
    data = build_pool([pool, clinic], spec, None, ["train"])
    assert len(data) == 5 + 6 and [len(d) for d in data.datasets] == [5, 6]
    assert sorted(data.datasets[1].indices.tolist()) == list(range(6))
    assert len(PoolImages([pool, clinic], None, "cfp", ["train"])) == 11


def test_the_pool_default_and_a_warning_when_the_config_adds_test(tmp_path, pool_spec):
    clinic = {**csv_dataset(tmp_path / "clinic", labels=good_labels), "role": "labelled"}
    cfg = demo_with(tmp_path, {"clinic": clinic, "pool": pool_spec}, {"glaucoma": GLAUCOMA},
                    pools={"cfp": ["pool", "clinic"]})
    assert validate(cfg)["pretrain"]["labelled_pool_splits"] == ["train"]  # the schema default
    cfg, stores, leak = prepare_all(cfg, tmp_path / "data")
    verdict = run_gate(stores, leak, gate_checks(cfg), task_names(cfg))
    assert not verdict.problems and not verdict.warnings
    assert verdict.summary["pools"] == {"pretrain.pools.cfp": {"clinic": 24, "pool": 20}}
    cfg["pretrain"]["labelled_pool_splits"] = ["train", "test"]
    cfg, stores, leak = prepare_all(cfg, tmp_path / "data2")
    verdict = run_gate(stores, leak, gate_checks(cfg), task_names(cfg))
    assert not verdict.problems and verdict.summary["pools"]["pretrain.pools.cfp"]["clinic"] == 32
    assert verdict.warnings == ["pretrain.labelled_pool_splits ['train', 'test']: pretrain.pools.cfp takes the 8 test "
                                "images of 'clinic', which its tasks validate or test on: pretraining sees them "
                                "(the report says so)"]
    findings = json.loads(leak.read_text())["findings"]
    assert [(f["kind"], f["action"], len(f["ids"])) for f in findings] == [("test_in_pool", "warn", 8)]
    (tmp_path / "results/data").mkdir(parents=True)
    (tmp_path / "results/data/preflight.json").write_text(json.dumps(verdict.summary))
    note = pool_note(tmp_path / "results")
    assert "pretrain.pools.cfp: clinic (32 images), pool (20 images)" in note and "Warning:" in note


def test_a_cross_validated_dataset_in_a_pool_is_a_warning(tmp_path, pool_spec):
    clinic = {**csv_dataset(tmp_path / "clinic", labels=good_labels), "role": "labelled"}
    cfg = demo_with(tmp_path, {"clinic": clinic, "pool": pool_spec}, {"glaucoma": GLAUCOMA},
                    pools={"cfp": ["pool", "clinic"]})
    cfg["splits"]["folds"] = 3
    cfg, stores, leak = prepare_all(cfg, tmp_path / "data")
    verdict = run_gate(stores, leak, gate_checks(cfg), task_names(cfg))
    assert not verdict.problems
    assert verdict.warnings == ["pretrain.pools.cfp takes 24 images of 'clinic', which is cross-validated (3 folds): "
                                "each of its patients is in one fold's test part, so every fold's model is tested on "
                                "images its encoder was pretrained on (remove 'clinic' from pretrain.pools.cfp, or set "
                                "datasets.clinic.folds: 1; the report says so)"]
    cfg["pretrain"]["pools"]["cfp"] = ["pool"]  # out of the pool: nothing to say
    verdict = run_gate(stores, leak, gate_checks(cfg), task_names(cfg))
    assert not verdict.problems and not verdict.warnings


def test_a_dataset_against_itself_in_the_leakage_check(tmp_path):
    manifest = pd.DataFrame({"image_id": ["a", "b", "c"], "split": ["train", "val", "test"], "index": [0, 1, 2]})
    assert pooled_test_images(manifest, "clinic", ["train"]) == []
    (finding,) = pooled_test_images(manifest, "clinic", ["train", "val", "test"])
    assert (finding.kind, finding.action, finding.where, finding.ids) == ("test_in_pool", "warn",
                                                                           "clinic:pool vs clinic:test", ["c"])
    # through the rule's entry point: the pool member's test images are a finding in leakage.json
    clinic = make_store(tmp_path, "clinic", ["train", "val", "test"])
    out = tmp_path / "leakage.json"
    assert cross_dataset_leakage.main(["--stores", clinic, "--out", str(out), "--leakage",
                                       json.dumps(section_defaults("leakage")),
                                       "--pool-splits", json.dumps({"clinic": ["train", "test"]})]) == 0
    report = json.loads(out.read_text())
    assert report["pool_splits"] == {"clinic": ["train", "test"]}
    assert [f["ids"] for f in report["findings"] if f["kind"] == "test_in_pool"] == [["clinic2"]]


def test_the_gate_rule_reruns_on_what_decides_its_verdict_only():
    cfg = validate(yaml.safe_load((ROOT / "config.yaml").read_text()))
    before = gate_checks(cfg)
    cfg["tasks"]["dr_grading"]["type"] = "multiclass"  # another classification kind: same labels
    cfg["tasks"]["glaucoma"]["fractions"] = [1.0]
    cfg["models"]["extra"] = {"init": "random"}
    cfg["tasks"]["glaucoma_again"] = dict(cfg["tasks"]["glaucoma"])  # labels the gate checks already
    assert gate_checks(cfg) == before
    assert task_names(cfg)["internal:cfp_clinic:glaucoma:classes:0,1"] == ["glaucoma", "glaucoma_again"]
    cfg["tasks"]["glaucoma"]["classes"] = ["no", "yes"]
    assert gate_checks(cfg) != before


def test_the_gate_counts_usable_labels_as_the_training_jobs_do():
    from retflow.data.labels import usable_labels
    from retflow.settings.stages import TaskSettings
    from retflow.train.targets import encode_targets

    m = pd.DataFrame({"a": ["0", " 1.0 ", "2", None, "nan", "yes", 1, 0.0],
                      "b": ["1", "0", "1", "1", "0", "0", "1", None],
                      "r": ["0.5", "x", None, "3", "inf", "-2", 1, "1e3"]})
    for kind, label, classes in (("binary", "a", ("0", "1")), ("multiclass", "a", ("0", "1", "2")),
                                 ("multilabel", ("a", "b"), ("a", "b")), ("regression", "r", ("r",))):
        task = TaskSettings(name="t", type=kind, label=label, classes=classes)
        cols = list(label) if isinstance(label, tuple) else [label]
        assert usable_labels(m, kind, cols, list(classes)).tolist() == encode_targets(m, task)[1].tolist(), kind


def test_the_gate_imports_no_torch():
    code = "import sys, retflow.preflight_data; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT / "src")})
    assert proc.stdout.strip() == "False", proc.stderr


# ---------------------------------------------------------------------------------- Snakemake
def tiny_workflow(tmp_path, labels):
    work = make_workdir(tmp_path)
    pool = {**csv_dataset(tmp_path / "pool", n_patients=10, seed=7), "role": "pretrain"}
    clinic = {**csv_dataset(tmp_path / "clinic", labels=labels), "role": "labelled"}
    cfg = demo_with(tmp_path, {"clinic": clinic, "pool": pool}, {"glaucoma": GLAUCOMA})
    cfg["results"] = "results"
    write_config(work / "tiny.yaml", lambda c: (c.clear(), c.update(cfg)))
    return work


@pytest.mark.slow
def test_snakemake_preflight_runs_the_data_stage_and_says_ready(tmp_path):
    work = tiny_workflow(tmp_path, good_labels)
    result = snakemake(work, "preflight", "--cores", "2", "--configfile", "tiny.yaml")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "\nready\n" in out and "dataset clinic (labelled cfp): 40 images" in out
    assert "task 'glaucoma' (internal clinic: diagnosis): usable labels train" in out
    assert json.loads((work / "results/data/preflight.json").read_text())["status"] == "ready"
    assert not (work / "results/pretrain").exists()


@pytest.mark.slow
def test_wrong_labels_stop_the_workflow_before_any_pretraining(tmp_path):
    """Acceptance: a wrong label value in a labelled CSV dataset, MAE pretraining in the config."""
    work = tiny_workflow(tmp_path, wrong_labels)
    t0 = time.perf_counter()
    result = snakemake(work, "--cores", "2", "--configfile", "tiny.yaml")
    seconds = time.perf_counter() - t0
    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-3000:]
    assert "ERROR: task 'glaucoma': 40 of 40 images of dataset 'clinic' have no usable label" in out
    assert "datasets.clinic.label_map: {diagnosis: {" in out
    assert "rule pretrain" not in out and not (work / "results/pretrain").exists() and not (work / "logs/pretrain").exists()
    assert not (work / "results/data/preflight.json").exists()
    for f in ("quarantine.csv", "qc.json"):  # the gate's evidence survives it
        assert (work / "results/data/clinic" / f).is_file()
    print(f"acceptance run: {seconds:.1f} s to the gate's failure")


@pytest.mark.slow
def test_a_failed_data_job_keeps_its_evidence_through_snakemake(tmp_path):
    work = make_workdir(tmp_path)
    bad = {**csv_dataset(tmp_path / "bad", n_patients=0, labels=good_labels, broken=3), "role": "labelled"}
    pool = {**csv_dataset(tmp_path / "pool", n_patients=10, seed=7), "role": "pretrain"}
    cfg = demo_with(tmp_path, {"bad": bad, "pool": pool}, {"glaucoma": {**GLAUCOMA, "dataset": "bad"}})
    cfg["results"] = "results"
    write_config(work / "bad.yaml", lambda c: (c.clear(), c.update(cfg)))
    result = snakemake(work, "preflight", "--cores", "1", "--configfile", "bad.yaml")
    assert result.returncode != 0
    keep = work / "logs/data/prepare_bad.failed"
    assert not (work / "results/data/bad/quarantine.csv").exists()  # Snakemake removed the outputs
    assert pd.read_csv(keep / "quarantine.csv").reason.tolist() == ["not_an_image"] * 3
    log = (work / "logs/data/prepare_bad.log").read_text()
    assert "logs/data/prepare_bad.failed/quarantine.csv" in log and "logs/data/prepare_bad.failed/qc.json" in log
