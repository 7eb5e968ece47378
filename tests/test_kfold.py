"""k-fold cross-validation (splits.folds): fold assignment in the data stage, a fold run's split,
the pre-flight message, the fan-out (dry-runs) and the report's k-fold means."""

import json
import math
import types

import numpy as np
import pandas as pd
import pytest
from conftest import job_counts, make_workdir, snakemake, write_config

from retflow import config as rfc
from retflow.data.prepare import add_folds
from retflow.data.splits import GIVEN_TEST, assign_folds, fold_split
from retflow.layout import Layout
from retflow.preflight_data import _dataset_problems, _read_store
from retflow.report.collect import collect_results
from retflow.report.model import kfold_rows
from retflow.settings import build, validate
from retflow.settings.stages import FoldSettings

SPLITS = {"train": 0.6, "val": 0.2, "test": 0.2, "seed": 0, "folds": 5}


def manifest(n_patients=60, images=3, given=None, seed=0) -> pd.DataFrame:
    """``images`` rows per patient, a binary label (one per patient, 1 in 3 positive)."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = str(int(p % 3 == 0))
        for i in range(images):
            rows.append({"patient_id": f"P{p:03d}", "image_id": f"P{p:03d}_{i}", "glaucoma": label,
                         "given_split": "" if given is None else given(p)})
    df = pd.DataFrame(rows)
    return df.sample(frac=1.0, random_state=int(rng.integers(1 << 31))).reset_index(drop=True)


def test_folds_group_patients_and_cover_the_labelled_set():
    df = manifest()
    folds = assign_folds(df["patient_id"], df["glaucoma"], 5, seed=0)
    assert sorted(folds.unique()) == [0, 1, 2, 3, 4]  # every row in one fold: the test parts cover the set
    assert (df.assign(f=folds).groupby("patient_id")["f"].nunique() == 1).all()  # no patient in two folds
    tests = [set(df.loc[folds == k, "patient_id"]) for k in range(5)]
    assert all(not (a & b) for i, a in enumerate(tests) for b in tests[i + 1:])  # disjoint test parts
    assert set().union(*tests) == set(df["patient_id"])
    # stratified: every fold holds about a third positives, and about a fifth of the patients
    share = df.assign(f=folds).groupby("f")["glaucoma"].apply(lambda s: (s == "1").mean())
    assert share.between(0.2, 0.47).all(), share
    sizes = df.assign(f=folds).groupby("f")["patient_id"].nunique()
    assert sizes.between(10, 14).all(), sizes
    again = assign_folds(df["patient_id"], df["glaucoma"], 5, seed=0)
    assert again.equals(folds)  # seeded: the same folds every time


def test_fold_run_carves_validation_from_its_training_part():
    df = manifest()
    df["fold"] = assign_folds(df["patient_id"], df["glaucoma"], 5, seed=0).to_numpy()
    for k in range(5):
        split = fold_split(df, FoldSettings(fold=k, folds=5, val_share=0.25, seed=0), df["glaucoma"])
        assert set(split.unique()) == {"train", "val", "test"}
        assert (split == "test").equals(df["fold"] == k)  # test = this fold's patients
        per_patient = df.assign(s=split).groupby("patient_id")["s"].nunique()
        assert (per_patient == 1).all()  # val and train by patient
        val_patients = df.loc[split == "val", "patient_id"].nunique()
        rest_patients = df.loc[split != "test", "patient_id"].nunique()
        assert abs(val_patients - 0.25 * rest_patients) <= 2
        assert (df.loc[split == "val", "glaucoma"] == "1").any()  # stratified: both classes in val


def test_given_test_split_is_kept():
    df = manifest(given=lambda p: "test" if p < 12 else ("val" if p < 20 else "train"))
    qc = add_folds(df, "cfp", {"role": "labelled"}, ["glaucoma"], dict(SPLITS, folds=4))
    assert qc["given_test"] and qc["patients"] == 48 and set(qc["images"]) == {"0", "1", "2", "3"}
    given = df["given_split"] == "test"
    assert (df.loc[given, "fold"] == GIVEN_TEST).all() and (df.loc[~given, "fold"] >= 0).all()
    split = fold_split(df, FoldSettings(fold=2, folds=4, val_share=0.25, seed=0), df["glaucoma"])
    assert (split == "test").equals(given)  # every fold is tested on the given test split
    assert (split == "val").equals(df["fold"] == 2)  # and validated on its own fold
    # no given split / not labelled / one fold: no fold column
    for spec, splits in (({"role": "external"}, SPLITS), ({"role": "labelled"}, dict(SPLITS, folds=1))):
        plain = manifest()
        assert add_folds(plain, "x", spec, ["glaucoma"], splits) is None and "fold" not in plain


def test_too_few_patients_is_one_gate_line(tmp_path):
    df = manifest(n_patients=3)
    qc = add_folds(df, "tiny", {"role": "labelled"}, ["glaucoma"], SPLITS)
    assert "fold" not in df
    assert qc["problem"] == ("dataset 'tiny': 3 patients (outside a given test split) cannot make 5 "
                             "cross-validation folds; set datasets.tiny.folds (or splits.folds) to 3 or fewer, "
                             "or 1 for the fixed split")
    store = tmp_path / "tiny"
    store.mkdir()
    df.assign(split="train", index=range(len(df))).to_parquet(store / "manifest.parquet")
    (store / "qc.json").write_text(json.dumps({
        "n_sources": 9, "quarantined_inputs": 0, "quarantine_reasons": {}, "leakage_errors": [], "folds": qc}))
    assert _dataset_problems(_read_store(store, set()), 0.1) == [qc["problem"]]
    with pytest.raises(Exception, match="no 'fold' column"):
        fold_split(df, FoldSettings(fold=0, folds=5, val_share=0.25, seed=0))


def demo_config(folds: dict) -> dict:
    import yaml

    from conftest import ROOT

    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    for key, value in folds.items():
        if key == "splits":
            cfg["splits"] = {**cfg.get("splits", {}), "folds": value}
        else:
            cfg["datasets"][key]["folds"] = value
    return validate(cfg)


def test_fanout_settings_and_paths():
    plain, folded = demo_config({}), demo_config({"oct_clinic": 3})
    assert [r for r in rfc.downstream_runs(plain)] == [r for r in rfc.downstream_runs(plain) if r.fold is None]
    runs = rfc.downstream_runs(folded, "oct_diagnosis")
    assert len(runs) == 3 * len(rfc.downstream_runs(plain, "oct_diagnosis"))
    assert Layout("r").run(runs[1]) == "r/finetune/oct_diagnosis/mae/frac0.3/fold1/seed0"
    assert rfc.downstream_runs(folded, "glaucoma") == rfc.downstream_runs(plain, "glaucoma")  # cfp_clinic: no folds
    s = build.finetune(folded, "finetune", "oct_diagnosis", 0.3, 0, model="mae", fold_k="fold2/")
    assert s.fold == FoldSettings(fold=2, folds=3, val_share=0.25, seed=0)
    assert build.finetune(plain, "finetune", "oct_diagnosis", 0.3, 0, model="mae").fold is None
    with pytest.raises(rfc.ConfigError, match="fold 3 is not one of its folds"):
        build.finetune(folded, "finetune", "oct_diagnosis", 0.3, 0, fold_k=3)
    errors = rfc.semantic_errors(demo_config({"oct_device_b": 3}))
    assert any(e.startswith("datasets.oct_device_b.folds: only labelled datasets") for e in errors)


def test_dry_run_with_three_folds_plans_three_times_the_runs(tmp_path):
    work = make_workdir(tmp_path)
    base = job_counts(snakemake(work, "-n", "--cores", "1").stdout)

    def edit(cfg):
        cfg.setdefault("splits", {})["folds"] = 3

    write_config(work / "folds.yaml", edit)
    result = snakemake(work, "-n", "--cores", "1", "--configfile", "folds.yaml")
    assert result.returncode == 0, result.stderr
    counts = job_counts(result.stdout)
    for rule in ("finetune", "evaluate_internal", "segment", "predict_external", "evaluate_external", "compare"):
        assert counts[rule] == 3 * base[rule], rule
    for rule in ("pretrain", "prepare_dataset", "preflight", "report", "saliency"):
        assert counts[rule] == base[rule], rule
    assert "results/finetune/glaucoma/mae/frac0.1/fold2/seed0/metrics.json" in result.stdout
    assert "results/compare/glaucoma/finetune/frac1/fold1/seed0.json" in result.stdout
    assert "/seed0/" in result.stdout and "results/finetune/glaucoma/mae/frac0.1/seed0/" not in result.stdout


def test_report_gives_the_mean_and_t_interval_across_folds(tmp_path):
    layout = Layout(tmp_path / "results")
    values = {0: 0.7, 1: 0.8, 2: 0.9}
    for fold, v in values.items():
        for model, shift in (("mae", 0.0), ("scratch", -0.1)):
            run = layout.run_dir("finetune", "glaucoma", model, 1.0, 0, fold)
            (tmp_path / run).mkdir(parents=True)
            metrics = {"task": "glaucoma", "task_type": "binary", "protocol": "finetune", "model": model,
                       "fraction": 1.0, "seed": 0, "eval_set": "internal", "n": 20,
                       "metrics": {"auroc": {"value": v + shift, "ci_low": v + shift - 0.1, "ci_high": v + shift + 0.1}}}
            (tmp_path / run / "metrics.json").write_text(json.dumps(metrics))
    # a fixed-split run beside them is not a fold
    plain = tmp_path / layout.run_dir("finetune", "glaucoma", "mae", 0.1, 0)
    plain.mkdir(parents=True)
    (plain / "metrics.json").write_text(json.dumps({**metrics, "model": "mae", "fraction": 0.1}))
    df = collect_results(layout.root)
    assert sorted(df["fold"].dropna().astype(int).unique()) == [0, 1, 2] and df["fold"].isna().sum() == 1
    rows = kfold_rows(types.SimpleNamespace(df=df, primary="auroc", models=["mae", "scratch"]))
    assert [(r.model, r.fraction, r.n_folds) for r in rows] == [("mae", 1.0, 3), ("scratch", 1.0, 3)]
    mae = rows[0].estimate
    half = 4.302653 * 0.1 / math.sqrt(3)  # t_{0.975, 2} x sd / sqrt(3)
    assert mae.kind == "seeds" and mae.value == pytest.approx(0.8)
    assert (mae.lo, mae.hi) == (pytest.approx(0.8 - half, abs=1e-5), pytest.approx(0.8 + half, abs=1e-5))
    assert [(s.seed, round(s.value, 6)) for s in mae.per_seed] == [(0, 0.7), (1, 0.8), (2, 0.9)]
    assert rows[0].words == "k-fold mean over 3 folds"
    from retflow.report.view import fold_values_text, kfold_text

    assert "k-fold mean ± 95% t interval across 3 folds" in kfold_text(mae)
    assert fold_values_text(mae).startswith("fold 0: 0.7")


def test_headline_of_a_cross_validated_task_counts_folds_and_tests_within_each_fold(tmp_path):
    from retflow.report import model as rmodel
    from retflow.report.collect import ReportInputs, collect_compare
    from retflow.report.view import estimate_text
    from retflow.settings import report as report_settings

    config = validate({
        "datasets": {"fundus": {"modality": "cfp", "role": "labelled", "source": "csv", "path": "f.csv", "folds": 3}},
        "tasks": {"glaucoma": {"dataset": "fundus", "label": "g", "type": "binary", "classes": ["0", "1"]}},
        "models": {"mae": {"init": "pretrained", "method": "mae"}, "scratch": {"init": "random"}},
        "vit": {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8},
        "pretrain": {"methods": ["mae"], "pools": {"cfp": ["fundus"]}}, "fractions": [1.0], "seeds": [0]})
    layout = Layout(tmp_path / "results")
    metrics, compares = [], []
    for fold, (mae, scratch, p) in enumerate(((0.80, 0.70, 0.01), (0.85, 0.70, 0.02), (0.90, 0.75, 0.03))):
        for model, v in (("mae", mae), ("scratch", scratch)):
            run = tmp_path / layout.run_dir("finetune", "glaucoma", model, 1.0, 0, fold)
            run.mkdir(parents=True)
            (run / "metrics.json").write_text(json.dumps({
                "task": "glaucoma", "task_type": "binary", "protocol": "finetune", "model": model, "fraction": 1.0,
                "seed": 0, "eval_set": "internal", "n": 20, "primary_metric": "auroc", "lower_is_better": [],
                "metrics": {"auroc": {"value": v, "ci_low": v - 0.05, "ci_high": v + 0.05}}}))
            metrics.append(str(run / "metrics.json"))
        pair = {"a": "mae", "b": "scratch", "method": "delong", "difference": mae - scratch, "ci_low": 0.0,
                "ci_high": 0.3, "p_value": p, "n": 20}
        path = tmp_path / layout.compare_json("glaucoma", "finetune", 1.0, 0, fold)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"task": "glaucoma", "protocol": "finetune", "fraction": 1.0, "seed": 0,
                                    "fold": fold, "metric": "auroc", "models": ["mae", "scratch"], "best": "mae",
                                    "pairs": [pair], "best_vs_rest": [pair]}))
        compares.append(str(path))
    inputs = ReportInputs.of(layout.root, metrics=metrics, compare=compares)
    report = rmodel.build(collect_results(inputs), collect_compare(inputs), report_settings.report(config))
    h = report.headlines[0]
    assert h.unit == "fold" and h.smallest.verdict == rmodel.HELPS  # every fold's paired test p < 0.05
    assert [d.seed for d in h.smallest.seeds] == [0, 1, 2] and [d.p for d in h.smallest.seeds] == [0.01, 0.02, 0.03]
    assert h.smallest.difference.value == pytest.approx(0.1333333) and h.smallest.pretrained.value == pytest.approx(0.85)
    assert estimate_text(h.smallest.pretrained, unit=h.unit).endswith("(mean ± 95% t interval, 3 folds)")

    # outside the headline too the fold is the unit: the summary tables count folds and take the interval
    # across them, and the p-values are listed per fold
    from retflow.report import html
    from retflow.report.model import summarise

    info = report.infos["glaucoma"]
    s = summarise(info.internal, ["auroc"], ["protocol", "fraction", "model"]).set_index("model")
    assert (s.loc["mae", "n_seeds"], s.loc["mae", "unit"], s.loc["mae", "auroc_ci"]) == (3, "fold", "seeds")
    assert s.loc["mae", "auroc"] == pytest.approx(0.85)
    assert s.loc["mae", "auroc_half"] == pytest.approx(4.302653 * 0.05 / math.sqrt(3), abs=1e-5)
    results = html._results_table(info, report.significance)
    assert results.header[3] == "folds"
    mae_row = next(r for r in results.rows if r[2].text == "mae")
    assert mae_row[3].text == "3"
    text, tip = html.sig_cell(report.significance, "glaucoma", "finetune", 1.0, "scratch")
    assert text == "0.010*, 0.020*, 0.030*" and tip.startswith("fold 0: mae - scratch = ")
    runs = html._runs_table(info, report.runs["glaucoma"])
    assert runs.header[3:5] == ("fold", "seed") and [r[3].text for r in runs.rows][:3] == ["0", "1", "2"]
