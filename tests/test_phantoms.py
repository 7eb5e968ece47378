"""Tests of the procedural retinal phantoms (retflow.phantoms); the whole file runs in seconds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from retflow.phantoms import (
    DIAGNOSES, KEY_SIGNS, apply_style, cfp_shape, make_cfp, make_oct_bscan, make_oct_volume,
    render_bscan, sample_oct_eye,
)
from retflow.phantoms.generate import generate_dataset, load_volume, main, save_volume


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------- CFP


def test_cfp_shape_dtype_and_determinism():
    a = make_cfp(rng(3), 64, 2, 0.4)
    assert a.shape == (64, 80, 3) and a.dtype == np.uint8
    assert cfp_shape(128) == (128, 160)
    np.testing.assert_array_equal(a, make_cfp(rng(3), 64, 2, 0.4))
    assert not np.array_equal(a, make_cfp(rng(4), 64, 2, 0.4))
    with pytest.raises(ValueError):
        make_cfp(rng(0), 64, 5, 0.4)


@pytest.mark.parametrize("style", ["A", "B"])
def test_cfp_black_corners_and_bright_field(style):
    for seed in range(3):
        img = make_cfp(rng(seed), 96, 3, 0.4, style=style)
        for corner in (img[:6, :6], img[:6, -6:], img[-6:, :6], img[-6:, -6:]):
            assert corner.max() == 0
        assert img[:, :4].max() == 0 and img[:, -4:].max() == 0  # side borders of a wide frame
        h, w = img.shape[:2]
        assert img[h // 2 - 10: h // 2 + 10, w // 2 - 10: w // 2 + 10].mean() > 40


def _disc_column(img: np.ndarray) -> int:
    """Column of the brightest (smoothed) spot: the optic disc."""
    g = np.asarray(Image.fromarray(img).convert("L").resize((img.shape[1] // 4, img.shape[0] // 4),
                                                             Image.BOX), np.float32)
    return int(np.unravel_index(np.argmax(g), g.shape)[1] * 4)


def test_cfp_disc_is_nasal():
    for seed in range(5):
        assert _disc_column(make_cfp(rng(seed), 128, 0, 0.4, eye="R")) > 80
        assert _disc_column(make_cfp(rng(seed), 128, 0, 0.4, eye="L")) < 80


def _pale_pixels(img: np.ndarray) -> int:
    """Cup proxy: pale (whitish) pixels; the fundus, vessels and disc rim have little blue."""
    return int((img[..., 2].astype(int) > 150).sum())


def test_cup_grows_with_cdr():
    # same eye (same seed), two cup-to-disc ratios
    for seed in range(10):
        big, small = make_cfp(rng(seed), 128, 0, 0.75), make_cfp(rng(seed), 128, 0, 0.3)
        assert _pale_pixels(big) > _pale_pixels(small)
    # independent eyes: glaucoma-range vs healthy-range ratios
    r = rng(99)
    healthy = [_pale_pixels(make_cfp(rng(100 + i), 128, 0, r.uniform(0.2, 0.5))) for i in range(20)]
    glaucoma = [_pale_pixels(make_cfp(rng(200 + i), 128, 0, r.uniform(0.55, 0.85))) for i in range(20)]
    assert np.mean(glaucoma) > 1.5 * np.mean(healthy)


def test_lesion_amount_increases_with_grade():
    # same eye at every grade; lesion amount = pixels that changed versus grade 0
    amounts = np.zeros((20, 5))
    for seed in range(20):
        base = make_cfp(rng(seed), 128, 0, 0.4).astype(int)
        for g in range(1, 5):
            diff = np.abs(make_cfp(rng(seed), 128, g, 0.4).astype(int) - base).sum(-1)
            amounts[seed, g] = (diff > 30).sum()
    means = amounts.mean(0)
    assert np.all(np.diff(means) > 0), means
    assert (amounts[:, 1] > 0).mean() > 0.8  # grade 1 almost always shows microaneurysms


def test_lesions_survive_the_demo_resolution():
    """At the demo's stored size (96 px photos, field cropped and resized to 64 px by the data
    stage) the lesion area still grows with grade and grade 1's microaneurysms stay visible."""
    from retflow.data.preprocess import preprocess_cfp

    def stored(seed, grade):
        return preprocess_cfp(make_cfp(rng(seed), 96, grade, 0.4), 64, True, "none")[0].astype(int)

    area = np.zeros((10, 5))
    for seed in range(10):
        base = stored(seed, 0)
        for g in range(1, 5):
            area[seed, g] = (np.abs(stored(seed, g) - base).sum(-1) > 40).sum()
    means = area.mean(0)
    assert np.all(np.diff(means) > 0), means
    assert (area[:, 1] >= 5).mean() >= 0.8, area[:, 1]  # microaneurysms cover stored pixels in most eyes
    assert means[1] < 0.01 * 64 * 64 < means[2]  # grade 1 is subtle, grade 2 is not
    assert means[4] > means[3] + 50, means  # neovascular tufts (+ pre-retinal blood) add visible area


