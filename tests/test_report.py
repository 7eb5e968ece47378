"""HTML report, pairwise comparisons, saliency maps and report targets on synthetic results trees."""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from sklearn.metrics import average_precision_score, precision_recall_curve

from retflow.evaluate.compare import delong_test
from retflow.evaluate.evaluate import evaluate_predictions
from retflow.report import figures, pairwise, saliency, targets
from retflow.report.collect import (
    collect_benchmarks,
    collect_compare,
    collect_pretrain,
    collect_quarantine,
    collect_results,
    cost_frame,
    job_step,
)
from retflow.report.html import build_report, main, mapped_internal

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
CONFIG = {
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
    "pretrain": {"methods": ["mae"], "epochs": 3, "mask_ratio": {"cfp": 0.75}},
    "finetune": {"epochs": 2, "blr": 1e-3},
    "fractions": FRACTIONS,
    "seeds": [0, 1],
    "protocols": ["finetune"],
    "evaluate": {"n_boot": 100, "seed": 0},
    "resources": {"pretrain": {"gpu": 2}, "finetune": {"gpu": 1}},
}
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


def build_fake_tree(root: Path, n_boot: int = 100) -> tuple[Path, Path]:
    """A results/ and benchmarks/ tree like the workflow's, with random predictions."""
    results, bench = root / "results", root / "benchmarks"
    rng = np.random.default_rng(0)
    for task, cfg in TASKS.items():
        classes = cfg.get("classes") or (cfg["label"] if isinstance(cfg["label"], list) else [])
        k = len(classes)
        protocols, fractions, seeds = fanout(task)
        for protocol in protocols:
            for model in MODELS:
                for frac in fractions:
                    for seed in seeds:
                        run = results / protocol / task / model / f"frac{frac:g}" / f"seed{seed}"
                        if cfg["type"] == "segmentation":
                            _segmentation_metrics(run / "metrics.json", model, seed)
                            continue
                        sets = [("internal", run, cfg["type"], classes)]
                        for e in cfg.get("external", []):
                            if isinstance(e, dict):  # evaluated in its own label scheme
                                sets.append((e["dataset"], run / "external" / e["dataset"], "binary", e["classes"]))
                            else:
                                sets.append((e, run / "external" / e, cfg["type"], classes))
                        for eval_set, folder, ttype, cls in sets:
                            signal = 0.5 + frac + (0.8 if model == "mae" else 0)
                            signal -= 0.3 if eval_set != "internal" else 0
                            _predictions(folder / "predictions.parquet", ttype, len(cls), rng, signal)
                            meta = {"task": task, "task_type": ttype, "protocol": protocol, "model": model,
                                    "fraction": frac, "seed": seed, "eval_set": eval_set, "classes": cls}
                            evaluate_predictions(folder / "predictions.parquet", meta, folder / "metrics.json",
                                                 n_boot=n_boot)
    for task, protocol, frac, seed in targets.compare_groups(CONFIG):
        preds = [str(results / p) for p in targets.compare_predictions(CONFIG, task, protocol, frac, seed)]
        cfg = TASKS[task]
        args = ["--predictions", *preds, "--models", *MODELS, "--task-type", cfg["type"], "--n-boot", "200",
                "--task", task, "--protocol", protocol, "--fraction", frac, "--train-seed", str(seed),
                "--out", str(results / targets.compare_json(task, protocol, frac, seed))]
        classes = cfg.get("classes") or (cfg["label"] if isinstance(cfg["label"], list) else None)
        if classes and cfg["type"] != "regression":
            args += ["--classes", *classes]
        assert pairwise.main(args) == 0
    sal = results / "saliency"
    sal.mkdir(parents=True)
    (sal / "glaucoma.png").write_bytes(TINY_PNG)
    (sal / "glaucoma.json").write_text(json.dumps({"run": "finetune/glaucoma/mae/frac1/seed0", "images": []}))
    pre = results / "pretrain" / "mae" / "cfp"
    pre.mkdir(parents=True)
    (pre / "figure.png").write_bytes(TINY_PNG)
    pd.DataFrame({"epoch": range(5), "loss": [1.0, 0.8, 0.6, 0.5, 0.45], "lr": 1e-4, "seconds": 2.0}).to_csv(
        pre / "log.csv", index=False
    )
    qdir = results / "data" / "cfp_clinic"
    qdir.mkdir(parents=True)
    pd.DataFrame({"source": ["a.png", "b.png", "c.png"], "reason": ["unreadable", "unreadable", "too_small"]}).to_csv(
        qdir / "quarantine.csv", index=False
    )
    (results / "data" / "oct_clinic").mkdir()
    (results / "data" / "oct_clinic" / "quarantine.csv").write_text("source,reason\n")
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
    out = build_report(results, bench, CONFIG, tmp_path_factory.mktemp("html") / "report.html")
    return out.read_text()


