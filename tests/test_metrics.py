"""Evaluation metrics, bootstrap CIs and the metrics.json writer."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from retflow.evaluate.bootstrap import bootstrap_ci, replicate_metrics
from retflow.evaluate.evaluate import evaluate_predictions, main
from retflow.evaluate.metrics import METRICS_BY_TYPE, PRIMARY_METRIC, compute_metrics, confusion, roc_curves


def fake_predictions(n, k, seed=0, signal=1.0, ties=False):
    """Random labels and softmax probabilities that favour the true class."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += signal
    if ties:
        logits = np.round(logits, 1)
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True)


def sklearn_reference(y, p, task_type):
    """Every metric straight from sklearn (all classes present)."""
    k = p.shape[1]
    pred = p.argmax(1)
    mcm = skm.multilabel_confusion_matrix(y, pred, labels=range(k))
    tn, fp, fn, tp = mcm[:, 0, 0], mcm[:, 0, 1], mcm[:, 1, 0], mcm[:, 1, 1]
    ref = {
        "accuracy": skm.accuracy_score(y, pred),
        "balanced_accuracy": skm.balanced_accuracy_score(y, pred),
        "mcc": skm.matthews_corrcoef(y, pred),
        "kappa": skm.cohen_kappa_score(y, pred),
    }
    if task_type == "binary":
        ref.update(
            auroc=skm.roc_auc_score(y, p[:, 1]),
            aupr=skm.average_precision_score(y, p[:, 1]),
            f1=skm.f1_score(y, pred),
            sensitivity=skm.recall_score(y, pred),
            specificity=tn[1] / (tn[1] + fp[1]),
        )
    else:
        onehot = np.eye(k)[y]
        ref.update(
            auroc=skm.roc_auc_score(y, p, multi_class="ovr", average="macro"),
            aupr=skm.average_precision_score(onehot, p, average="macro"),
            f1=skm.f1_score(y, pred, average="macro"),
            sensitivity=skm.recall_score(y, pred, average="macro"),
            specificity=np.mean(tn / (tn + fp)),
        )
    if task_type == "ordinal":
        ref["qwk"] = skm.cohen_kappa_score(y, pred, weights="quadratic")
    return ref


@pytest.mark.parametrize("task_type,k", [("binary", 2), ("multiclass", 4), ("ordinal", 5)])
def test_metrics_match_sklearn(task_type, k):
    y, p = fake_predictions(300, k, seed=k)
    got = compute_metrics(y, p, task_type)
    assert list(got) == METRICS_BY_TYPE[task_type]
    ref = sklearn_reference(y, p, task_type)
    assert set(ref) == set(got)
    for name, value in ref.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name
    assert PRIMARY_METRIC[task_type] in got


def test_absent_class_gives_finite_macro_scores():
    y, p = fake_predictions(200, 4, seed=3)
    keep = y != 2  # the test set has no class-2 cases
    got = compute_metrics(y[keep], p[keep], "multiclass")
    assert all(math.isfinite(v) for v in got.values()), got
    present = [0, 1, 3]
    expected = np.mean([skm.roc_auc_score(y[keep] == c, p[keep, c]) for c in present])
    assert got["auroc"] == pytest.approx(expected)
    curves = roc_curves(y[keep], p[keep], ["a", "b", "c", "d"])
    assert set(curves) == {"a", "b", "d"}
    # only one class present: ranking metrics undefined, no crash
    one = compute_metrics(np.zeros(10, int), p[:10], "multiclass")
    assert math.isnan(one["auroc"]) and math.isnan(one["aupr"])


def test_ordinal_qwk_uses_grade_distances_when_grades_missing():
    y = np.array([0, 0, 4, 4, 4])
    pred = np.array([0, 4, 4, 4, 0])
    p = np.eye(5)[pred] * 0.9 + 0.02
    got = compute_metrics(y, p, "ordinal")["qwk"]
    assert got == pytest.approx(skm.cohen_kappa_score(y, pred, labels=range(5), weights="quadratic"))


@pytest.mark.parametrize("task_type,k", [("binary", 2), ("multiclass", 3), ("ordinal", 5)])
def test_perfect_predictions(task_type, k):
    y = np.tile(np.arange(k), 10)
    p = np.eye(k)[y] * 0.9 + 0.1 / k
    got = compute_metrics(y, p, task_type)
    for name, value in got.items():
        assert value == pytest.approx(1.0), name
    ci = bootstrap_ci(y, p, task_type, n_boot=200)
    assert all(c["ci_low"] == pytest.approx(1.0) for c in ci.values())


@pytest.mark.parametrize("task_type,k", [("binary", 2), ("multiclass", 4), ("ordinal", 5)])
def test_vectorised_replicates_equal_sklearn_on_resamples(task_type, k):
    """The bootstrap's count-weighted formulas reproduce compute_metrics on the resampled data."""
    y, p = fake_predictions(120, k, seed=7, ties=True)
    rng = np.random.default_rng(0)
    for size in [3, 8, 30, 120]:
        for _ in range(10):
            idx = rng.integers(0, y.size, size)
            w = np.bincount(idx, minlength=y.size)[None]
            fast = replicate_metrics(y, p, task_type, w)
            slow = compute_metrics(y[idx], p[idx], task_type)
            for name, value in slow.items():
                assert fast[name][0] == pytest.approx(value, abs=1e-9, nan_ok=True), (name, size)


