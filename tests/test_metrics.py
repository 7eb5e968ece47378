"""Evaluation metrics, bootstrap CIs and the metrics.json writer."""

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from scipy import stats

from retflow.evaluate.bootstrap import bootstrap_all, bootstrap_ci, replicate_metrics, replicate_per_class
from retflow.evaluate.evaluate import evaluate_predictions, main
from retflow.evaluate.metrics import (
    ECE_BINS,
    LOWER_IS_BETTER,
    METRICS_BY_TYPE,
    PRIMARY_METRIC,
    RANKING_CONVENTION,
    absent_classes,
    compute_metrics,
    confusion,
    ece_bin_index,
    expected_calibration_error,
    per_class_metrics,
    roc_curves,
)
from retflow.evaluate.retfound_metrics import CURRENT_KEYS, V1_KEYS, retfound_current, retfound_v1
from retflow.settings import ConfigError
from retflow.settings import report as report_settings
from retflow.settings import validate


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


def reference_ece(y, p, n_bins=15):
    """ECE written out bin by bin: bins (b/15, (b+1)/15], |B|/n * |accuracy - mean confidence|."""
    conf, correct = p.max(axis=1), (p.argmax(axis=1) == y)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        in_bin = (conf > lo) & (conf <= hi) if b else (conf <= hi)
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return total


