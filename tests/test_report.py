"""HTML report, pairwise comparisons, saliency maps and report targets on synthetic results trees."""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from scipy import stats
from sklearn.metrics import average_precision_score, precision_recall_curve

from retflow.evaluate import evaluate
from retflow.evaluate.compare import delong_test
from retflow.layout import Layout
from retflow.report import figures, pairwise, saliency, targets
from retflow.report.cli import main
from retflow.report import model as rmodel
from retflow.report.collect import (
    ReportInputs,
    collect_benchmarks,
    collect_compare,
    collect_pretrain,
    collect_quarantine,
    collect_results,
    cost_frame,
    job_step,
)
from retflow.report.html import build_report, mapped_internal
from retflow.report.model import summarise
from retflow.report.view import summary_text
from retflow.settings import ConfigError, validate
from retflow.settings import report as report_settings

TASKS = {
    "dr_grading": {
        "dataset": "cfp_clinic",
        "label": "dr_grade",
        "type": "ordinal",
        "classes": ["0", "1", "2", "3", "4"],
        "external": [{"dataset": "cfp_device_b", "classes": ["non_referable", "referable"],
                      "map": {"0": "non_referable", "1": "non_referable", "2": "referable", "3": "referable",
                              "4": "referable"}}],
    },
    "glaucoma": {
        "dataset": "cfp_clinic",
        "label": "glaucoma",
        "type": "binary",
        "classes": ["0", "1"],
        "external": ["cfp_device_b"],
        "protocols": ["finetune", "probe_lars"],
        "seeds": [0],
    },
    "oct_diagnosis": {
        "dataset": "oct_clinic",
        "label": "diagnosis",
        "type": "multiclass",
        "classes": ["normal", "drusen", "dme", "cnv"],
        "external": [],
    },
    "oct_signs": {"dataset": "oct_clinic", "label": ["drusen", "irf", "srf"], "type": "multilabel",
                  "fractions": [1.0]},
    "cdr": {"dataset": "cfp_clinic", "label": "cdr", "type": "regression", "fractions": [1.0]},
    "vessels": {"dataset": "cfp_clinic", "label": "vessel_mask", "type": "segmentation", "classes": ["bg", "vessel"],
                "fractions": [1.0]},
}
MODELS = {"mae": {"init": "pretrained", "method": "mae"}, "scratch": {"init": "random"}}
FRACTIONS = [0.1, 1.0]
CONFIG = validate({
    "results": "results",
    "datasets": {
        "cfp_clinic": {"modality": "cfp", "role": "labelled", "source": "phantom",
                       "phantom": {"kind": "cfp", "n": 500, "seed": 12}},
        "oct_clinic": {"modality": "oct", "role": "labelled", "source": "csv", "path": "data/<oct>.csv"},
        "cfp_device_b": {"modality": "cfp", "role": "external", "source": "phantom",
                         "phantom": {"kind": "cfp", "n": 240, "seed": 13, "style": "B"}},
    },
    "tasks": TASKS,
    "models": MODELS,
    "vit": {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8},
    "pretrain": {"methods": ["mae"], "epochs": 3, "mask_ratio": {"cfp": 0.75}, "pools": {"cfp": ["cfp_clinic"]}},
    "finetune": {"epochs": 2, "blr": 1e-3},
    "fractions": FRACTIONS,
    "seeds": [0, 1],
    "protocols": ["finetune"],
    "evaluate": {"n_boot": 100, "seed": 0},
    "resources": {"pretrain": {"gpu": 2}, "finetune": {"gpu": 1}},
})
SETTINGS = report_settings.report(CONFIG)
TINY_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360f8cfc0f01f0005000201e2a7d0e90000000049454e44ae426082"
)


def fanout(task):
    cfg = TASKS[task]
    return (cfg.get("protocols") or CONFIG["protocols"], cfg.get("fractions") or FRACTIONS,
            cfg.get("seeds") or CONFIG["seeds"])


def _write(df, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(path, index=False)


def _predictions(path: Path, task_type: str, k: int, rng, signal: float, n: int = 90) -> None:
    ids = [f"i{j}" for j in range(n)]
    y_rng = np.random.default_rng(123)  # same labels for every model of a task: paired comparisons
    if task_type == "regression":
        y = y_rng.normal(size=n)
        _write(pd.DataFrame({"image_id": ids, "y_true": y, "y_pred": y * signal + rng.normal(size=n)}), path)
        return
    if task_type == "multilabel":
        y = y_rng.integers(0, 2, (n, k))
        p = 1 / (1 + np.exp(-(signal * (2 * y - 1) + rng.normal(size=(n, k)))))
        df = pd.DataFrame({"image_id": ids})
        for c in range(k):
            df[f"y_true_{c}"] = y[:, c]
        for c in range(k):
            df[f"prob_{c}"] = p[:, c]
        _write(df, path)
        return
    y = y_rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += signal
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    df = pd.DataFrame({"image_id": ids, "y_true": y})
    for c in range(k):
        df[f"prob_{c}"] = p[:, c]
    df["y_pred"] = p.argmax(1)
    _write(df, path)


def _segmentation_metrics(path: Path, model: str, seed: int) -> None:
    dice = 0.7 + (0.1 if model == "mae" else 0) + 0.01 * seed
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "task": "vessels", "task_type": "segmentation", "protocol": "finetune", "model": model, "fraction": 1.0,
        "seed": seed, "eval_set": "internal", "n": 30, "primary_metric": "dice",
        "metrics": {"dice": {"value": dice, "ci_low": dice - 0.05, "ci_high": dice + 0.05},
                    "iou": {"value": dice - 0.15, "ci_low": None, "ci_high": None}},
    }))