def section(text: str, task: str) -> str:
    start = text.index(f"<h2 id='task-{task}'>")
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
    cost = cost_frame(bench, CONFIG).set_index("job")
    assert cost.loc["pretrain/mae_cfp", "gpu_h"] == pytest.approx(100 * 2 / 3600)
    assert cost.loc["finetune/dr_grading/mae/frac0.1/seed0/train", "gpu_h"] == pytest.approx(12.5 / 3600)
    assert cost.loc["finetune/dr_grading/mae/frac0.1/seed0/evaluate", "gpu_h"] == 0
    assert cost.loc["finetune/dr_grading/mae/frac0.1/seed0/train", "cpu_h"] == pytest.approx(11.9 / 3600)
    assert cost.loc["finetune/dr_grading/mae/frac0.1/seed0/train", "model"] == "mae"
    assert job_step("compare/glaucoma/finetune/frac1/seed0") == "compare"
    assert job_step("probe_lars/glaucoma/mae/frac1/seed0/predict_cfp_device_b") == "probe_lars predict"
    assert cost_frame(bench / "nowhere", CONFIG).empty


# ---------------------------------------------------------------- statistics
def test_seed_summary_t_interval_and_bootstrap_fallback():
    df = pd.DataFrame({"model": ["a", "a", "b"], "auroc": [0.8, 0.9, 0.7], "auroc_lo": [0.7, 0.8, 0.6],
                       "auroc_hi": [0.9, 0.95, 0.75]})
    s = figures.seed_summary(df, "auroc", ["model"]).set_index("model")
    half = stats.t.ppf(0.975, 1) * np.std([0.8, 0.9], ddof=1) / np.sqrt(2)
    assert s.loc["a", "value"] == pytest.approx(0.85)
    assert s.loc["a", "lo"] == pytest.approx(0.85 - half) and s.loc["a", "hi"] == pytest.approx(0.85 + half)
    assert s.loc["a", "ci"] == "seeds" and s.loc["b", "ci"] == "bootstrap"
    assert (s.loc["b", "lo"], s.loc["b", "hi"]) == (0.6, 0.75)