def sklearn_reference(y, p, task_type):
    """Every metric straight from sklearn (all classes present); ECE from the loop above."""
    k = p.shape[1]
    pred = p.argmax(1)
    mcm = skm.multilabel_confusion_matrix(y, pred, labels=range(k))
    tn, fp, fn, tp = mcm[:, 0, 0], mcm[:, 0, 1], mcm[:, 1, 0], mcm[:, 1, 1]
    ref = {
        "accuracy": skm.accuracy_score(y, pred),
        "balanced_accuracy": skm.balanced_accuracy_score(y, pred),
        "mcc": skm.matthews_corrcoef(y, pred),
        "kappa": skm.cohen_kappa_score(y, pred),
        "ece": reference_ece(y, p),
    }
    if task_type == "binary":
        ref.update(
            auroc=skm.roc_auc_score(y, p[:, 1]),
            aupr=skm.average_precision_score(y, p[:, 1]),
            f1=skm.f1_score(y, pred),
            precision=skm.precision_score(y, pred),
            sensitivity=skm.recall_score(y, pred),
            specificity=tn[1] / (tn[1] + fp[1]),
        )
    else:
        onehot = np.eye(k)[y]
        ref.update(
            auroc=skm.roc_auc_score(y, p, multi_class="ovr", average="macro"),
            aupr=skm.average_precision_score(onehot, p, average="macro"),
            f1=skm.f1_score(y, pred, average="macro"),
            precision=skm.precision_score(y, pred, average="macro"),
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
        assert got[name] == pytest.approx(value, abs=1e-9), name
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
    conf = 0.9 + 0.1 / k
    for name, value in got.items():
        assert value == pytest.approx(1 - conf if name == "ece" else 1.0), name
    ci = bootstrap_ci(y, p, task_type, n_boot=200)
    assert all(c["ci_low"] == pytest.approx(1 - conf if n == "ece" else 1.0) for n, c in ci.items())


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
    assert data["absent_classes"] == ["3"] and data["lower_is_better"] == ["ece"] and data["ece_bins"] == 15
    assert set(data["per_class"]) == set(META["classes"])
    assert data["per_class"]["3"]["n_positive"] == 0 and data["per_class"]["3"]["auroc"]["value"] is None
    for name in ("auroc", "aupr", "sensitivity", "specificity", "precision", "f1"):
        assert set(data["per_class"]["0"][name]) == {"value", "ci_low", "ci_high"}
    assert data["per_class"]["0"]["auroc"]["value"] == pytest.approx(skm.roc_auc_score(y == 0, p[:, 0]))
    assert list(data["retfound_v1"]) == V1_KEYS and list(data["retfound_current"]) == CURRENT_KEYS
    assert data["retfound_current"]["score"] == pytest.approx(retfound_current(y, p, "ordinal")["score"])
    assert set(data["conventions"]) == {"auroc_aupr", "retfound_v1", "retfound_current"}
    assert data["conventions"]["auroc_aupr"] == RANKING_CONVENTION["ordinal"]


def eval_config() -> dict:
    """A validated config with a binary task (an external set) and a regression task; a 50-replicate bootstrap."""
    fundus = {"modality": "cfp", "role": "labelled", "source": "phantom",
              "phantom": {"kind": "cfp", "n": 40, "seed": 1}}
    return validate({
        "datasets": {"fundus": fundus, "cfp_device_b": dict(fundus, role="external")},
        "tasks": {"glaucoma": {"dataset": "fundus", "type": "binary", "label": "glaucoma", "classes": [0, 1],
                               "external": ["cfp_device_b"]},
                  "age": {"dataset": "fundus", "type": "regression", "label": "age"}},
        "models": {"scratch": {"init": "random"}},
        "vit": {"arch": "vit_tiny_patch16_224", "img_size": 64, "patch_size": 8},
        "pretrain": {"methods": ["mae"], "pools": {}},
        "evaluate": {"n_boot": 50},
    })


def test_cli(tmp_path):
    y, p = fake_predictions(80, 2, seed=6)
    pred = tmp_path / "p.parquet"
    write_predictions(pred, y, p)
    out = tmp_path / "m.json"
    settings = report_settings.evaluation(eval_config(), "probe_adamw", "glaucoma", "scratch", 1.0, 2, "cfp_device_b")
    assert (settings.task_type, settings.classes, settings.evaluate.n_boot) == ("binary", ("0", "1"), 50)
    rc = main(["--settings", settings.to_json(), "--predictions", str(pred), "--out", str(out)])
    data = json.loads(out.read_text())
    assert rc == 0 and data["eval_set"] == "cfp_device_b" and data["seed"] == 2 and data["fraction"] == 1.0
    assert data["n_boot"] == 50 and data["settings"] == settings.to_dict()
    assert report_settings.EvaluationSettings.from_dict(data["settings"]) == settings


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
        evaluate_predictions(pred, META, tmp_path / "m.json", n_boot=10, seed=0)
    assert str(pred) in str(exc.value)
    assert not (tmp_path / "m.json").exists()


# ---------------------------------------------------------------- per class, absent classes, ECE


@pytest.mark.parametrize("task_type,k", [("binary", 2), ("multiclass", 4), ("ordinal", 5)])
def test_per_class_metrics_match_sklearn(task_type, k):
    y, p = fake_predictions(300, k, seed=10 + k)
    pred = p.argmax(1)
    got = per_class_metrics(y, p, task_type)
    spec = [np.sum((y != c) & (pred != c)) / np.sum(y != c) for c in range(k)]
    ref = {
        "auroc": [skm.roc_auc_score(y == c, p[:, c]) for c in range(k)],
        "aupr": [skm.average_precision_score(y == c, p[:, c]) for c in range(k)],
        "sensitivity": skm.recall_score(y, pred, average=None, labels=range(k)),
        "specificity": spec,
        "precision": skm.precision_score(y, pred, average=None, labels=range(k)),
        "f1": skm.f1_score(y, pred, average=None, labels=range(k)),
    }
    assert set(got) == set(ref)
    for name, values in ref.items():
        np.testing.assert_allclose(got[name], values, rtol=0, atol=1e-9, err_msg=name)


def test_absent_class_reported_and_skipped():
    y, p = fake_predictions(200, 4, seed=3)
    keep = y != 2
    y, p = y[keep], p[keep]
    assert absent_classes(y, p, "multiclass") == [2]
    pc = per_class_metrics(y, p, "multiclass")
    assert math.isnan(pc["auroc"][2]) and math.isnan(pc["aupr"][2]) and math.isnan(pc["sensitivity"][2])
    got = compute_metrics(y, p, "multiclass")
    assert got["auroc"] == pytest.approx(np.nanmean(pc["auroc"]), abs=1e-12)
    assert got["aupr"] == pytest.approx(np.nanmean(pc["aupr"]), abs=1e-12)
    # the RETFound definitions do not crash either (sklearn's one-hot AUROC would raise here)
    for fn in (retfound_v1, retfound_current):
        assert all(math.isfinite(v) for v in fn(y, p, "multiclass").values())
    # binary with only negatives: ranking metrics undefined, no crash, class 1 reported absent
    yb, pb = fake_predictions(20, 2, seed=1)
    yb[:] = 0
    assert absent_classes(yb, pb, "binary") == [1]
    assert math.isnan(compute_metrics(yb, pb, "binary")["auroc"])


def test_ece_hand_example():
    # (confidence, correct): bin (14/15, 1]: 0.95 right, 0.95 wrong -> |0.5 - 0.95| * 2/5 = 0.18;
    # bin (8/15, 9/15]: 0.55 right twice -> |1 - 0.55| * 2/5 = 0.18; bin (5/15, 6/15]: 0.35 wrong
    # -> |0 - 0.35| * 1/5 = 0.07. ECE = 0.43 (one single bin would give |0.6 - 0.67| = 0.07).
    y = np.array([0, 1, 2, 2, 0])
    p = np.array(
        [
            [0.95, 0.03, 0.02],
            [0.95, 0.03, 0.02],
            [0.25, 0.20, 0.55],
            [0.25, 0.20, 0.55],
            [0.32, 0.35, 0.33],
        ]
    )
    assert ECE_BINS == 15
    assert expected_calibration_error(y, p) == pytest.approx(0.43, abs=1e-12)
    assert compute_metrics(y, p, "multiclass")["ece"] == pytest.approx(0.43, abs=1e-12)
    assert expected_calibration_error(y, p, n_bins=1) == pytest.approx(0.07, abs=1e-12)
    assert "ece" in LOWER_IS_BETTER
    # bins are (lo, hi]: an upper edge belongs to its own bin, just above it to the next
    edges = np.linspace(0, 1, 16)
    np.testing.assert_array_equal(ece_bin_index(edges[1:]), np.arange(15))
    np.testing.assert_array_equal(ece_bin_index(edges[:-1] + 1e-9), np.arange(15))


# ---------------------------------------------------------------- RETFound definitions

# Worked 3-class example. y_pred = arg-max; confusion (rows true, columns predicted):
#   [[2, 1, 0],
#    [0, 2, 1],
#    [1, 0, 1]]
# one-vs-rest (TP, FP, FN, TN): class 0 (2, 1, 1, 4), class 1 (2, 1, 1, 4), class 2 (1, 1, 1, 5).
WORKED_Y = np.array([0, 0, 0, 1, 1, 1, 2, 2])
WORKED_P = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.6, 0.3, 0.1],
        [0.3, 0.5, 0.2],
        [0.2, 0.7, 0.1],
        [0.1, 0.6, 0.3],
        [0.1, 0.4, 0.5],
        [0.2, 0.2, 0.6],
        [0.5, 0.1, 0.4],
    ]
)
# One-vs-rest AUROC by counting pairs: class 0 14/15, class 1 14/15, class 2 11/12 -> macro 167/180.
# Average precision: class 0 (1 + 1 + 3/4)/3 = 11/12, class 1 11/12, class 2 (1 + 2/3)/2 = 5/6
# -> macro 8/9.
WORKED_AUROC = 167 / 180
WORKED_AUPR = 8 / 9


