"""Tests of the off-centre OCT phantom kind ``oct_offcentre`` (retflow.phantoms.offcentre); seconds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from retflow.data.preprocess import resize
from retflow.data.volumes import central_bscans
from retflow.phantoms import render_bscan, sample_offcentre_eye
from retflow.phantoms.cli import main as cli_main
from retflow.phantoms.generate import generate_dataset, load_volume, main
from retflow.phantoms.offcentre import LABEL, Z_CENTRAL, Z_MIN, lesion_positions

COLUMNS = ["volume", "patient_id", "eye", LABEL, "foveal_drusen", "irf_slices"]


def _volume(seed: int, pos: np.ndarray, lesion: bool, drusen: bool, size: int = 96, style: str = "A"):
    """One eye drawn from ``seed`` and rendered at ``pos`` (render stream ``1000 + seed``)."""
    e = sample_offcentre_eye(np.random.default_rng(seed), pos, lesion, drusen)
    r = np.random.default_rng(1000 + seed)
    out = [render_bscan(e, r, (size, size), p, style) for p in pos.tolist()]
    return e, np.stack([img for img, _ in out]), [s for _, s in out]


@pytest.mark.parametrize("n_slices", [3, 9, 16])
def test_lesions_lie_off_centre_only(n_slices):
    pos = np.linspace(-1.0, 1.0, n_slices)
    central = np.abs(pos) < Z_MIN
    k = 3 if n_slices >= 9 else 1  # what a central-B-scan model reads (preprocess.oct.bscans)
    assert central[[i for i, _ in central_bscans(np.zeros((n_slices, 1, 1)), k)]].all()
    for seed in range(12):
        e, vol, signs = _volume(seed, pos, True, seed % 2 == 0, size=64)
        assert len(e.cysts) >= 3 and len(e.oedema) >= 1 and len(e.foci) >= 2
        for tab, rz in ((e.cysts, 3), (e.oedema, 3), (e.foci, 2)):
            assert (np.abs(tab[:, 1]) - tab[:, rz] >= Z_MIN - 1e-12).all()  # whole extent at |z| >= Z_MIN
        if len(e.drusen):
            assert (np.abs(e.drusen[:, 1]) + e.drusen[:, 3] <= Z_CENTRAL + 1e-12).all()
        irf = np.array([s["irf"] for s in signs], bool)
        assert irf.any() and not irf[central].any(), (seed, irf)
        # the same eye without the lesion: the central B-scans are bit-identical
        _, neg, neg_signs = _volume(seed, pos, False, seed % 2 == 0, size=64)
        np.testing.assert_array_equal(vol[central], neg[central])
        assert not np.array_equal(vol[~central], neg[~central])
        assert not any(s["irf"] for s in neg_signs)


def test_lesion_visible_at_model_resolution():
    """96 px B-scans resized to 64 px as the data stage does: the lesion's best slice changes
    many pixels clearly (cysts, the oedema's bump) in every positive eye."""
    pos = np.linspace(-1.0, 1.0, 9)
    for seed in range(10):
        _, pos_vol, _ = _volume(seed, pos, True, False)
        _, neg_vol, _ = _volume(seed, pos, False, False)
        diff = np.abs(np.stack([resize(b, 64) for b in pos_vol]).astype(int)
                      - np.stack([resize(b, 64) for b in neg_vol]).astype(int))
        assert (diff > 40).sum((1, 2)).max() >= 150, seed
        # dark cyst pixels inside the retina: present in the positive, absent from the negative
        assert ((np.stack([resize(b, 64) for b in pos_vol]) < 25) & (diff > 60)).sum() >= 8, seed


def test_lesion_positions():
    np.testing.assert_allclose(lesion_positions(np.linspace(-1, 1, 9)), [-1, -0.75, -0.5, 0.5, 0.75, 1])
    assert lesion_positions(np.linspace(-1, 1, 3)).tolist() == [-1.0, 1.0]
    with pytest.raises(ValueError, match="slices at"):
        sample_offcentre_eye(np.random.default_rng(0), np.zeros(1), True, False)


def _stats(b: np.ndarray) -> np.ndarray:
    """Simple pixel statistics of one B-scan: mean, std, percentiles, 16 row-band means, dark share."""
    b = b.astype(np.float32)
    return np.concatenate([[b.mean(), b.std()], np.percentile(b, [5, 25, 50, 75, 95]),
                           b.mean(1).reshape(16, -1).mean(1), [(b < 30).mean()]])


def _oof_auroc(x: np.ndarray, y: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=1000))
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    return float(roc_auc_score(y, cross_val_predict(model, x, y, cv=cv, method="predict_proba")[:, 1]))