def test_pairwise_best_vs_rest(tmp_path):
    rng = np.random.default_rng(1)
    paths = {}
    for model, signal in (("weak", 0.2), ("strong", 2.5), ("mid", 1.0)):
        paths[model] = tmp_path / f"{model}.parquet"
        _predictions(paths[model], "binary", 2, rng, signal, n=200)
    res = pairwise.compare_models(paths, "binary", ["0", "1"], n_boot=200)
    assert res["method"] == "delong" and res["best"] == "strong" and len(res["pairs"]) == 3
    assert [p["b"] for p in res["best_vs_rest"]] == ["weak", "mid"]
    vs_weak = res["best_vs_rest"][0]
    assert vs_weak["a"] == "strong" and vs_weak["difference"] > 0 and vs_weak["ci_low"] < vs_weak["ci_high"]
    y = pd.read_parquet(paths["weak"])["y_true"].to_numpy()
    ref = delong_test(y, pd.read_parquet(paths["strong"])["prob_1"], pd.read_parquet(paths["weak"])["prob_1"])
    assert vs_weak["p_value"] == pytest.approx(ref["p_value"]) and vs_weak["p_value"] < 0.05
    assert vs_weak["difference"] == pytest.approx(ref["difference"])
    # a lower-is-better metric picks the smallest value
    ece = pairwise.compare_models(paths, "binary", ["0", "1"], metric="ece", n_boot=50)
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
    assert ("glaucoma", "probe_lars", "0.1", 0) in groups and ("dr_grading", "finetune", "1", 1) in groups
    assert not any(k[0] == "vessels" for k in groups)  # segmentation is skipped
    assert all(v == ["mae", "scratch"] for v in groups.values())
    one_model = dict(CONFIG, models={"mae": MODELS["mae"]})
    assert targets.compare_groups(one_model) == {}
    assert targets.compare_predictions(CONFIG, "glaucoma", "finetune", "1", 0) == [
        "finetune/glaucoma/mae/frac1/seed0/predictions.parquet",
        "finetune/glaucoma/scratch/frac1/seed0/predictions.parquet",
    ]
    run = targets.saliency_run(dict(CONFIG, models={"scratch": MODELS["scratch"], "mae": MODELS["mae"]}), "glaucoma")
    assert (run.protocol, run.model, run.fraction, run.seed) == ("finetune", "mae", 1.0, 0)
    assert targets.saliency_tasks(CONFIG) == ["dr_grading", "glaucoma", "oct_diagnosis"]

    class W:
        task, protocol, frac, seed = "oct_signs", "finetune", "1", "0"

    args = targets.compare_args(CONFIG, W)
    assert "--task-type multilabel" in args and "--classes drusen irf srf" in args and "--n-boot 100" in args
    assert targets.compare_outputs(CONFIG)[0].startswith("results/compare/")


# ---------------------------------------------------------------- HTML
def test_build_report(html):
    for name in [*TASKS, *MODELS, "cfp_device_b", "unreadable", "too_small", "probe_lars"]:
        assert name in html, name
    assert html.count("data:image/png;base64,") >= 15
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert "<script" not in html.lower()
    assert "data/&lt;oct&gt;.csv" in html  # config text is escaped
    assert re.search(r"0\.\d{3} ± 0\.\d{3}", html)  # several seeds: mean +- CI half-width
    assert re.search(r"0\.\d{3} \[0\.\d{3}, 0\.\d{3}\]", html)  # one seed: bootstrap CI
    assert "112.5" not in html and "118.1" in html  # timings total (12.5 + 3.6 + 100 + 2)
    assert "finetune train" in html and "GPU-hours" in html and "0.0556" in html  # 100 s x 2 GPUs
    assert "id='summary'" in html and "p vs best" in html


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
    assert "mae ↓" in section(html, "cdr") and "Confusion matrices" in section(html, "oct_signs")


def test_report_robust_to_empty_inputs(tmp_path):
    out = build_report(tmp_path / "results", tmp_path / "benchmarks", {}, tmp_path / "r.html")
    text = out.read_text()
    assert "retflow report" in text and "none" in text


def test_cli(tree, tmp_path):
    results, bench = tree
    cfg = tmp_path / "config.yaml"
    cfg.write_text("tasks:\n  dr_grading: {dataset: cfp_clinic, type: ordinal, classes: ['0','1','2','3','4']}\n")
    out = tmp_path / "cli.html"
    assert main(["--results", str(results), "--benchmarks", str(bench), "--config", str(cfg), "--out", str(out)]) == 0
    text = out.read_text()
    assert "dr_grading" in text and "oct_diagnosis" in text  # tasks found in results but not in config


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
    assert saliency.main(["--checkpoint", str(ckpt), "--store", str(store), "--label", "label", "--out", str(out),
                          "--meta", str(meta), "--device", "cpu", "--n-per-class", "2"]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")
    info = json.loads(meta.read_text())
    assert [i["true"] for i in info["images"]] == ["a", "a", "b", "b", "c"]  # class c has one test image
    assert "rollout" in info["method"]


# ---------------------------------------------------------------- workflow wiring
def test_workflow_dry_run_fans_out_compare_and_saliency(tmp_path):
    import yaml
    from conftest import ROOT, job_counts, make_workdir, snakemake

    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    result = snakemake(make_workdir(tmp_path), "-n", "--cores", "1")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    counts = job_counts(result.stdout)
    assert counts["compare"] == len(targets.compare_targets(config)) > 0
    assert counts["saliency"] == len(targets.saliency_tasks(config)) > 0
    assert counts["report"] == 1