def test_bootstrap_ci_properties():
    y, p = fake_predictions(200, 4, seed=1)
    a = bootstrap_ci(y, p, "ordinal", n_boot=500, seed=3)
    b = bootstrap_ci(y, p, "ordinal", n_boot=500, seed=3)
    assert a == b
    assert set(a) == set(METRICS_BY_TYPE["ordinal"])
    for name, c in a.items():
        assert c["ci_low"] <= c["value"] <= c["ci_high"], name
    assert bootstrap_ci(y, p, "ordinal", n_boot=500, seed=4) != a
    y_big, p_big = fake_predictions(2000, 4, seed=1)
    big = bootstrap_ci(y_big, p_big, "ordinal", n_boot=500, seed=3)
    for name in ("auroc", "accuracy", "qwk"):
        assert big[name]["ci_high"] - big[name]["ci_low"] < a[name]["ci_high"] - a[name]["ci_low"]


def test_bootstrap_too_few_valid_replicates_gives_nan_ci():
    y = np.array([0] * 19 + [1])  # one positive: most replicates have no positives
    p = np.column_stack([np.linspace(0.9, 0.1, 20), np.linspace(0.1, 0.9, 20)])
    ci = bootstrap_ci(y, p, "binary", n_boot=5, seed=0)
    assert math.isfinite(ci["auroc"]["value"])
    assert math.isnan(ci["auroc"]["ci_low"]) and math.isnan(ci["auroc"]["ci_high"])


def test_confusion_and_roc_shapes():
    y, p = fake_predictions(1000, 2, seed=2)
    cm = confusion(y, p.argmax(1), 2)
    assert np.sum(cm) == 1000 and len(cm) == 2 and all(isinstance(v, int) for row in cm for v in row)
    curves = roc_curves(y, p, ["neg", "pos"])
    assert list(curves) == ["pos"]
    fpr, tpr = curves["pos"]["fpr"], curves["pos"]["tpr"]
    assert len(fpr) == len(tpr) <= 200 and fpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1


def write_predictions(path, y, p):
    df = pd.DataFrame({"image_id": [f"img{i}" for i in range(len(y))], "y_true": y})
    for c in range(p.shape[1]):
        df[f"prob_{c}"] = p[:, c]
    df["y_pred"] = p.argmax(1)
    df.to_parquet(path, index=False)
    return df


META = {
    "task": "dr_grading",
    "task_type": "ordinal",
    "protocol": "finetune",
    "model": "mae",
    "fraction": 0.1,
    "seed": 0,
    "eval_set": "internal",
    "classes": ["0", "1", "2", "3", "4"],
}


def test_evaluate_predictions_writes_json(tmp_path):
    y, p = fake_predictions(150, 5, seed=5)
    y[y == 3] = 4  # an absent grade must not crash
    pred = tmp_path / "predictions.parquet"
    write_predictions(pred, y, p)
    out = tmp_path / "sub" / "metrics.json"
    res = evaluate_predictions(pred, META, out, n_boot=200, seed=0)
    text = out.read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert data == res
    for field, value in META.items():
        assert data[field] == value
    assert data["n"] == 150 and sum(data["class_counts"]) == 150 and data["class_counts"][3] == 0
    assert set(data["metrics"]) == set(METRICS_BY_TYPE["ordinal"])
    for m in data["metrics"].values():
        assert set(m) == {"value", "ci_low", "ci_high"}
    assert np.array(data["confusion_matrix"]).shape == (5, 5)
    assert "3" not in data["roc"] and set(data["roc"]) == {"0", "1", "2", "4"}
    assert [p.name for p in out.parent.iterdir()] == ["metrics.json"]  # no temp files left


def test_cli(tmp_path):
    y, p = fake_predictions(80, 2, seed=6)
    pred = tmp_path / "p.parquet"
    write_predictions(pred, y, p)
    out = tmp_path / "m.json"
    rc = main(
        [
            "--predictions",
            str(pred),
            "--out",
            str(out),
            "--task",
            "glaucoma",
            "--task-type",
            "binary",
            "--protocol",
            "probe",
            "--model",
            "scratch",
            "--fraction",
            "1.0",
            "--seed",
            "2",
            "--eval-set",
            "cfp_device_b",
            "--classes",
            "0",
            "1",
            "--n-boot",
            "50",
        ]
    )
    data = json.loads(out.read_text())
    assert rc == 0 and data["eval_set"] == "cfp_device_b" and data["seed"] == 2 and data["fraction"] == 1.0


@pytest.mark.parametrize("problem", ["missing_prob", "empty", "nan", "missing_file"])
def test_bad_predictions_exit_with_file_name(tmp_path, problem):
    y, p = fake_predictions(30, 5, seed=0)
    pred = tmp_path / "bad_predictions.parquet"
    df = write_predictions(pred, y, p)
    if problem == "missing_prob":
        df.drop(columns="prob_4").to_parquet(pred)
    elif problem == "empty":
        df.iloc[:0].to_parquet(pred)
    elif problem == "nan":
        df.loc[3, "prob_1"] = np.nan
        df.to_parquet(pred)
    else:
        pred.unlink()
    with pytest.raises(SystemExit) as exc:
        evaluate_predictions(pred, META, tmp_path / "m.json", n_boot=10)
    assert str(pred) in str(exc.value)
    assert not (tmp_path / "m.json").exists()