def test_retfound_v1_worked_example():
    got = retfound_v1(WORKED_Y, WORKED_P, "multiclass")
    assert list(got) == V1_KEYS
    expected = {
        "acc": (6 / 8 + 6 / 8) / 2,  # classes 1 and 2 only: (TP + TN) / n = 0.75 each (top-1 is 0.625)
        "sensitivity": (2 / 3 + 1 / 2) / 2,
        "specificity": (4 / 5 + 5 / 6) / 2,
        "precision": (2 / 3 + 1 / 2) / 2,
        "g_mean": (math.sqrt(2 / 3 * 4 / 5) + math.sqrt(1 / 2 * 5 / 6)) / 2,
        "f1": (2 / 3 + 1 / 2) / 2,
        "mcc": (7 / 15 + 4 / 12) / 2,  # (2*4 - 1*1)/sqrt(5*5*3*3) and (1*5 - 1*1)/sqrt(6*6*2*2)
        "auroc": WORKED_AUROC,  # over all classes, class 0 included
        "aupr": WORKED_AUPR,
    }
    assert got == pytest.approx(expected, abs=1e-12)
    assert got["acc"] == pytest.approx(0.75) and got["mcc"] == pytest.approx(0.4)


def test_retfound_current_worked_example():
    got = retfound_current(WORKED_Y, WORKED_P, "multiclass")
    assert list(got) == CURRENT_KEYS
    f1 = (2 / 3 + 2 / 3 + 1 / 2) / 3  # macro over all three classes = 11/18
    kappa = (5 / 8 - 22 / 64) / (1 - 22 / 64)  # p_o = 5/8, p_e = (3*3 + 3*3 + 2*2)/64 -> 3/7
    expected = {
        "accuracy": 5 / 8,
        "f1": f1,
        "precision": 11 / 18,
        "recall": 11 / 18,
        "kappa": kappa,
        "auroc": WORKED_AUROC,
        "aupr": WORKED_AUPR,
        "score": (f1 + WORKED_AUROC + kappa) / 3,
    }
    assert got == pytest.approx(expected, abs=1e-12)
    assert kappa == pytest.approx(3 / 7) and got["score"] == pytest.approx(2479 / 3780)


