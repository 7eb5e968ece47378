"""Paired model comparison: DeLong's test and the paired bootstrap (retflow.evaluate.compare)."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn import metrics as skm

from retflow.evaluate.bootstrap import replicate_metrics, resample_counts
from retflow.evaluate.compare import (
    compare_predictions,
    delong_components,
    delong_covariance,
    delong_test,
    main,
    paired_bootstrap,
)
from retflow.evaluate.metrics import METRICS_BY_TYPE, PRIMARY_METRIC


def correlated_binary(n, seed, shift_b=0.0, ties=False):
    """Labels and two correlated score vectors (b weaker by ``shift_b``)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    common = rng.normal(size=n)
    a = common + rng.normal(size=n) + 1.2 * y
    b = common + rng.normal(size=n) + (1.2 - shift_b) * y
    if ties:
        a, b = np.round(a), np.round(b)
    return y, a, b


def test_delong_components_equal_brute_force():
    y, a, b = correlated_binary(60, seed=0, ties=True)
    aucs, v10, v01 = delong_components(y, np.vstack([a, b]))
    for r, s in enumerate((a, b)):
        x, z = s[y == 1], s[y == 0]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])  # all positive/negative pairs
        np.testing.assert_allclose(v10[r], psi.mean(axis=1), atol=1e-12)
        np.testing.assert_allclose(v01[r], psi.mean(axis=0), atol=1e-12)
        assert aucs[r] == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)


def test_delong_hand_example():
    # positives: a = (.8, .4), b = (.6, .2); negatives: a = (.1, .5, .3), b = (.3, .1, .6)
    # V10_a = (1, 2/3), V01_a = (1, 1/2, 1): AUC_a = 5/6
    # V10_b = (5/6, 1/3), V01_b = (1/2, 1, 1/4) (tie .6 = .6 counts 1/2): AUC_b = 7/12
    # S10 = [[1/18, 1/12], [1/12, 1/8]], S01 = [[1/12, -5/48], [-5/48, 7/48]]
    # Cov = S10 / 2 + S01 / 3 = [[1/18, 1/144], [1/144, 1/9]]; var(diff) = 1/18 + 1/9 - 2/144 = 11/72
    y = np.array([1, 1, 0, 0, 0])
    a = np.array([0.8, 0.4, 0.1, 0.5, 0.3])
    b = np.array([0.6, 0.2, 0.3, 0.1, 0.6])
    aucs, cov = delong_covariance(y, np.vstack([a, b]))
    np.testing.assert_allclose(aucs, [5 / 6, 7 / 12], atol=1e-12)
    np.testing.assert_allclose(cov, [[1 / 18, 1 / 144], [1 / 144, 1 / 9]], atol=1e-12)
    res = delong_test(y, a, b)
    z = (1 / 4) / math.sqrt(11 / 72)
    assert res["difference"] == pytest.approx(1 / 4, abs=1e-12)
    assert res["se"] == pytest.approx(math.sqrt(11 / 72), abs=1e-12)
    assert res["z"] == pytest.approx(z, abs=1e-9)  # 0.6396
    assert res["p_value"] == pytest.approx(2 * stats.norm.sf(z), abs=1e-12)  # 0.522
    assert res["ci_low"] == pytest.approx(1 / 4 - 1.959963985 * math.sqrt(11 / 72), abs=1e-8)


def test_delong_variance_matches_bootstrap():
    """DeLong's variance of AUC_a - AUC_b agrees with a brute-force bootstrap estimate."""
    y, a, b = correlated_binary(400, seed=3, shift_b=0.4)
    res = delong_test(y, a, b)
    probs = lambda s: np.column_stack([1 - 1 / (1 + np.exp(-s)), 1 / (1 + np.exp(-s))])  # noqa: E731
    counts = np.concatenate(list(resample_counts(y.size, 3000, seed=0)))
    auc_a = replicate_metrics(y, probs(a), "binary", counts)["auroc"]
    auc_b = replicate_metrics(y, probs(b), "binary", counts)["auroc"]
    assert np.var(auc_a - auc_b, ddof=1) == pytest.approx(res["se"] ** 2, rel=0.1)
    assert np.var(auc_a, ddof=1) == pytest.approx(res["var_a"], rel=0.1)
    assert np.var(auc_b, ddof=1) == pytest.approx(res["var_b"], rel=0.1)


def test_delong_p_values_calibrated_under_null():
    """Two equally good models: about 5 % of tests reject at alpha = 0.05."""
    rejections = 0
    for seed in range(300):
        y, a, b = correlated_binary(80, seed=100 + seed)
        rejections += delong_test(y, a, b)["p_value"] < 0.05
    assert 0.02 <= rejections / 300 <= 0.09


def test_identical_models():
    y, a, _ = correlated_binary(50, seed=1)
    res = delong_test(y, a, a)
    assert res["difference"] == 0 and res["p_value"] == 1.0
    p = np.column_stack([1 - 1 / (1 + np.exp(-a)), 1 / (1 + np.exp(-a))])
    boot = paired_bootstrap(y, p, p, "binary", "accuracy", n_boot=100)
    assert boot["difference"] == 0 and boot["p_value"] == 1.0 and boot["ci_low"] == boot["ci_high"] == 0