def test_central_bscan_carries_no_label(tmp_path):
    """~100 generated volumes: a logistic regression on the central B-scan's pixel statistics is
    at chance (null AUROC s.e. ~0.06 here), the same statistics over the off-centre B-scans are
    not; the central content (foveal drusen) is independent of the label."""
    table = generate_dataset("oct_offcentre", tmp_path, n=100, seed=1, size=64, n_slices=9)
    y = table[LABEL].to_numpy()
    vols = np.stack([load_volume(tmp_path / "volumes" / v) for v in table["volume"]])
    per = np.stack([[_stats(b) for b in v] for v in vols])  # (volumes, slices, features)
    off = per[:, np.abs(np.linspace(-1, 1, 9)) >= Z_MIN]
    central = _oof_auroc(per[:, 4], y)
    assert 0.35 < central < 0.65, central
    assert _oof_auroc(np.concatenate([off.std(1), off.max(1) - off.mean(1)], 1), y) > 0.9
    # both classes hold both kinds of central content, in similar shares
    share = table.groupby(LABEL)["foveal_drusen"].mean()
    assert 0.3 < share[0] < 0.7 and 0.3 < share[1] < 0.7 and 0.35 < y.mean() < 0.65, share


def test_generate_offcentre_dataset(tmp_path):
    import nibabel as nib

    table = generate_dataset("oct_offcentre", tmp_path / "a", n=12, seed=5, size=48, n_slices=9)
    labels = pd.read_csv(tmp_path / "a" / "labels.csv", keep_default_na=False, dtype={"irf_slices": str})
    assert list(labels.columns) == COLUMNS and len(labels) == 12
    assert set(labels[LABEL]) == {0, 1} and set(labels["foveal_drusen"]) <= {0, 1}
    assert labels["volume"].iloc[0] == "P0000_R.nii.gz"
    for row in labels.itertuples():
        shown = [int(k) for k in row.irf_slices.split(";") if k]
        assert bool(shown) == bool(getattr(row, LABEL))
        assert all(abs(np.linspace(-1, 1, 9)[k]) >= Z_MIN for k in shown)
    nii = nib.load(tmp_path / "a" / "volumes" / labels["volume"].iloc[0])
    assert nii.shape == (48, 48, 9) and nii.get_data_dtype() == np.uint8
    # deterministic for a seed, different for another
    again = generate_dataset("oct_offcentre", tmp_path / "b", n=12, seed=5, size=48, n_slices=9)
    pd.testing.assert_frame_equal(table, again)
    for name in table["volume"]:
        np.testing.assert_array_equal(load_volume(tmp_path / "a" / "volumes" / name),
                                      load_volume(tmp_path / "b" / "volumes" / name))
    other = generate_dataset("oct_offcentre", tmp_path / "c", n=12, seed=6, size=48, n_slices=9)
    assert not np.array_equal(load_volume(tmp_path / "a" / "volumes" / "P0000_R.nii.gz"),
                              load_volume(tmp_path / "c" / "volumes" / other["volume"].iloc[0]))
    pool = generate_dataset("oct_offcentre", tmp_path / "pool", n=4, seed=5, size=32, n_slices=5, labelled=False)
    assert list(pool.columns) == ["volume", "patient_id", "eye"]


def test_offcentre_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"^n_slices: phantom kind oct_offcentre needs >= 3 B-scans per volume "
                       r"\(a central one and off-centre ones\), got 2; set phantom.n_slices to 3 or more$"):
        generate_dataset("oct_offcentre", tmp_path / "x", n=4, seed=1, size=32, n_slices=2)
    assert not (tmp_path / "x").exists()  # checked before anything is written
    with pytest.raises(ValueError, match="masks are generated for kinds"):
        generate_dataset("oct_offcentre", tmp_path / "y", n=4, seed=1, size=32, masks=True)


def test_offcentre_clis(tmp_path, capsys):
    assert main(["--kind", "oct_offcentre", "--n", "3", "--seed", "1", "--size", "32", "--n-slices", "5",
                 "--out", str(tmp_path / "gen")]) == 0
    assert "3 oct_offcentre volumes" in capsys.readouterr().out
    assert cli_main(["--kind", "oct_offcentre", "--n", "4", "--seed", "2", "--size", "32", "--n-slices", "3",
                     "--style", "B", "--out", str(tmp_path / "wf")]) == 0
    labels = pd.read_csv(tmp_path / "wf" / "labels.csv")
    assert list(labels.columns) == COLUMNS and len(labels) == 4
    assert load_volume(tmp_path / "wf" / "volumes" / labels["volume"].iloc[0]).shape == (3, 32, 32)


def test_workflow_entry_point_reports_one_line(tmp_path):
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, str(root / "workflow_scripts" / "phantoms.py"), "--kind", "oct_offcentre",
                          "--n", "4", "--seed", "1", "--n-slices", "1", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, cwd=root, check=False)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        ("ERROR: n_slices: phantom kind oct_offcentre needs >= 3 B-scans per volume (a central one and "
         "off-centre ones), got 1; set phantom.n_slices to 3 or more")]


def test_the_config_check_refuses_too_few_slices_before_any_job():
    import yaml

    from conftest import ROOT
    from retflow.config import semantic_errors
    from retflow.settings import validate

    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["datasets"]["offc"] = {"modality": "oct", "role": "labelled", "source": "phantom",
                               "phantom": {"kind": "oct_offcentre", "n": 20, "seed": 1, "n_slices": 2}}
    assert ("datasets.offc.phantom.n_slices: phantom kind oct_offcentre needs >= 3 B-scans per volume (a central "
            "one and off-centre ones), got 2; set it to 3 or more") in semantic_errors(validate(cfg))
    cfg["datasets"]["offc"]["phantom"]["n_slices"] = 9
    assert not [e for e in semantic_errors(validate(cfg)) if "offc" in e]