def test_retfound_definitions_binary_worked_example():
    # y_pred = [0, 0, 1, 1, 0]; class 1: TP 1, FP 1, FN 1, TN 2
    y = np.array([0, 0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.6, 0.7, 0.3])
    v1 = retfound_v1(y, p1, "binary")
    ap1 = (1 + 2 / 4) / 2  # ranking .7(+) .6 .4 .3(+) .1
    ap0 = (1 + 2 / 3 + 3 / 4) / 3  # class-0 scores .9(+) .7 .6(+) .4(+) .3
    assert v1 == pytest.approx(
        {
            "acc": 3 / 5,
            "sensitivity": 1 / 2,
            "specificity": 2 / 3,
            "precision": 1 / 2,
            "g_mean": math.sqrt(1 / 3),
            "f1": 1 / 2,
            "mcc": 1 / 6,
            "auroc": 4 / 6,
            "aupr": (ap0 + ap1) / 2,  # 7/9: the code averages both one-hot columns
        },
        abs=1e-12,
    )
    cur = retfound_current(y, p1, "binary")
    assert cur == pytest.approx(
        {
            "accuracy": 3 / 5,
            "f1": (2 / 3 + 1 / 2) / 2,
            "precision": (2 / 3 + 1 / 2) / 2,
            "recall": (2 / 3 + 1 / 2) / 2,
            "kappa": 1 / 6,
            "auroc": 2 / 3,
            "aupr": 7 / 9,
            "score": 17 / 36,
        },
        abs=1e-12,
    )


# Worked 5-class example with class 3 absent from the test set (but predicted once). y_pred = arg-max:
#   case    0  1  2  3  4  5  6  7  8  9
#   y_true  0  0  1  1  1  2  2  4  4  4
#   y_pred  0  1  1  1  3  0  4  4  4  2
# one-vs-rest (TP, FP, FN, TN): class 0 (1, 1, 1, 7), class 1 (2, 1, 1, 6), class 2 (0, 1, 2, 7),
# class 3 (0, 1, 0, 9), class 4 (2, 1, 1, 6). Probabilities: 0.6 on the predicted class, 0.1 elsewhere, so
# a class's scores take two values and (npos positives of n = 10)
#   AP_c    = (TP / npos) (TP / (TP + FP)) + (1 - TP / npos) (npos / n)
#   AUROC_c = (TP TN + (TP FP + FN TN) / 2) / (npos (n - npos)):
# AP: class 0 1/4 + 1/10 = 7/20, class 1 4/9 + 1/10 = 49/90, class 2 0 + 1/5 = 1/5, class 4 = 49/90, sum 59/36;
# AUROC: class 0 11/16, class 1 16/21, class 2 7/16, class 4 16/21 -> mean over the present classes 445/672.
# Class 3 has no positive case: sklearn's average_precision_score scores it 0 (with a warning).
ABSENT_Y = np.array([0, 0, 1, 1, 1, 2, 2, 4, 4, 4])
ABSENT_PRED = np.array([0, 1, 1, 1, 3, 0, 4, 4, 4, 2])
ABSENT_P = np.full((10, 5), 0.1)
ABSENT_P[np.arange(10), ABSENT_PRED] = 0.6
ABSENT_AUROC = 445 / 672
ABSENT_AP_SUM = 59 / 36


def misc_measures_reference(y, pred, k):
    """RETFound's paper-era per-class measures, written from their definition (not the code): for each
    class c = 1..K-1 of "c vs rest", plain ratios that are NaN when 0/0; F1 = 2PR / (P + R); then the mean
    of each measure over the classes where it is not NaN (the original's plain mean would be NaN)."""

    def ratio(a, b):
        return a / b if b != 0 else float("nan")

    values = {name: [] for name in ("acc", "sensitivity", "specificity", "precision", "g_mean", "f1", "mcc")}
    for c in range(1, k):
        tp = int(np.sum((y == c) & (pred == c)))
        fp = int(np.sum((y != c) & (pred == c)))
        fn = int(np.sum((y == c) & (pred != c)))
        tn = int(np.sum((y != c) & (pred != c)))
        sens, spec, prec = ratio(tp, tp + fn), ratio(tn, tn + fp), ratio(tp, tp + fp)
        values["acc"].append((tp + tn) / len(y))
        values["sensitivity"].append(sens)
        values["specificity"].append(spec)
        values["precision"].append(prec)
        values["g_mean"].append(math.sqrt(sens * spec) if not math.isnan(sens * spec) else float("nan"))
        values["f1"].append(ratio(2 * prec * sens, prec + sens) if not math.isnan(prec + sens) else float("nan"))
        values["mcc"].append(ratio(tp * tn - fp * fn, math.sqrt((tn + fp) * (tn + fn) * (tp + fn) * (tp + fp))))
    return {name: float(np.mean([v for v in vals if not math.isnan(v)])) for name, vals in values.items()}