def build_fake_tree(root: Path) -> tuple[Path, Path]:
    """A results/ and benchmarks/ tree like the workflow's, with random predictions, evaluated and
    compared by the library's job functions with the settings the rules would pass."""
    results, bench = root / "results", root / "benchmarks"
    layout = Layout(results)
    rng = np.random.default_rng(0)
    for task, cfg in TASKS.items():
        classes = cfg.get("classes") or (cfg["label"] if isinstance(cfg["label"], list) else [])
        k = len(classes)
        protocols, fractions, seeds = fanout(task)
        for protocol in protocols:
            for model in MODELS:
                for frac in fractions:
                    for seed in seeds:
                        run = Path(layout.run_dir(protocol, task, model, frac, seed))
                        if cfg["type"] == "segmentation":
                            _segmentation_metrics(run / "metrics.json", model, seed)
                            continue
                        sets = [("internal", run, cfg["type"], classes)]
                        for e in cfg.get("external", []):
                            if isinstance(e, dict):  # evaluated in its own label scheme
                                sets.append((e["dataset"], Path(layout.external_dir(run, e["dataset"])), "binary",
                                             e["classes"]))
                            else:
                                sets.append((e, Path(layout.external_dir(run, e)), cfg["type"], classes))
                        for eval_set, folder, ttype, cls in sets:
                            signal = 0.5 + frac + (0.8 if model == "mae" else 0)
                            signal -= 0.3 if eval_set != "internal" else 0
                            _predictions(folder / "predictions.parquet", ttype, len(cls), rng, signal)
                            job = report_settings.evaluation(CONFIG, protocol, task, model, frac, seed, eval_set)
                            assert (job.task_type, job.classes) == (ttype, tuple(cls) if ttype != "regression" else ())
                            evaluate.run(job, folder / "predictions.parquet", folder / "metrics.json")
    compare_n_boot = dict(CONFIG["evaluate"], n_boot=200)
    for task, protocol, frac, seed, _fold in targets.compare_groups(CONFIG):  # no folds: fold None
        job = report_settings.compare(CONFIG, task, protocol, frac, seed)
        job = job.replace(evaluate=job.evaluate.replace(**compare_n_boot))
        preds = [f"{layout.run_dir(protocol, task, m, frac, seed)}/predictions.parquet" for m in job.models]
        assert pairwise.main(["--settings", job.to_json(), "--predictions", *preds,
                              "--out", layout.compare_json(task, protocol, frac, seed)]) == 0
    Path(layout.saliency_png("glaucoma")).parent.mkdir(parents=True)
    Path(layout.saliency_png("glaucoma")).write_bytes(TINY_PNG)
    Path(layout.saliency_json("glaucoma")).write_text(json.dumps(
        {"run": report_settings.saliency(CONFIG, "glaucoma").description(), "images": []}))
    pre = Path(layout.pretrain_dir("mae", "cfp"))
    pre.mkdir(parents=True)
    (pre / "figure.png").write_bytes(TINY_PNG)
    pd.DataFrame({"epoch": range(5), "loss": [1.0, 0.8, 0.6, 0.5, 0.45], "lr": 1e-4, "seconds": 2.0}).to_csv(
        pre / "log.csv", index=False
    )
    Path(layout.store("cfp_clinic")).mkdir(parents=True)
    pd.DataFrame({"source": ["a.png", "b.png", "c.png"], "reason": ["unreadable", "unreadable", "too_small"]}).to_csv(
        layout.quarantine("cfp_clinic"), index=False
    )
    Path(layout.store("oct_clinic")).mkdir()
    Path(layout.quarantine("oct_clinic")).write_text("source,reason\n")
    for dataset in ("cfp_clinic", "oct_clinic"):  # the data stage writes both (the report declares qc.json)
        Path(layout.qc(dataset)).write_text(json.dumps({"dataset": dataset, "n_images": 10}))
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    run_bench = bench / "finetune" / "dr_grading" / "mae" / "frac0.1" / "seed0"
    run_bench.mkdir(parents=True)
    (run_bench / "train.tsv").write_text(header + "12.5\t0:00:12\t812.3\t900\t700\t750\t1\t2\t95\t11.9\n")
    (run_bench / "evaluate.tsv").write_text(header + "3.6\t0:00:03\t100\t900\t700\t750\t1\t2\t95\t3.6\n")
    (bench / "pretrain").mkdir()
    (bench / "pretrain" / "mae_cfp.tsv").write_text(header + "100.0\t0:01:40\t-\t-\t-\t-\t-\t-\t-\t-\n")
    (bench / "compare" / "glaucoma" / "finetune" / "frac1").mkdir(parents=True)
    (bench / "compare" / "glaucoma" / "finetune" / "frac1" / "seed0.tsv").write_text(
        header + "2.0\t0:00:02\t50\t-\t-\t-\t-\t-\t-\t1.8\n")
    return results, bench


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return build_fake_tree(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def html(tree, tmp_path_factory):
    results, bench = tree
    out = build_report(results, bench, SETTINGS, tmp_path_factory.mktemp("html") / "report.html")
    return out.read_text()


def section(text: str, task: str) -> str:
    start = text.index(f'<h2 id="task-{task}">')
    end = text.find("<h2 ", start + 5)
    return text[start:end]


# ---------------------------------------------------------------- collectors
def test_collectors(tree):
    results, bench = tree
    df = collect_results(results)
    assert set(df["protocol"]) == {"finetune", "probe_lars"}  # any protocol folder is found
    internal = df[df["eval_set"] == "internal"]
    assert len(internal[internal["task"] == "glaucoma"]) == 2 * 2 * 2  # 2 protocols x 2 models x 2 fractions
    assert {"auroc", "auroc_lo", "auroc_hi", "qwk", "dice", "mae", "eval_set", "path", "predictions"} <= set(df.columns)
    assert set(df["eval_set"]) == {"internal", "cfp_device_b"}
    seg = df[df["task"] == "vessels"]
    assert seg["predictions"].isna().all() and np.isnan(seg["iou_lo"]).all()
    b = collect_benchmarks(bench).set_index("job")
    assert b.loc["finetune/dr_grading/mae/frac0.1/seed0/train", "max_rss_mb"] == pytest.approx(812.3)
    assert np.isnan(b.loc["pretrain/mae_cfp", "max_rss_mb"]) and b.loc["pretrain/mae_cfp", "s"] == 100
    pre = collect_pretrain(results)
    assert pre.iloc[0][["method", "modality", "epochs"]].tolist() == ["mae", "cfp", 5]
    q = collect_quarantine(results)
    assert q.to_dict("records") == [
        {"dataset": "cfp_clinic", "reason": "unreadable", "count": 2},
        {"dataset": "cfp_clinic", "reason": "too_small", "count": 1},
    ]
    assert collect_results(results / "nowhere").empty and collect_quarantine(results / "nowhere").empty
    compares = collect_compare(results)
    assert {c["task"] for c in compares} == {"dr_grading", "glaucoma", "oct_diagnosis", "oct_signs", "cdr"}


def test_cost_frame_gpu_hours_from_config(tree):
    _, bench = tree
    assert SETTINGS.gpus == {"pretrain": 2.0, "finetune": 1.0}  # resources.<kind>.gpu x nodes
    cost = cost_frame(bench, SETTINGS.gpus).set_index("job")
    assert cost.loc["pretrain/mae_cfp", "gpu_h"] == pytest.approx(100 * 2 / 3600)
    assert cost.loc["finetune/dr_grading/mae/frac0.1/seed0/train", "gpu_h"] == pytest.approx(12.5 / 3600)
    assert cost.loc["finetune/dr_grading/mae/frac0.1/seed0/evaluate", "gpu_h"] == 0
    assert cost.loc["finetune/dr_grading/mae/frac0.1/seed0/train", "cpu_h"] == pytest.approx(11.9 / 3600)
    assert cost.loc["finetune/dr_grading/mae/frac0.1/seed0/train", "model"] == "mae"
    assert job_step("compare/glaucoma/finetune/frac1/seed0") == "compare"
    assert job_step("probe_lars/glaucoma/mae/frac1/seed0/predict_cfp_device_b") == "probe_lars predict"
    assert cost_frame(bench / "nowhere", SETTINGS.gpus).empty


# ---------------------------------------------------------------- statistics
def test_seed_summary_t_interval_from_three_seeds_per_seed_values_below():
    """The seed/CI rule: 1 seed -> its bootstrap CI; 2 seeds -> every seed's value and bootstrap CI, never
    a t interval (t_1 = 12.7); 3+ seeds -> mean +- t interval."""
    df = pd.DataFrame({"model": ["a", "a", "b", "c", "c", "c"], "seed": [1, 0, 0, 0, 1, 2],
                       "auroc": [0.8, 0.9, 0.7, 0.5, 0.6, 0.7], "auroc_lo": [0.7, 0.8, 0.6, 0.4, 0.5, 0.6],
                       "auroc_hi": [0.9, 0.95, 0.75, 0.6, 0.7, 0.8], "n": 100})
    s = figures.seed_summary(df, "auroc", ["model"]).set_index("model")
    assert s.loc["a", "value"] == pytest.approx(0.85) and s.loc["a", "ci"] == "per_seed"
    assert np.isnan(s.loc["a", "half"])  # no t interval from two seeds
    assert s.loc["a", "per_seed"] == ((0, 0.9, 0.8, 0.95), (1, 0.8, 0.7, 0.9))  # seed order, bootstrap CIs
    assert (s.loc["a", "lo"], s.loc["a", "hi"]) == (0.7, 0.95)  # the span of the runs' bootstrap CIs
    assert s.loc["b", "ci"] == "bootstrap" and (s.loc["b", "lo"], s.loc["b", "hi"]) == (0.6, 0.75)
    half = stats.t.ppf(0.975, 2) * np.std([0.5, 0.6, 0.7], ddof=1) / np.sqrt(3)
    assert s.loc["c", "ci"] == "seeds" and s.loc["c", "half"] == pytest.approx(half)
    assert s.loc["c", "lo"] == pytest.approx(0.6 - half) and s.loc["c", "hi"] == pytest.approx(0.6 + half)
    two = summarise(df[df["model"] == "a"], ["auroc"], ["model"]).iloc[0]
    assert summary_text(two, "auroc") == "0.900 [0.800, 0.950] · 0.800 [0.700, 0.900]"
    three = summarise(df[df["model"] == "c"], ["auroc"], ["model"]).iloc[0]
    assert summary_text(three, "auroc") == f"0.600 ± {half:.3f}"


def test_pairwise_best_vs_rest(tmp_path):
    rng = np.random.default_rng(1)
    paths = {}
    for model, signal in (("weak", 0.2), ("strong", 2.5), ("mid", 1.0)):
        paths[model] = tmp_path / f"{model}.parquet"
        _predictions(paths[model], "binary", 2, rng, signal, n=200)
    res = pairwise.compare_models(paths, "binary", ["0", "1"], None, n_boot=200, seed=0)
    assert res["method"] == "delong" and res["best"] == "strong" and len(res["pairs"]) == 3
    assert [p["b"] for p in res["best_vs_rest"]] == ["weak", "mid"]
    vs_weak = res["best_vs_rest"][0]
    assert vs_weak["a"] == "strong" and vs_weak["difference"] > 0 and vs_weak["ci_low"] < vs_weak["ci_high"]
    y = pd.read_parquet(paths["weak"])["y_true"].to_numpy()
    ref = delong_test(y, pd.read_parquet(paths["strong"])["prob_1"], pd.read_parquet(paths["weak"])["prob_1"])
    assert vs_weak["p_value"] == pytest.approx(ref["p_value"]) and vs_weak["p_value"] < 0.05
    assert vs_weak["difference"] == pytest.approx(ref["difference"])
    # a lower-is-better metric picks the smallest value
    ece = pairwise.compare_models(paths, "binary", ["0", "1"], "ece", n_boot=50, seed=0)
    assert ece["lower_is_better"] and ece["method"] == "paired_bootstrap"
    assert ece["values"][ece["best"]] == min(ece["values"].values())
    assert pairwise.pick_best({"a": None, "b": float("nan")}, False) is None


def test_macro_pr_matches_sklearn(tmp_path):
    rng = np.random.default_rng(2)
    _predictions(tmp_path / "b.parquet", "binary", 2, rng, 1.0, n=150)
    y, p = figures.read_curve_inputs(tmp_path / "b.parquet", "binary", 2)
    recall, precision, prev = figures.macro_pr(y, p, "binary")
    ref_p, ref_r, _ = precision_recall_curve(y, p[:, 1])
    assert np.allclose(recall, ref_r) and np.allclose(precision, ref_p) and prev == pytest.approx(y.mean())
    assert -np.sum(np.diff(recall) * precision[:-1]) == pytest.approx(average_precision_score(y, p[:, 1]))
    _predictions(tmp_path / "m.parquet", "multiclass", 4, rng, 1.0, n=150)
    y, p = figures.read_curve_inputs(tmp_path / "m.parquet", "multiclass", 4)
    r, prec, _ = figures.macro_pr(y, p, "multiclass")
    assert r.shape == prec.shape and np.all(np.diff(prec) <= 1e-12)  # interpolated: non-increasing
    mean_ap = np.mean([average_precision_score(y == c, p[:, c]) for c in range(4)])
    assert 0.2 < prec.min() < 0.9 and np.trapezoid(prec, r) == pytest.approx(mean_ap, abs=0.05)
    assert figures.read_curve_inputs(tmp_path / "missing.parquet", "binary", 2) is None


def test_mapped_internal_sums_merged_class_probabilities(tmp_path):
    path = tmp_path / "p.parquet"
    probs = np.array([[0.5, 0.3, 0.1, 0.05, 0.05], [0.1, 0.1, 0.2, 0.3, 0.3], [0.2, 0.2, 0.2, 0.2, 0.2]])
    df = pd.DataFrame({"image_id": ["a", "b", "c"], "y_true": [0, 4, 1]})
    for c in range(5):
        df[f"prob_{c}"] = probs[:, c]
    df.to_parquet(path)
    rows = pd.DataFrame([{"protocol": "finetune", "model": "m", "fraction": 1.0, "seed": 0, "task_type": "ordinal",
                          "classes": ("0", "1", "2", "3", "4"), "predictions": str(path)}])
    mapping = TASKS["dr_grading"]["external"][0]
    out = mapped_internal(rows, {"classes": mapping["classes"], "map": mapping["map"]}, "binary", "accuracy")
    # referable probabilities 0.2, 0.8, 0.6 -> predictions 0, 1, 1; truth 0, 1, 0
    assert out.loc[0, "accuracy"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------- targets
def test_compare_and_saliency_targets():
    groups = targets.compare_groups(CONFIG)
    assert ("glaucoma", "probe_lars", "0.1", 0, None) in groups and ("dr_grading", "finetune", "1", 1, None) in groups
    assert not any(k[0] == "vessels" for k in groups)  # segmentation is skipped
    assert all(v == ["mae", "scratch"] for v in groups.values())
    one_model = dict(CONFIG, models={"mae": MODELS["mae"]})
    assert targets.compare_groups(one_model) == {}
    layout = Layout("out")

    class W:
        task, protocol, frac, seed, fold = "glaucoma", "finetune", "1", "0", ""

    assert targets.compare_inputs(CONFIG, layout, W) == [
        "out/finetune/glaucoma/mae/frac1/seed0/predictions.parquet",
        "out/finetune/glaucoma/scratch/frac1/seed0/predictions.parquet",
    ]
    models = {"scratch": CONFIG["models"]["scratch"], "mae": CONFIG["models"]["mae"]}
    run = targets.saliency_run(dict(CONFIG, models=models), "glaucoma")
    assert (run.protocol, run.model, run.fraction, run.seed) == ("finetune", "mae", 1.0, 0)
    assert targets.saliency_tasks(CONFIG) == ["dr_grading", "glaucoma", "oct_diagnosis"]
    assert targets.saliency_inputs(CONFIG, layout, W) == {"best": "out/finetune/glaucoma/mae/frac1/seed0/best.pth",
                                                          "store": "out/data/cfp_clinic/manifest.parquet"}
    assert targets.compare_outputs(CONFIG, layout)[0] == "out/compare/dr_grading/finetune/frac0.1/seed0.json"
    assert targets.saliency_outputs(CONFIG, layout) == [f"out/saliency/{t}.png" for t in
                                                        ("dr_grading", "glaucoma", "oct_diagnosis")]
    job = report_settings.compare(CONFIG, "oct_signs", "finetune", "1", "0")
    assert (job.task_type, job.classes, job.models) == ("multilabel", ("drusen", "irf", "srf"), ("mae", "scratch"))
    assert (job.fraction, job.seed, job.evaluate.n_boot) == (1.0, 0, 100)
    assert report_settings.compare(CONFIG, "cdr", "finetune", 1.0, 1).classes == ()  # regression
    sal = report_settings.saliency(CONFIG, "glaucoma")
    assert (sal.dataset, sal.label, sal.model, sal.fraction, sal.device) == (
        "cfp_clinic", "glaucoma", "mae", 1.0, "auto")


# ---------------------------------------------------------------- one Layout, settings recorded
def test_layout_paths_round_trip(tmp_path):
    layout = Layout(tmp_path / "res")
    run = layout.run_dir("probe_lars", "glaucoma", "mae", 0.1, 3)
    assert run == f"{tmp_path}/res/probe_lars/glaucoma/mae/frac0.1/seed3"
    where = {"protocol": "probe_lars", "task": "glaucoma", "model": "mae", "fraction": "0.1", "seed": "3", "fold": None}
    assert layout.parse_run_file(f"{run}/metrics.json") == {**where, "eval_set": "internal"}
    assert layout.parse_run_file(f"{layout.external_dir(run, 'cfp_device_b')}/metrics.json") == {
        **where, "eval_set": "cfp_device_b"}
    assert layout.parse_compare_file(layout.compare_json("glaucoma", "finetune", 1.0, 0)) == {
        "task": "glaucoma", "protocol": "finetune", "fraction": "1", "seed": "0", "fold": None}
    for outside in (layout.qc("cfp_clinic"), f"{layout.pretrain_dir('mae', 'cfp')}/a/frac1/seed0/log.csv",
                    tmp_path / "elsewhere/finetune/t/m/frac1/seed0/metrics.json", layout.saliency_json("t")):
        assert layout.parse_run_file(outside) is None, outside
    assert layout.parse_compare_file(layout.saliency_json("t")) is None
    assert layout.report_settings() == f"{tmp_path}/res/report.settings.json"


def test_every_job_records_its_settings(tree):
    results, _ = tree
    layout = Layout(results)
    run = layout.run_dir("finetune", "dr_grading", "mae", 0.1, 1)
    internal = json.loads(Path(run, "metrics.json").read_text())
    assert internal["settings"] == report_settings.evaluation(CONFIG, "finetune", "dr_grading", "mae", 0.1, 1).to_dict()
    assert internal["n_boot"] == 100 and internal["classes"] == ["0", "1", "2", "3", "4"]
    external = json.loads(Path(layout.external_dir(run, "cfp_device_b"), "metrics.json").read_text())
    assert external["settings"]["task_type"] == "binary" == external["task_type"]
    assert external["settings"]["classes"] == ["non_referable", "referable"] == external["classes"]
    compare = json.loads(Path(layout.compare_json("glaucoma", "probe_lars", 0.1, 0)).read_text())
    assert compare["settings"]["models"] == ["mae", "scratch"] == compare["models"]
    assert (compare["n_boot"], compare["boot_seed"], compare["fraction"], compare["seed"]) == (200, 0, 0.1, 0)
    assert report_settings.CompareSettings.from_dict(compare["settings"]).task == "glaucoma"


def test_job_settings_problems_are_one_line(tmp_path):
    job = report_settings.compare(CONFIG, "glaucoma", "finetune", 1.0, 0)
    out = str(tmp_path / "c.json")
    with pytest.raises(ConfigError, match=r"^--settings \(CompareSettings\): not JSON"):
        pairwise.main(["--settings", "nope", "--predictions", "a", "b", "--out", out])
    bad = {**job.to_dict(), "n_boot": 5}
    with pytest.raises(ConfigError, match=r"^--settings \(CompareSettings\): unknown keys \['n_boot'\] \(settings"):
        pairwise.main(["--settings", json.dumps(bad), "--predictions", "a", "b", "--out", out])
    with pytest.raises(SystemExit, match=r"^1 predictions files for the 2 models \['mae', 'scratch'\] of compare "
                                         r"glaucoma/finetune$"):
        pairwise.main(["--settings", job.to_json(), "--predictions", "a", "--out", out])
    with pytest.raises(ConfigError, match=r"^compare vessels/finetune/frac1/seed0: not a comparison of this config"):
        report_settings.compare(CONFIG, "vessels", "finetune", 1.0, 0)
    ev = report_settings.evaluation(CONFIG, "finetune", "glaucoma", "mae", 1.0, 0).to_dict()
    del ev["evaluate"]
    with pytest.raises(ConfigError, match=r"^--settings \(EvaluationSettings\): missing keys \['evaluate'\]"):
        evaluate.main(["--settings", json.dumps(ev), "--predictions", "p.parquet", "--out", out])


# ---------------------------------------------------------------- HTML
def test_build_report(html):
    for name in [*TASKS, *MODELS, "cfp_device_b", "unreadable", "too_small", "probe_lars"]:
        assert name in html, name
    assert html.count("data:image/png;base64,") >= 15
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert "<script" not in html.lower()
    assert "data/&lt;oct&gt;.csv" in html  # config text is escaped
    assert "±" not in section(html, "dr_grading")  # two seeds: no t interval ...
    assert re.search(r"0\.\d{3} \[0\.\d{3}, 0\.\d{3}\] · 0\.\d{3} \[0\.\d{3}, 0\.\d{3}\]", html)  # ... per seed
    assert re.search(r"0\.\d{3} \[0\.\d{3}, 0\.\d{3}\]", html)  # one seed: bootstrap CI
    assert "112.5" not in html and "118.1" in html  # timings total (12.5 + 3.6 + 100 + 2)
    assert "finetune train" in html and "GPU-hours" in html and "0.0556" in html  # 100 s x 2 GPUs
    assert 'id="summary"' in html and "p vs best" in html
    assert "100 times, seed 0: <code>evaluate</code> in the config" in html  # the bootstrap, from the settings
    assert "<h3>probe_lars settings</h3>" in html and "<h3>probe_adamw settings</h3>" not in html  # protocols run


def test_task_sections(html):
    glaucoma = section(html, "glaucoma")
    assert ">best<" in glaucoma and re.search(r">(<0\.001|0\.\d{3})\*?<", glaucoma)
    assert "Saliency maps" in glaucoma and "Precision-recall" not in glaucoma  # PR is inside the figure
    assert "ROC and precision-recall curves" in glaucoma and "Calibration" in glaucoma
    assert "External validation" in glaucoma and "relative drop" in glaucoma
    dr = section(html, "dr_grading")
    assert "labels mapped to non_referable / referable" in dr and "Label efficiency" in dr
    assert "RETFound metric definitions" in dr
    seg = section(html, "vessels")
    assert "dice" in seg and "iou" in seg and "Calibration" not in seg and "p vs best" not in seg
    cdr = section(html, "cdr")  # the metric mae is "abs. error", the model stays "mae"
    assert "abs. error ↓" in cdr and "mae ↓" not in cdr and ">mae<" in cdr
    assert "Confusion matrices" in section(html, "oct_signs")


def test_report_robust_to_empty_inputs(tmp_path):
    out = build_report(tmp_path / "results", tmp_path / "benchmarks", SETTINGS, tmp_path / "r.html")
    text = out.read_text()
    assert "retflow report" in text and "none" in text and "No results for this task yet" in text


def test_cli_builds_the_report_from_a_config_file_without_snakemake(tree, tmp_path):
    """A config file -> validated config -> ReportSettings -> the report: the library alone."""
    results, bench = tree
    raw = {k: CONFIG[k] for k in ("datasets", "models", "vit", "pretrain", "fractions", "seeds", "evaluate")}
    raw["tasks"] = {"dr_grading": TASKS["dr_grading"]}
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    out, recorded = tmp_path / "cli.html", tmp_path / "report.settings.json"
    assert main(["--config", str(cfg), "--results", str(results), "--benchmarks", str(bench), "--out", str(out),
                 "--settings-out", str(recorded)]) == 0
    text = out.read_text()
    assert "dr_grading" in text and "oct_diagnosis" in text  # tasks found in results but not in config
    settings = report_settings.ReportSettings.from_json(recorded.read_text())
    assert settings == report_settings.report(validate(raw)) and [t.name for t in settings.tasks] == ["dr_grading"]
    # the workflow's way: the same settings as JSON (on an empty results folder: quick)
    again = tmp_path / "again.html"
    assert main(["--settings", settings.to_json(), "--results", str(tmp_path / "empty"), "--benchmarks",
                 str(bench), "--out", str(again), "--settings-out", str(tmp_path / "s.json")]) == 0
    assert "Task: dr_grading" in again.read_text()
    assert report_settings.ReportSettings.from_json((tmp_path / "s.json").read_text()) == settings


def test_cli_bad_settings_and_config_are_one_line(tree, tmp_path):
    results, bench = tree
    base = ["--results", str(results), "--benchmarks", str(bench), "--out", str(tmp_path / "r.html"),
            "--settings-out", str(tmp_path / "s.json")]
    with pytest.raises(ConfigError, match=r"^--settings \(ReportSettings\): not JSON \(Expecting"):
        main(["--settings", "{tasks", *base])
    bad = SETTINGS.to_dict()
    del bad["gpus"]
    with pytest.raises(ConfigError, match=r"^--settings \(ReportSettings\): missing keys \['gpus'\] \(settings are built "
                                         r"from the validated config"):
        main(["--settings", json.dumps(bad), *base])
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({k: CONFIG[k] for k in ("datasets", "tasks", "models", "vit")}))
    with pytest.raises(ConfigError, match=r"bad.yaml: pretrain: required key is missing"):
        main(["--config", str(cfg), *base])
    assert not (tmp_path / "r.html").exists()


def test_figures_are_pngs(tree):
    results, _ = tree
    df = collect_results(results)
    png = figures.label_efficiency_figure(df, "dr_grading", "qwk")
    assert png.startswith(b"\x89PNG")
    assert figures.confusion_figure([[3, 1], [0, 4]], ["no", "yes"], "t").startswith(b"\x89PNG")
    assert figures.pretrain_loss_figure([results / "pretrain/mae/cfp/log.csv"]).startswith(b"\x89PNG")
    assert figures.multilabel_confusion_figure({"a": [[3, 1], [0, 4]]}, "t").startswith(b"\x89PNG")


# ---------------------------------------------------------------- saliency
def _tiny_vit(global_pool="avg", num_classes=3):
    from retflow.models.vit import ViTSpec, create_vit

    spec = ViTSpec("vit_tiny_patch16_224", img_size=32, patch_size=8,
                   model_kwargs={"embed_dim": 48, "depth": 3, "num_heads": 3})
    torch.manual_seed(0)
    return create_vit(spec, num_classes=num_classes, global_pool=global_pool).eval(), spec


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_attention_rollout_and_grad_cam(pool):
    model, _ = _tiny_vit(pool)
    x = torch.randn(2, 3, 32, 32)
    fused = [blk.attn.fused_attn for blk in model.blocks]
    roll, logits = saliency.attention_rollout(model, x)
    assert roll.shape == (2, 4, 4) and logits.shape == (2, 3)
    assert torch.allclose(logits, model(x), atol=1e-5)  # hooks do not change the model's output
    assert [blk.attn.fused_attn for blk in model.blocks] == fused  # restored
    assert (roll > 0).all()
    cam = saliency.grad_cam(model, x)
    assert cam.shape == (2, 4, 4) and (cam >= 0).all()
    assert all(p.grad is None for p in model.parameters())


def test_rollout_of_identity_attention_is_uniform_and_reads_the_class_token():
    n, prefix = 5, 1
    eye = torch.eye(n).expand(1, 2, n, n)
    rel = saliency.rollout_from_attentions([eye, eye], prefix, "avg")
    assert torch.allclose(rel, torch.full((1, n - 1), 1 / (n - 1)))
    attn = torch.zeros(1, 1, n, n)
    attn[0, 0, :, 3] = 1.0  # every token attends to token 3
    rel = saliency.rollout_from_attentions([attn], prefix, "token")
    assert rel.argmax().item() == 2  # patch token 3 (index 2 after the class token)


def test_saliency_grid_from_store_and_checkpoint(tmp_path):
    from retflow.data.store import write_images

    model, spec = _tiny_vit("avg", 3)
    ckpt = tmp_path / "best.pth"
    torch.save({"model": model.state_dict(), "spec": spec.to_dict(), "classes": ["a", "b", "c"], "normalize": None,
                "probe_head": False}, ckpt)
    rng = np.random.default_rng(0)
    store = tmp_path / "store"
    write_images(store, [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(12)])
    labels = ["a", "b", "c", "a", "b", None, "a", "b", "a", "b", "c", "c"]
    pd.DataFrame({"image_id": [f"x{i}" for i in range(12)], "index": range(12), "label": labels,
                  "split": ["test"] * 10 + ["train"] * 2}).to_parquet(store / "manifest.parquet")
    out, meta = tmp_path / "s.png", tmp_path / "s.json"
    config = validate({
        "datasets": {"letters": {"modality": "cfp", "role": "labelled", "source": "csv", "path": "letters.csv"}},
        "tasks": {"abc": {"dataset": "letters", "label": "label", "type": "multiclass", "classes": ["a", "b", "c"]}},
        "models": {"scratch": {"init": "random"}}, "vit": {"arch": spec.arch, "img_size": 32, "patch_size": 8},
        "pretrain": {"methods": ["mae"], "pools": {}}, "device": "cpu"})
    job = report_settings.saliency(config, "abc")
    assert saliency.main(["--settings", job.to_json(), "--checkpoint", str(ckpt), "--store", str(store),
                          "--out", str(out), "--meta", str(meta), "--n-per-class", "2"]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")
    info = json.loads(meta.read_text())
    assert [i["true"] for i in info["images"]] == ["a", "a", "b", "b", "c"]  # class c has one test image
    assert "rollout" in info["method"]
    assert info["settings"] == job.to_dict() and info["run"] == "abc: scratch (finetune), label fraction 1, seed 0"
    with pytest.raises(ConfigError, match=r"^tasks.cdr: no saliency maps for a regression task "
                                                          r"\(only binary, multiclass, ordinal\)$"):
        report_settings.saliency(CONFIG, "cdr")


# ---------------------------------------------------------------- workflow wiring
def test_workflow_dry_run_fans_out_compare_and_saliency(tmp_path):
    from conftest import ROOT, job_counts, make_workdir, snakemake

    config = validate(yaml.safe_load((ROOT / "config.yaml").read_text()))
    result = snakemake(make_workdir(tmp_path), "-n", "--cores", "1")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    counts = job_counts(result.stdout)
    assert counts["compare"] == len(targets.compare_groups(config)) > 0
    assert counts["saliency"] == len(targets.saliency_tasks(config)) > 0
    assert counts["report"] == 1


# ---------------------------------------------------------------- the report model (hand-written inputs)
HAND_CONFIG = validate({
    "datasets": {"fundus": {"modality": "cfp", "role": "labelled", "source": "csv", "path": "f.csv"},
                 "ext_b": {"modality": "cfp", "role": "external", "source": "csv", "path": "e.csv"}},
    "tasks": {
        "glaucoma": {"dataset": "fundus", "label": "g", "type": "binary", "classes": ["0", "1"], "external": ["ext_b"],
                     "fractions": [0.1, 0.5, 1.0], "reference": {"auroc": 0.943, "source": "Zhou et al. 2023"}},
        "cdr": {"dataset": "fundus", "label": "cdr", "type": "regression"},
        "oct": {"dataset": "fundus", "label": "d", "type": "binary", "classes": ["0", "1"], "seeds": [0, 1]},
    },
    "models": {"mae": {"init": "pretrained", "method": "mae"}, "scratch": {"init": "random"}},
    "vit": {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8},
    "pretrain": {"methods": ["mae"], "pools": {"cfp": ["fundus"]}},
    "fractions": [1.0], "seeds": [0],
})
HAND_SETTINGS = report_settings.report(HAND_CONFIG)


def _hand_metrics(layout, task, model, frac, seed, value, metric="auroc", eval_set="internal", ci=0.05,
                  summary=None) -> str:
    run = layout.run_dir("finetune", task, model, frac, seed)
    folder = Path(run if eval_set == "internal" else layout.external_dir(run, eval_set))
    folder.mkdir(parents=True, exist_ok=True)
    kind = "regression" if metric == "mae" else "binary"
    (folder / "metrics.json").write_text(json.dumps({
        "task": task, "task_type": kind, "protocol": "finetune", "model": model, "fraction": frac, "seed": seed,
        "eval_set": eval_set, "classes": [] if kind == "regression" else ["0", "1"], "n": 100,
        "primary_metric": metric, "lower_is_better": ["mae"] if kind == "regression" else [],
        "metrics": {metric: {"value": value, "ci_low": value - ci, "ci_high": value + ci}}}))
    if summary is not None:
        Path(run, "train_summary.json").write_text(json.dumps(summary))
    return str(folder / "metrics.json")


def _hand_compare(layout, task, frac, seed, a, b, difference, lo, hi, p, metric="auroc") -> str:
    path = Path(layout.compare_json(task, "finetune", frac, seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    pair = {"a": a, "b": b, "method": "delong", "difference": difference, "ci_low": lo, "ci_high": hi,
            "p_value": p, "n": 100}
    path.write_text(json.dumps({"task": task, "protocol": "finetune", "fraction": frac, "seed": seed,
                                "metric": metric, "models": [a, b], "best": a, "pairs": [pair],
                                "best_vs_rest": [pair]}))
    return str(path)


@pytest.fixture(scope="module")
def hand(tmp_path_factory):
    """Metrics, compare JSONs and train summaries with known values; only the listed files are inputs."""
    results = tmp_path_factory.mktemp("hand") / "results"
    lay = Layout(results)
    metrics = []
    for frac, mae, scratch in ((0.1, 0.70, 0.60), (0.5, 0.85, 0.70), (1.0, 0.90, 0.80)):
        metrics.append(_hand_metrics(lay, "glaucoma", "mae", frac, 0, mae, summary={"best_epoch": 4, "epochs": 8}))
        chance = {"best_epoch": 0, "epochs": 8, "chance_loss": 0.693, "min_train_loss": 0.690} if frac == 1.0 else None
        metrics.append(_hand_metrics(lay, "glaucoma", "scratch", frac, 0, scratch, summary=chance))
    metrics.append(_hand_metrics(lay, "glaucoma", "mae", 1.0, 0, 0.75, eval_set="ext_b"))
    metrics.append(_hand_metrics(lay, "glaucoma", "scratch", 1.0, 0, 0.70, eval_set="ext_b"))
    metrics += [_hand_metrics(lay, "cdr", "mae", 1.0, 0, 0.15, metric="mae", ci=0.01),
                _hand_metrics(lay, "cdr", "scratch", 1.0, 0, 0.10, metric="mae", ci=0.01)]
    for seed, (mae, scratch) in enumerate(((0.80, 0.70), (0.78, 0.75))):
        metrics += [_hand_metrics(lay, "oct", "mae", 1.0, seed, mae, summary={"best_epoch": 3, "epochs": 8,
                                                                          "chance_loss": 0.693,
                                                                          "min_train_loss": 0.2}),
                    _hand_metrics(lay, "oct", "scratch", 1.0, seed, scratch)]
    compare = [
        _hand_compare(lay, "glaucoma", 0.1, 0, "mae", "scratch", 0.10, 0.02, 0.18, 0.01),
        _hand_compare(lay, "glaucoma", 0.5, 0, "mae", "scratch", 0.15, 0.05, 0.25, 0.002),
        _hand_compare(lay, "glaucoma", 1.0, 0, "scratch", "mae", -0.10, -0.20, 0.01, 0.30),  # b - a: flipped
        _hand_compare(lay, "cdr", 1.0, 0, "mae", "scratch", 0.05, 0.03, 0.07, 0.0004, metric="mae"),
        _hand_compare(lay, "oct", 1.0, 0, "mae", "scratch", 0.10, 0.03, 0.17, 0.01),
        _hand_compare(lay, "oct", 1.0, 1, "mae", "scratch", 0.03, -0.04, 0.10, 0.20),
    ]
    # a file in the folder that the rule did not declare is not read
    _hand_metrics(lay, "glaucoma", "scratch", 0.5, 7, 0.99)
    return ReportInputs.of(results, metrics=metrics, compare=compare)


def test_report_reads_exactly_the_declared_inputs(hand):
    df = collect_results(hand)
    assert len(df) == len(hand.metrics) and 7 not in set(df["seed"])
    assert len(collect_results(ReportInputs.found(hand.results))) == len(hand.metrics) + 1  # by hand: the folder
    row = df[(df["task"] == "glaucoma") & (df["model"] == "mae") & (df["fraction"] == 0.1)].iloc[0]
    assert row["best_epoch"] == 4 and np.isnan(row["chance_loss"])
    old = df[(df["task"] == "glaucoma") & (df["model"] == "scratch") & (df["fraction"] == 0.1)].iloc[0]
    assert np.isnan(old["best_epoch"])  # no train_summary.json: written before it existed


def test_headline_numbers_from_known_metrics_and_compare_files(hand):
    report = rmodel.build(collect_results(hand), collect_compare(hand), HAND_SETTINGS)
    h = {x.task: x for x in report.headlines}
    g = h["glaucoma"]
    assert (g.pretrained, g.baseline, g.protocol, g.metric) == ("mae", "scratch", "finetune", "auroc")
    assert g.smallest.fraction == 0.1 and g.smallest.verdict == rmodel.HELPS
    assert g.smallest.difference.value == pytest.approx(0.10) and g.smallest.difference.kind == "bootstrap"
    assert (g.smallest.difference.lo, g.smallest.difference.hi) == pytest.approx((0.02, 0.18))
    assert g.smallest.verdict_text == "pretraining helps (p=0.010)"
    big = g.largest  # the compare file has scratch - mae: restated as mae - scratch
    assert big.fraction == 1.0 and big.difference.value == pytest.approx(0.10)
    assert (big.difference.lo, big.difference.hi) == pytest.approx((-0.01, 0.20))
    assert big.verdict_text == "no difference at this compute (p=0.300)"
    assert g.matching_fraction == 0.5 and g.baseline_full == pytest.approx(0.80)  # 0.85 >= 0.80 at 0.5
    assert [(e.dataset, e.metric) for e in g.external] == [("ext_b", "auroc")]
    assert g.external[0].change == pytest.approx(0.75 - 0.90)  # external minus internal
    assert big.never_left_chance == ("scratch: 1 of 1 runs",)  # 0.690 > 0.693 x (1 - 0.02)
    assert g.smallest.never_left_chance == ()
    ref = g.references[0]
    assert (ref.metric, ref.value, ref.source) == ("auroc", 0.943, "Zhou et al. 2023")
    assert ref.ours.value == pytest.approx(0.90)
    cdr = h["cdr"]  # lower is better: mae - scratch = +0.05 abs. error is worse
    assert cdr.lower_is_better and cdr.largest is None and cdr.matching_fraction is None
    assert cdr.smallest.verdict_text == "scratch better (p<0.001)"
    oct_ = h["oct"].smallest  # two seeds: per-seed differences, verdict needs both
    assert oct_.difference.kind == "per_seed" and [s.seed for s in oct_.seeds] == [0, 1]
    assert oct_.verdict_text == "no difference at this compute (p=0.010, p=0.200)"
    runs = {(r.model, r.fraction): r for r in report.runs["glaucoma"]}
    assert runs[("scratch", 1.0)].chance is True and runs[("scratch", 1.0)].best_epoch == 0
    assert runs[("mae", 0.1)].chance is None and runs[("mae", 0.1)].best_epoch == 4
    assert np.isnan(runs[("scratch", 0.1)].best_epoch)
    assert all(r.chance is False for r in report.runs["oct"] if r.model == "mae")


def test_a_task_without_a_baseline_shows_the_pretrained_models_value_and_external_change(hand):
    df = collect_results(hand)
    alone = df[~((df["task"] == "glaucoma") & (df["model"] == "scratch"))]  # glaucoma: mae only
    h = {x.task: x for x in rmodel.build(alone, collect_compare(hand), HAND_SETTINGS).headlines}["glaucoma"]
    assert h.note == "no baseline (init: random) compared in finetune for this task"
    assert (h.pretrained, h.baseline, h.full_fraction, h.smallest) == ("mae", None, 1.0, None)
    assert h.alone.value == pytest.approx(0.90) and (h.alone.lo, h.alone.hi) == pytest.approx((0.85, 0.95))
    assert h.external[0].change == pytest.approx(0.75 - 0.90) and h.references[0].ours.value == pytest.approx(0.90)


def test_never_left_chance_uses_the_configured_margin():
    assert rmodel.never_left_chance(0.690, 0.693, 0.02) is True
    assert rmodel.never_left_chance(0.690, 0.693, 0.0) is False
    assert rmodel.never_left_chance(float("nan"), 0.693, 0.02) is None
    assert HAND_SETTINGS.chance_margin == 0.02  # the schema default
    assert report_settings.report(validate({**HAND_CONFIG, "report": {"chance_margin": 0.1}})).chance_margin == 0.1


def test_rendered_page_opens_with_the_headline(hand, tmp_path):
    text = build_report(hand, None, HAND_SETTINGS, tmp_path / "r.html").read_text()
    body = text[text.index("<body>"):]
    assert body.index('id="headline"') < body.index("<nav>") < body.index('id="summary"') < body.index('id="task-')
    head = body[body.index('id="headline"'):body.index("<nav>")]
    assert "pretraining helps (p=0.010)" in head and "scratch better (p&lt;0.001)" in head
    assert "no difference at this compute (p=0.300)" in head
    assert "Δ auroc +0.100 [+0.020, +0.180]" in head  # difference with its CI
    assert "50% of the labels" in head  # the matching fraction
    assert "ext_b: −0.150" in head  # external - internal
    assert "auroc 0.943" in head and "Zhou et al. 2023" in head  # the published reference next to ours
    assert "seed 0: +0.100 [+0.030, +0.170]; seed 1: +0.030 [−0.040, +0.100]" in head  # 2 seeds: per seed
    assert "±" not in head[:head.index('<p class="caption">')]  # no t interval from two seeds
    assert "never left chance: scratch: 1 of 1 runs" in head
    assert "Δ abs. error +0.050" in head  # the metric mae is named so it cannot be read as the model
    glaucoma = section(text, "glaucoma")
    assert "1 run(s) never left chance level" in glaucoma and "kept epoch" in glaucoma
    assert ">0 of 8<" in glaucoma and ">–<" in glaucoma  # kept epochs; – where not recorded
    assert "auroc 0.943" in text[text.index('id="config"'):]  # and in the configuration's task table


def test_reference_values_and_chance_margin_are_checked_by_the_schema():
    bad = {**HAND_CONFIG, "tasks": {"t": {**HAND_CONFIG["tasks"]["oct"], "reference": {"auroc": "high"}}},
           "report": {"chance_margin": 2}}
    with pytest.raises(ConfigError) as err:
        validate(bad)
    lines = str(err.value).splitlines()
    assert "config: report.chance_margin: 2 is greater than the maximum of 1" in lines
    assert "config: tasks.t.reference.source: required key is missing" in lines
    assert "config: tasks.t.reference.auroc: 'high' is not a number" in lines


def test_whole_volume_vs_central_bscan_in_the_headline_and_the_task(tmp_path):
    """A task with volume (3-D) and image (2-D) models: each volume model against the image model of its
    kind of init, on the same eyes, with the compare JSON's difference (restated volume - image), CI and p."""
    lay = Layout(tmp_path / "results")
    metrics = [_hand_metrics(lay, "oct", m, 1.0, 0, v)
               for m, v in (("mae", 0.52), ("scratch", 0.55), ("mae3d", 0.85), ("scratch3d", 0.60))]
    pairs = [{"a": "mae3d", "b": "mae", "difference": 0.33, "ci_low": 0.20, "ci_high": 0.46, "p_value": 1e-5},
             {"a": "scratch", "b": "scratch3d", "difference": -0.05, "ci_low": -0.15, "ci_high": 0.05, "p_value": 0.30},
             {"a": "mae3d", "b": "scratch", "difference": 0.30, "ci_low": 0.17, "ci_high": 0.43, "p_value": 1e-4}]
    path = Path(lay.compare_json("oct", "finetune", 1.0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"task": "oct", "protocol": "finetune", "fraction": 1.0, "seed": 0, "metric": "auroc",
                                "models": ["mae", "scratch", "mae3d", "scratch3d"], "best": "mae3d",
                                "pairs": [dict(p, method="delong", n=100) for p in pairs], "best_vs_rest": []}))
    inputs = ReportInputs.of(lay.root, metrics=metrics, compare=[str(path)])
    models = HAND_SETTINGS.models + tuple(m.replace(name=m.name + "3d", input="volume") for m in HAND_SETTINGS.models)
    settings = HAND_SETTINGS.replace(models=models)
    report = rmodel.build(collect_results(inputs), collect_compare(inputs), settings)
    found = {(v.volume_model, v.image_model): v for v in report.volume["oct"]}
    assert set(found) == {("mae3d", "mae"), ("scratch3d", "scratch")}  # same kind of init only
    better, same = found[("mae3d", "mae")].comparison, found[("scratch3d", "scratch")].comparison
    assert better.verdict == rmodel.VOLUME_BETTER and better.verdict_text == "whole volume better (p<0.001)"
    assert (better.pretrained.value, better.baseline.value) == pytest.approx((0.85, 0.52))
    assert same.difference.value == pytest.approx(0.05)  # scratch - scratch3d restated as volume - image
    assert (same.difference.lo, same.difference.hi) == pytest.approx((-0.05, 0.15))
    assert same.verdict_text == "no difference at this compute (p=0.300)"
    assert report.volume["glaucoma"] == () and report.volume["cdr"] == ()
    text = build_report(inputs, None, settings, tmp_path / "r.html").read_text()
    head = text[text.index('id="headline"'):text.index("<nav>")]
    assert "Whole volume vs central B-scan" in head and "whole volume better (p&lt;0.001)" in head
    assert "mae3d 0.850 [0.800, 0.900]" in head and "mae 0.520 [0.470, 0.570]" in head
    assert "+0.330 [+0.200, +0.460]" in head and "+0.050 [−0.050, +0.150]" in head
    assert "Whole volume vs central B-scan (same eyes)" in section(text, "oct")
    assert "Whole volume vs central B-scan" not in section(text, "glaucoma")