def test_lesion_colours_on_independent_eyes():
    def counts(img):
        r, g, b = (img[..., c].astype(int) for c in range(3))
        yellow = (r > 170) & (g > 140) & (b < 120) & (g > 0.7 * r)
        return yellow.sum()

    y = {g: np.mean([counts(make_cfp(rng(1000 * g + i), 128, g, 0.4)) for i in range(20)]) for g in (0, 2, 3)}
    assert y[0] < y[2] < y[3], y


# ----------------------------------------------------------------------------- OCT


def test_oct_bscan_shape_determinism():
    img, signs = make_oct_bscan(rng(1), (64, 96), "dme")
    assert img.shape == (64, 96) and img.dtype == np.uint8
    assert set(signs) == set(KEY_SIGNS)
    img2, signs2 = make_oct_bscan(rng(1), (64, 96), "dme")
    np.testing.assert_array_equal(img, img2)
    assert signs == signs2
    assert not np.array_equal(img, make_oct_bscan(rng(2), (64, 96), "dme")[0])
    with pytest.raises(ValueError):
        make_oct_bscan(rng(0), (64, 64), "glaucoma")


def test_oct_key_signs_match_diagnosis():
    seen = {d: [] for d in DIAGNOSES}
    for d in DIAGNOSES:
        for seed in range(12):
            seen[d].append(make_oct_bscan(rng(seed), (96, 96), d, position=0.0)[1])
    assert all(sum(s.values()) == 0 for s in seen["normal"])
    assert all(s["drusen"] == 1 and s["irf"] == 0 and s["srf"] == 0 for s in seen["drusen"])
    assert all(s["irf"] == 1 and s["drusen"] == 0 and s["ped"] == 0 for s in seen["dme"])
    assert all(s["ped"] == 1 for s in seen["cnv"])
    assert np.mean([s["srf"] for s in seen["cnv"]]) > 0.5


def test_oct_pathology_is_drawn():
    """Same eye anatomy and speckle: a lesion changes the image only where the retina is."""
    normal, _ = make_oct_bscan(rng(5), (96, 96), "normal")
    for d in ("drusen", "dme", "cnv"):
        img, _ = make_oct_bscan(rng(5), (96, 96), d)
        changed = np.abs(img.astype(int) - normal.astype(int)) > 40
        assert changed.sum() > 20, d
        assert changed[:15].sum() == 0  # vitreous at the top is untouched


def test_oct_position_fades_pit_and_pathology():
    e = sample_oct_eye(rng(7), "dme")
    centre, s0 = render_bscan(e, rng(1), (96, 96), 0.0)
    edge, s1 = render_bscan(e, rng(1), (96, 96), 1.0)
    assert s0["irf"] == 1
    # the foveal pit: the retina starts deeper in the centre column than far from the fovea
    def ilm_row(img, col):
        prof = img[:, col - 2: col + 3].mean(1)
        return int(np.argmax(prof > 90))
    assert ilm_row(centre, 48) > ilm_row(edge, 48)


def test_oct_volume():
    vol, signs = make_oct_volume(rng(3), 5, (48, 64), "cnv")
    assert vol.shape == (5, 48, 64) and vol.dtype == np.uint8
    assert signs["ped"] == 1
    vol2, _ = make_oct_volume(rng(3), 5, (48, 64), "cnv")
    np.testing.assert_array_equal(vol, vol2)
    assert not np.array_equal(vol[0], vol[2])


# ----------------------------------------------------------------------------- styles


def test_style_b_differs_from_a():
    a = np.stack([make_cfp(rng(i), 96, 2, 0.4, style="A") for i in range(6)]).astype(float)
    b = np.stack([make_cfp(rng(i), 96, 2, 0.4, style="B") for i in range(6)]).astype(float)
    field_a, field_b = a.sum(-1) > 30, b.sum(-1) > 30
    ratio_a = a[..., 1][field_a].mean() / a[..., 0][field_a].mean()
    ratio_b = b[..., 1][field_b].mean() / b[..., 0][field_b].mean()
    assert ratio_b > ratio_a + 0.05  # yellow-green cast
    assert field_b.mean() < field_a.mean()  # smaller field of view
    sharp_a = np.abs(np.diff(a[..., 1], axis=2))[field_a[:, :, 1:]].mean()
    sharp_b = np.abs(np.diff(b[..., 1], axis=2))[field_b[:, :, 1:]].mean()
    assert sharp_b < sharp_a  # blur + lower native resolution
    oa, _ = make_oct_bscan(rng(1), (96, 96), "drusen", style="A")
    ob, _ = make_oct_bscan(rng(1), (96, 96), "drusen", style="B")
    assert ob[:10].mean() > oa[:10].mean()  # brighter noise floor in the vitreous