def test_sklearn_scores_a_class_without_positives_ap_zero():
    """The convention the RETFound aupr keeps (and retflow's own aupr does not): AP 0, averaged in."""
    onehot = np.eye(5)[ABSENT_Y]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No positive class found in y_true"
        assert skm.average_precision_score(onehot[:, 3], ABSENT_P[:, 3]) == 0.0
        macro = skm.average_precision_score(onehot, ABSENT_P, average="macro")
    assert macro == pytest.approx(ABSENT_AP_SUM / 5, abs=1e-12)


def test_retfound_v1_absent_class_worked_example():
    got = retfound_v1(ABSENT_Y, ABSENT_P, "multiclass")
    expected = {
        "acc": (0.8 + 0.7 + 0.9 + 0.8) / 4,
        "sensitivity": (2 / 3 + 0 + 2 / 3) / 3,  # class 3: 0/0, skipped
        "specificity": (6 / 7 + 7 / 8 + 9 / 10 + 6 / 7) / 4,
        "precision": (2 / 3 + 0 + 0 + 2 / 3) / 4,
        "g_mean": (math.sqrt(4 / 7) + 0 + math.sqrt(4 / 7)) / 3,
        "f1": 2 / 3,  # classes 2 and 3 have TP = 0: 2PR/(P+R) is 0/0 (2TP/(2TP+FP+FN) averaged in would give 1/3)
        "mcc": (11 / 21 - 1 / 6 + 11 / 21) / 3,  # class 3: a zero margin, 0/0
        "auroc": ABSENT_AUROC,  # over the present classes (RETFound's roc_auc_score raises or gives NaN)
        "aupr": ABSENT_AP_SUM / 5,  # over all five classes, class 3 scored 0, as sklearn does
    }
    assert got == pytest.approx(expected, abs=1e-12)
    reference = misc_measures_reference(ABSENT_Y, ABSENT_PRED, 5)
    assert {k: got[k] for k in reference} == pytest.approx(reference, abs=1e-12)
    onehot = np.eye(5)[ABSENT_Y]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert got["aupr"] == pytest.approx(skm.average_precision_score(onehot, ABSENT_P, average="macro"), abs=1e-12)
    # the same reference on random data with an absent class and TP = 0 classes
    y, p = fake_predictions(60, 6, seed=4, signal=0.3)
    y[y == 2] = 5
    v1 = retfound_v1(y, p, "multiclass")
    ref = misc_measures_reference(y, p.argmax(1), 6)
    assert {k: v1[k] for k in ref} == pytest.approx(ref, abs=1e-12)


