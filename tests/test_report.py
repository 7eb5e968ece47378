"""HTML report built from a fake results tree (metrics.json written by evaluate_predictions)."""

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from retflow.evaluate.evaluate import evaluate_predictions
from retflow.report import figures
from retflow.report.collect import collect_benchmarks, collect_pretrain, collect_quarantine, collect_results
from retflow.report.html import build_report, main

TASKS = {
    "dr_grading": {
        "dataset": "cfp_clinic",
        "label": "dr_grade",
        "type": "ordinal",
        "classes": ["0", "1", "2", "3", "4"],
        "external": ["cfp_device_b"],
    },
    "oct_diagnosis": {
        "dataset": "oct_clinic",
        "label": "diagnosis",
        "type": "multiclass",
        "classes": ["normal", "drusen", "dme", "cnv"],
        "external": [],
    },
}
MODELS = {"mae": {"init": "pretrained", "method": "mae"}, "scratch": {"init": "random"}}
FRACTIONS = [0.1, 1.0]
CONFIG = {
    "datasets": {
        "cfp_clinic": {
            "modality": "cfp",
            "role": "labelled",
            "source": "phantom",
            "phantom": {"kind": "cfp", "n": 500, "seed": 12},
        },
        "oct_clinic": {"modality": "oct", "role": "labelled", "source": "csv", "path": "data/<oct>.csv"},
        "cfp_device_b": {
            "modality": "cfp",
            "role": "external",
            "source": "phantom",
            "phantom": {"kind": "cfp", "n": 240, "seed": 13, "style": "B"},
        },
    },
    "tasks": TASKS,
    "models": MODELS,
    "pretrain": {"methods": ["mae"], "epochs": 3, "mask_ratio": {"cfp": 0.75}},
    "finetune": {"epochs": 2, "blr": 1e-3},
    "fractions": FRACTIONS,
    "seeds": [0, 1],
    "protocols": ["finetune"],
}
TINY_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360f8cfc0f01f0005000201e2a7d0e90000000049454e44ae426082"
)


def _predictions(path: Path, n: int, k: int, rng, signal: float) -> None:
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += signal
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    df = pd.DataFrame({"image_id": [f"i{j}" for j in range(n)], "y_true": y})
    for c in range(k):
        df[f"prob_{c}"] = p[:, c]
    df["y_pred"] = p.argmax(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(path, index=False)


def build_fake_tree(root: Path, n_boot: int = 100) -> tuple[Path, Path]:
    """A results/ and benchmarks/ tree like the workflow's, with random predictions."""
    results, bench = root / "results", root / "benchmarks"
    rng = np.random.default_rng(0)
    for task, cfg in TASKS.items():
        k = len(cfg["classes"])
        for model in MODELS:
            for frac in FRACTIONS:
                for seed in CONFIG["seeds"]:
                    run = results / "finetune" / task / model / f"frac{frac:g}" / f"seed{seed}"
                    sets = [("internal", run)] + [(e, run / "external" / e) for e in cfg["external"]]
                    for eval_set, folder in sets:
                        signal = 0.5 + frac + (0.5 if model == "mae" else 0) - (0.3 if eval_set != "internal" else 0)
                        _predictions(folder / "predictions.parquet", 90, k, rng, signal)
                        meta = {
                            "task": task,
                            "task_type": cfg["type"],
                            "protocol": "finetune",
                            "model": model,
                            "fraction": frac,
                            "seed": seed,
                            "eval_set": eval_set,
                            "classes": cfg["classes"],
                        }
                        evaluate_predictions(
                            folder / "predictions.parquet", meta, folder / "metrics.json", n_boot=n_boot
                        )
    pre = results / "pretrain" / "mae" / "cfp"
    pre.mkdir(parents=True)
    (pre / "recon.png").write_bytes(TINY_PNG)
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
    (bench / "pretrain").mkdir()
    (bench / "pretrain" / "mae_cfp.tsv").write_text(header + "100.0\t0:01:40\t-\t-\t-\t-\t-\t-\t-\t-\n")
    return results, bench


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return build_fake_tree(tmp_path_factory.mktemp("report"))


def test_collectors(tree):
    results, bench = tree
    df = collect_results(results)
    assert len(df) == 2 * 2 * 2 * 2 + 2 * 2 * 2  # internal runs + dr_grading external
    assert {"auroc", "auroc_lo", "auroc_hi", "qwk", "eval_set", "path"} <= set(df.columns)
    assert set(df["eval_set"]) == {"internal", "cfp_device_b"}
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


def test_build_report(tree, tmp_path):
    results, bench = tree
    out = build_report(results, bench, CONFIG, tmp_path / "report.html")
    text = Path(out).read_text()
    for name in [*TASKS, *MODELS, "cfp_device_b", "unreadable", "too_small"]:
        assert name in text, name
    assert text.count("data:image/png;base64,") >= 10
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "<script" not in text.lower()
    assert "data/&lt;oct&gt;.csv" in text  # config text is escaped
    assert re.search(r"0\.\d{3} \[0\.\d{3}, 0\.\d{3}\]", text)
    assert "112.5" in text  # timings total
    assert "finetune train" in text  # jobs grouped by workflow step
    assert not list(tmp_path.glob(".report.html*"))


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