def _fake(task_type, n, seed, strength):
    rng = np.random.default_rng(seed)
    if task_type == "regression":
        y = rng.normal(size=n)
        return y, y + rng.normal(size=n) / strength
    if task_type == "multilabel":
        y = (rng.random((n, 3)) < 0.4).astype(int)
        return y, 1 / (1 + np.exp(-(rng.normal(size=(n, 3)) + strength * (2 * y - 1))))
    k = {"binary": 2, "multiclass": 3, "ordinal": 4}[task_type]
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += strength
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("task_type", ["binary", "multiclass", "ordinal", "multilabel", "regression"])
def test_paired_bootstrap_every_task_type(task_type):
    y, good = _fake(task_type, 300, seed=1, strength=3.0)
    _, bad = _fake(task_type, 300, seed=2, strength=0.3)
    if task_type not in ("regression", "multilabel"):
        bad = bad[np.random.default_rng(0).permutation(300)]  # unrelated to y
    metric = PRIMARY_METRIC[task_type]
    res = compare_predictions(y, good, bad, task_type, n_boot=300, seed=4)
    assert res["metric"] == metric and res["n"] == 300
    assert res["method"] == ("delong" if task_type == "binary" else "paired_bootstrap")
    assert res["lower_is_better"] == (task_type == "regression")
    assert res["ci_low"] <= res["difference"] <= res["ci_high"]
    assert res["p_value"] < 0.01
    assert (res["difference"] < 0) == (task_type == "regression")  # lower MAE for the good model
    assert res == compare_predictions(y, good, bad, task_type, n_boot=300, seed=4)
    boot = res["paired_bootstrap"]
    assert boot["n_valid"] == 300 and boot["ci_low"] <= boot["difference"] <= boot["ci_high"]
    for other in METRICS_BY_TYPE[task_type][:3]:
        r = paired_bootstrap(y, good, good, task_type, other, n_boot=50)
        assert r["difference"] == 0 and r["p_value"] == 1.0


def test_bootstrap_and_delong_agree_for_binary_auroc():
    y, a, b = correlated_binary(300, seed=7, shift_b=0.3)
    to_p = lambda s: 1 / (1 + np.exp(-s))  # noqa: E731
    res = compare_predictions(y, to_p(a), to_p(b), "binary", "auroc", n_boot=1000, seed=0)
    boot, dl = res["paired_bootstrap"], res["delong"]
    assert boot["difference"] == pytest.approx(dl["difference"], abs=1e-12)
    assert boot["ci_low"] == pytest.approx(dl["ci_low"], abs=0.02)
    assert boot["ci_high"] == pytest.approx(dl["ci_high"], abs=0.02)


def _write(path, ids, y, p):
    df = pd.DataFrame({"image_id": ids, "y_true": y})
    for c in range(p.shape[1]):
        df[f"prob_{c}"] = p[:, c]
    df["y_pred"] = p.argmax(1)
    df.to_parquet(path, index=False)


def test_cli_aligns_by_image_id(tmp_path):
    y, pa = _fake("multiclass", 120, seed=1, strength=2.0)
    _, pb = _fake("multiclass", 120, seed=2, strength=1.0)
    ids = np.array([f"img{i:03d}" for i in range(120)])
    perm = np.random.default_rng(0).permutation(120)
    _write(tmp_path / "a.parquet", ids, y, pa)
    _write(tmp_path / "b.parquet", ids[perm], y[perm], pb[perm])  # same images, other order
    out = tmp_path / "compare.json"
    args = ["--a", str(tmp_path / "a.parquet"), "--b", str(tmp_path / "b.parquet"), "--task-type", "multiclass",
            "--metric", "auroc", "--out", str(out), "--n-boot", "200"]
    assert main(args) == 0
    data = json.loads(out.read_text())
    expected = compare_predictions(y, pa, pb, "multiclass", "auroc", n_boot=200, seed=0)
    assert data["value_a"] == pytest.approx(expected["value_a"])
    assert data["value_b"] == pytest.approx(expected["value_b"])
    assert data["p_value"] == pytest.approx(expected["p_value"]) and data["method"] == "paired_bootstrap"
    assert data["a"].endswith("a.parquet")

    _write(tmp_path / "c.parquet", ids[:-2], y[:-2], pb[:-2])  # two images missing
    with pytest.raises(SystemExit, match="different images: 2 only in"):
        main(args[:2] + ["--b", str(tmp_path / "c.parquet")] + args[4:])
    y_bad = y.copy()
    y_bad[5] = (y_bad[5] + 1) % 3
    _write(tmp_path / "d.parquet", ids, y_bad, pb)
    with pytest.raises(SystemExit, match="different y_true"):
        main(args[:2] + ["--b", str(tmp_path / "d.parquet")] + args[4:])
    with pytest.raises(SystemExit):
        main(args[:-4] + ["--metric", "mae", "--out", str(out)])  # not a multiclass metric