def test_retfound_current_absent_class_worked_example():
    got = retfound_current(ABSENT_Y, ABSENT_P, "multiclass")
    onehot, pred_onehot = np.eye(5)[ABSENT_Y], np.eye(5)[ABSENT_PRED]
    kappa = skm.cohen_kappa_score(ABSENT_Y, ABSENT_PRED)
    f1 = (1 / 2 + 2 / 3 + 0 + 0 + 2 / 3) / 5  # 11/30: absent class 3 and class 2 count as 0
    assert got == pytest.approx(
        {
            "accuracy": 1 / 2,
            "f1": f1,
            "precision": 11 / 30,
            "recall": 11 / 30,
            "kappa": kappa,
            "auroc": ABSENT_AUROC,
            "aupr": ABSENT_AP_SUM / 5,
            "score": (f1 + ABSENT_AUROC + kappa) / 3,
        },
        abs=1e-12,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert got["f1"] == pytest.approx(skm.f1_score(onehot, pred_onehot, average="macro", zero_division=0))
        assert got["precision"] == pytest.approx(
            skm.precision_score(onehot, pred_onehot, average="macro", zero_division=0))
        assert got["recall"] == pytest.approx(skm.recall_score(onehot, pred_onehot, average="macro", zero_division=0))
        assert got["aupr"] == pytest.approx(skm.average_precision_score(onehot, ABSENT_P, average="macro"))


def test_macro_aupr_leaves_absent_classes_out_everywhere():
    """retflow's own aupr: one convention in the point value, the bootstrap replicates and the per-class table."""
    got = compute_metrics(ABSENT_Y, ABSENT_P, "multiclass")
    assert got["aupr"] == pytest.approx(ABSENT_AP_SUM / 4, abs=1e-12)  # classes 0, 1, 2, 4
    assert got["auroc"] == pytest.approx(ABSENT_AUROC, abs=1e-12)
    pc = per_class_metrics(ABSENT_Y, ABSENT_P, "multiclass")
    assert math.isnan(pc["aupr"][3])
    assert pc["aupr"][:3] + pc["aupr"][4:] == pytest.approx([7 / 20, 49 / 90, 1 / 5, 49 / 90], abs=1e-12)
    assert replicate_metrics(ABSENT_Y, ABSENT_P, "multiclass", np.ones((1, 10)))["aupr"][0] == pytest.approx(
        ABSENT_AP_SUM / 4, abs=1e-12)
    # a replicate without class 2 either: the mean over classes 0, 1 and 4, as compute_metrics on the resample
    w = np.array([[1, 2, 1, 1, 0, 0, 0, 1, 2, 1]])
    idx = np.repeat(np.arange(10), w[0])
    rep = replicate_metrics(ABSENT_Y, ABSENT_P, "multiclass", w)
    direct = compute_metrics(ABSENT_Y[idx], ABSENT_P[idx], "multiclass")
    ap = [skm.average_precision_score(ABSENT_Y[idx] == c, ABSENT_P[idx, c]) for c in (0, 1, 4)]
    assert rep["aupr"][0] == pytest.approx(direct["aupr"], abs=1e-12) == pytest.approx(np.mean(ap), abs=1e-12)
    rep_pc = replicate_per_class(ABSENT_Y, ABSENT_P, "multiclass", w)
    assert np.isnan(rep_pc["aupr"][0, [2, 3]]).all()
    boot = bootstrap_all(ABSENT_Y, ABSENT_P, "multiclass", n_boot=50, seed=0)
    assert boot["metrics"]["aupr"]["value"] == pytest.approx(ABSENT_AP_SUM / 4, abs=1e-12)
    assert math.isnan(boot["per_class"]["aupr"][3]["value"]) and math.isnan(boot["per_class"]["aupr"][3]["ci_low"])
    assert "not scored AP 0" in RANKING_CONVENTION["multiclass"]


def test_retfound_definitions_match_sklearn_one_hot_code_path():
    """On data with every class present, the re-implementations equal sklearn called as RETFound calls it."""
    y, p = fake_predictions(200, 5, seed=21)
    pred = p.argmax(1)
    onehot, pred_onehot = np.eye(5)[y], np.eye(5)[pred]
    cur = retfound_current(y, p, "ordinal")
    f1 = skm.f1_score(onehot, pred_onehot, average="macro", zero_division=0)
    auroc = skm.roc_auc_score(onehot, p, average="macro")
    kappa = skm.cohen_kappa_score(y, pred)
    assert cur["f1"] == pytest.approx(f1, abs=1e-12)
    assert cur["precision"] == pytest.approx(skm.precision_score(onehot, pred_onehot, average="macro", zero_division=0))
    assert cur["recall"] == pytest.approx(skm.recall_score(onehot, pred_onehot, average="macro", zero_division=0))
    assert cur["auroc"] == pytest.approx(auroc, abs=1e-12)
    assert cur["aupr"] == pytest.approx(skm.average_precision_score(onehot, p, average="macro"), abs=1e-12)
    assert cur["score"] == pytest.approx((f1 + auroc + kappa) / 3, abs=1e-12)
    v1 = retfound_v1(y, p, "ordinal")
    mcm = skm.multilabel_confusion_matrix(y, pred, labels=range(5))[1:]
    assert v1["acc"] == pytest.approx(np.mean([(m[0, 0] + m[1, 1]) / m.sum() for m in mcm]), abs=1e-12)
    assert v1["auroc"] == pytest.approx(auroc, abs=1e-12)


# ---------------------------------------------------------------- multilabel and regression


def fake_multilabel(n, k, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < rng.uniform(0.15, 0.5, k)).astype(int)
    p = 1 / (1 + np.exp(-(rng.normal(size=(n, k)) + 1.5 * (2 * y - 1))))
    return y, np.round(p, 2)  # rounding makes ties


def test_multilabel_metrics_match_sklearn():
    y, p = fake_multilabel(250, 4, seed=2)
    pred = (p >= 0.5).astype(int)
    got = compute_metrics(y, p, "multilabel")
    assert list(got) == METRICS_BY_TYPE["multilabel"] and PRIMARY_METRIC["multilabel"] == "auroc"
    mcm = skm.multilabel_confusion_matrix(y, pred)
    ref = {
        "auroc": skm.roc_auc_score(y, p, average="macro"),
        "aupr": skm.average_precision_score(y, p, average="macro"),
        "f1": skm.f1_score(y, pred, average="macro", zero_division=0),
        "precision": skm.precision_score(y, pred, average="macro", zero_division=0),
        "sensitivity": skm.recall_score(y, pred, average="macro", zero_division=0),
        "specificity": np.mean(mcm[:, 0, 0] / (mcm[:, 0, 0] + mcm[:, 0, 1])),
        "subset_accuracy": skm.accuracy_score(y, pred),
        "hamming_accuracy": 1 - skm.hamming_loss(y, pred),
    }
    for name, value in ref.items():
        assert got[name] == pytest.approx(value, abs=1e-9), name
    pc = per_class_metrics(y, p, "multilabel")
    np.testing.assert_allclose(pc["auroc"], [skm.roc_auc_score(y[:, j], p[:, j]) for j in range(4)], atol=1e-9)
    np.testing.assert_allclose(pc["aupr"], skm.average_precision_score(y, p, average=None), atol=1e-9)
    np.testing.assert_allclose(pc["f1"], skm.f1_score(y, pred, average=None), atol=1e-9)
    np.testing.assert_allclose(pc["precision"], skm.precision_score(y, pred, average=None), atol=1e-9)
    np.testing.assert_allclose(pc["sensitivity"], skm.recall_score(y, pred, average=None), atol=1e-9)


def test_multilabel_absent_sign():
    y, p = fake_multilabel(100, 3, seed=4)
    y[:, 1] = 0  # sign 1 never present
    assert absent_classes(y, p, "multilabel") == [1]
    got = compute_metrics(y, p, "multilabel")
    present = [0, 2]
    assert got["auroc"] == pytest.approx(skm.roc_auc_score(y[:, present], p[:, present]), abs=1e-12)
    pred = (p >= 0.5).astype(int)
    assert got["f1"] == pytest.approx(skm.f1_score(y[:, present], pred[:, present], average="macro"), abs=1e-12)
    assert math.isnan(per_class_metrics(y, p, "multilabel")["auroc"][1])
    with pytest.raises(ValueError):
        compute_metrics(y, p + 1, "multilabel")


def test_regression_metrics_match_sklearn_and_scipy():
    rng = np.random.default_rng(5)
    y = rng.normal(60, 10, 200)
    pred = y + rng.normal(0, 5, 200)
    got = compute_metrics(y, pred, "regression")
    assert list(got) == METRICS_BY_TYPE["regression"] and PRIMARY_METRIC["regression"] == "mae"
    assert {"mae", "rmse"} <= LOWER_IS_BETTER
    ref = {
        "mae": skm.mean_absolute_error(y, pred),
        "rmse": math.sqrt(skm.mean_squared_error(y, pred)),
        "r2": skm.r2_score(y, pred),
        "pearson": stats.pearsonr(y, pred)[0],
        "spearman": stats.spearmanr(y, pred)[0],
    }
    assert got == pytest.approx(ref, abs=1e-9)
    constant = compute_metrics(y, np.full(200, 60.0), "regression")
    assert math.isnan(constant["pearson"]) and math.isnan(constant["spearman"])
    assert per_class_metrics(y, pred, "regression") == {} and absent_classes(y, pred, "regression") == []


@pytest.mark.parametrize("task_type", ["multilabel", "regression"])
def test_vectorised_replicates_new_types_equal_direct(task_type):
    rng = np.random.default_rng(8)
    if task_type == "multilabel":
        y, p = fake_multilabel(80, 3, seed=8)
    else:
        y = np.round(rng.normal(size=80), 1)  # ties
        p = np.round(y + rng.normal(size=80), 1)
    for size in [4, 10, 80]:
        for _ in range(8):
            idx = rng.integers(0, 80, size)
            w = np.bincount(idx, minlength=80)[None]
            fast = replicate_metrics(y, p, task_type, w)
            slow = compute_metrics(y[idx], p[idx], task_type)
            for name, value in slow.items():
                assert fast[name][0] == pytest.approx(value, abs=1e-9, nan_ok=True), (name, size)
            if task_type == "multilabel":
                fast_pc = replicate_per_class(y, p, task_type, w)
                for name, values in per_class_metrics(y[idx], p[idx], task_type).items():
                    np.testing.assert_allclose(fast_pc[name][0], values, atol=1e-9, err_msg=name)


@pytest.mark.parametrize("task_type,k", [("binary", 2), ("ordinal", 4)])
def test_vectorised_per_class_replicates_equal_direct(task_type, k):
    y, p = fake_predictions(60, k, seed=9, ties=True)
    rng = np.random.default_rng(1)
    for size in [5, 60]:
        for _ in range(5):
            idx = rng.integers(0, 60, size)
            w = np.bincount(idx, minlength=60)[None]
            fast = replicate_per_class(y, p, task_type, w)
            for name, values in per_class_metrics(y[idx], p[idx], task_type).items():
                np.testing.assert_allclose(fast[name][0], values, atol=1e-9, err_msg=name)


@pytest.mark.parametrize("task_type", ["multilabel", "regression"])
def test_bootstrap_new_types_seeded(task_type):
    if task_type == "multilabel":
        y, p = fake_multilabel(120, 3, seed=11)
    else:
        rng = np.random.default_rng(11)
        y = rng.normal(size=120)
        p = y + rng.normal(size=120)
    a = bootstrap_all(y, p, task_type, n_boot=200, seed=1)
    assert a == bootstrap_all(y, p, task_type, n_boot=200, seed=1)
    assert a != bootstrap_all(y, p, task_type, n_boot=200, seed=2)
    assert set(a["metrics"]) == set(METRICS_BY_TYPE[task_type])
    for name, c in a["metrics"].items():
        assert c["ci_low"] <= c["value"] <= c["ci_high"], name
    if task_type == "multilabel":
        assert len(a["per_class"]["auroc"]) == 3
    else:
        assert a["per_class"] == {}


def test_evaluate_multilabel_and_regression_json(tmp_path):
    y, p = fake_multilabel(90, 3, seed=12)
    y[:, 2] = 0
    df = pd.DataFrame({"image_id": [f"i{i}" for i in range(90)]})
    for j in range(3):
        df[f"y_true_{j}"] = y[:, j]
        df[f"prob_{j}"] = p[:, j]
    df.to_parquet(tmp_path / "ml.parquet")
    meta = dict(META, task="oct_signs", task_type="multilabel", classes=["drusen", "fluid", "ez_loss"])
    res = evaluate_predictions(tmp_path / "ml.parquet", meta, tmp_path / "ml.json", n_boot=50, seed=0)
    assert set(res["metrics"]) == set(METRICS_BY_TYPE["multilabel"]) and res["primary_metric"] == "auroc"
    assert res["absent_classes"] == ["ez_loss"] and res["class_counts"][2] == 0
    assert set(res["per_class"]) == {"drusen", "fluid", "ez_loss"} and set(res["roc"]) == {"drusen", "fluid"}
    assert np.sum(res["confusion_per_class"]["drusen"]) == 90 and "retfound_v1" not in res

    rng = np.random.default_rng(0)
    target = rng.normal(60, 8, 70)
    pd.DataFrame(
        {"image_id": range(70), "y_true": target, "y_pred": target + rng.normal(0, 3, 70)}
    ).to_parquet(tmp_path / "reg.parquet")
    out = tmp_path / "reg.json"
    settings = report_settings.evaluation(eval_config(), "finetune", "age", "scratch", 1, 0)
    assert (settings.task_type, settings.classes) == ("regression", ())
    args = ["--predictions", str(tmp_path / "reg.parquet"), "--out", str(out)]
    assert main(["--settings", settings.to_json(), *args]) == 0
    data = json.loads(out.read_text())
    assert set(data["metrics"]) == set(METRICS_BY_TYPE["regression"]) and data["primary_metric"] == "mae"
    assert data["lower_is_better"] == ["mae", "rmse"] and data["classes"] == []
    assert data["metrics"]["mae"]["ci_low"] < data["metrics"]["mae"]["value"] < data["metrics"]["mae"]["ci_high"]
    with pytest.raises(ConfigError, match=r"^--settings: classes are required for task type multiclass$"):
        main(["--settings", settings.replace(task_type="multiclass").to_json(), *args])  # only regression has none