def test_apply_style_keeps_shape_and_black():
    img = np.zeros((32, 40, 3), np.uint8)
    img[8:24, 10:30] = (200, 90, 40)
    for style in ("A", "B"):
        out = apply_style(img, style, rng(0))
        assert out.shape == img.shape and out.dtype == np.uint8
        assert out[:3, :3].max() == 0
    oct_img = np.full((32, 32), 100, np.uint8)
    assert apply_style(oct_img, "B", rng(0)).shape == (32, 32)
    with pytest.raises(ValueError):
        apply_style(img, "C", rng(0))


# ----------------------------------------------------------------------------- writer


def test_generate_cfp_dataset(tmp_path):
    table = generate_dataset("cfp", tmp_path, n=8, seed=1, size=48)
    labels = pd.read_csv(tmp_path / "labels.csv")
    assert list(labels.columns) == ["image", "patient_id", "eye", "dr_grade", "glaucoma", "cdr"]
    assert len(labels) == 8 and labels["patient_id"].nunique() == 4
    assert (labels.groupby("patient_id")["eye"].apply(lambda s: sorted(s)) == pd.Series([["L", "R"]] * 4,
            index=sorted(labels["patient_id"].unique()))).all()
    assert (labels.groupby("patient_id")["glaucoma"].nunique() == 1).all()
    assert labels["dr_grade"].between(0, 4).all()
    g = labels["glaucoma"] == 1
    assert labels.loc[g, "cdr"].between(0.55, 0.85).all() and labels.loc[~g, "cdr"].between(0.2, 0.5).all()
    assert labels["image"].iloc[0] == "P0000_R.png"
    for name in labels["image"]:
        assert np.asarray(Image.open(tmp_path / "images" / name)).shape == (48, 60, 3)
    pd.testing.assert_frame_equal(table.reset_index(drop=True), labels, check_dtype=False)
    again = generate_dataset("cfp", tmp_path / "again", n=8, seed=1, size=48)
    pd.testing.assert_frame_equal(table, again)
    assert (np.asarray(Image.open(tmp_path / "images" / "P0001_L.png"))
            == np.asarray(Image.open(tmp_path / "again" / "images" / "P0001_L.png"))).all()


def test_generate_oct_and_unlabelled(tmp_path):
    labels = generate_dataset("oct", tmp_path / "oct", n=9, seed=2, size=40)
    assert list(labels.columns) == ["image", "patient_id", "eye", "diagnosis", *KEY_SIGNS]
    assert len(labels) == 9 and set(labels["diagnosis"]) <= set(DIAGNOSES)
    assert (labels.groupby("patient_id")["diagnosis"].nunique() == 1).all()
    assert (labels.loc[labels["diagnosis"] == "normal", list(KEY_SIGNS)] == 0).all().all()
    for name in labels["image"]:
        assert np.asarray(Image.open(tmp_path / "oct" / "images" / name)).shape == (40, 40)
    pool = generate_dataset("cfp", tmp_path / "pool", n=5, seed=3, size=32, labelled=False)
    assert list(pd.read_csv(tmp_path / "pool" / "labels.csv").columns) == ["image", "patient_id", "eye"]
    assert len(pool) == 5


def test_generate_oct_volumes_nifti(tmp_path):
    import nibabel as nib

    labels = generate_dataset("oct_volume", tmp_path, n=3, seed=4, size=32, n_slices=5)
    assert list(labels.columns) == ["volume", "patient_id", "eye", "diagnosis", *KEY_SIGNS]
    nii = nib.load(tmp_path / "volumes" / labels["volume"].iloc[0])
    assert nii.shape == (32, 32, 5) and nii.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(nii.affine, np.eye(4))
    vol = load_volume(tmp_path / "volumes" / labels["volume"].iloc[0])
    assert vol.shape == (5, 32, 32)
    # round trip of the (slices, H, W) <-> (x, y, z) convention
    arr, _ = make_oct_volume(rng(0), 4, (24, 36), "drusen")
    save_volume(arr, tmp_path / "rt.nii.gz")
    assert nib.load(tmp_path / "rt.nii.gz").shape == (36, 24, 4)
    np.testing.assert_array_equal(load_volume(tmp_path / "rt.nii.gz"), arr)


def test_cli(tmp_path, capsys):
    assert main(["--kind", "oct", "--n", "4", "--seed", "1", "--size", "32", "--style", "B",
                 "--out", str(tmp_path)]) == 0
    assert "4 oct images" in capsys.readouterr().out
    assert len(pd.read_csv(tmp_path / "labels.csv")) == 4
