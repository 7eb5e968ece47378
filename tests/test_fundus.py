"""Fundus-field detection, quality flags and CFP preprocessing helpers (retflow.data.fundus)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from retflow.data.fundus import (
    FundusField,
    crop_to_field,
    detect_field,
    enhance_contrast,
    mask_from_field,
    quality_flags,
)


def disc_mask(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


def fundus_like(shape, field_mask, seed=0, level=1.0, noise=3.0):
    """A red-dominant textured 'retina' inside field_mask, dark noisy surround; uint8 RGB."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    cy, cx = h / 2, w / 2
    # vignetting plus low-frequency texture plus thin dark "vessels" and fine noise
    vign = 1 - 0.35 * (((yy - cy) ** 2 + (xx - cx) ** 2) / (0.5 * max(h, w)) ** 2)
    tex = 0.08 * np.sin(xx / 37.0) * np.cos(yy / 53.0)
    vessels = np.zeros((h, w), np.float32)
    for _ in range(12):
        a, b = rng.uniform(0, 2 * np.pi), rng.uniform(-1, 1)
        d = np.abs((xx - cx) * np.sin(a) - (yy - cy) * np.cos(a) - b * min(h, w) * 0.3)
        vessels += np.exp(-(d / 2.0) ** 2)
    base = np.clip(vign + tex - 0.3 * np.clip(vessels, 0, 1), 0.05, 1.2)
    img = np.zeros((h, w, 3), np.float32)
    for c, gain in enumerate((190, 80, 35)):
        img[..., c] = level * gain * base + rng.normal(0, 4, (h, w))
    img[~field_mask] = rng.normal(2, noise, (np.count_nonzero(~field_mask), 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def check_field(field, truth, shape, min_iou=0.97):
    assert field.found
    got = mask_from_field(shape, field)
    assert got.shape == tuple(shape[:2]) and got.dtype == bool
    assert iou(got, truth) > min_iou
    rows, cols = np.nonzero(truth.any(1))[0], np.nonzero(truth.any(0))[0]
    expected = (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1)
    assert np.all(np.abs(np.array(field.bounds) - expected) <= 4), (field.bounds, expected)
    assert field.mask_fraction == pytest.approx(got.mean(), abs=1e-6)


@pytest.mark.parametrize(
    "shape,cy,cx,r",
    [
        ((800, 1000), 400, 500, 360),  # whole disc with a black surround
        ((700, 1050), 350, 525, 490),  # cut by top and bottom edges (HRF / Topcon layout)
        ((600, 600), 280, 330, 250),  # off-centre
        ((240, 320), 120, 160, 100),  # small image: no downscaling
        ((2336, 3504), 1165, 1758, 1632),  # HRF geometry
    ],
)
def test_disc_detected(shape, cy, cx, r):
    truth = disc_mask(shape, cy, cx, r)
    img = fundus_like(shape, truth)
    field = detect_field(img)
    check_field(field, truth, shape)
    assert field.center[0] == pytest.approx(cy, abs=0.01 * r)
    assert field.center[1] == pytest.approx(cx, abs=0.01 * r)
    assert field.radius == pytest.approx(r, rel=0.01)
    assert field.bounds[3] - field.bounds[2] == pytest.approx(min(2 * r + 1, shape[1]), abs=4)


def test_cut_field_box_width_is_the_diameter():
    shape, r = (700, 1050), 490
    truth = disc_mask(shape, 350, 525, r)
    field = detect_field(fundus_like(shape, truth, seed=1))
    top, bottom, left, right = field.bounds
    assert (top, bottom) == (0, 700)
    assert abs((right - left) - (2 * r + 1)) <= 4


def test_grayscale_input():
    shape = (600, 800)
    truth = disc_mask(shape, 300, 400, 270)
    gray = fundus_like(shape, truth, seed=2)[..., 0]
    check_field(detect_field(gray), truth, shape)
    q = quality_flags(gray, detect_field(gray))
    assert not q["no_field"]


def test_dark_image():
    shape = (600, 800)
    truth = disc_mask(shape, 300, 400, 280)
    img = fundus_like(shape, truth, seed=3, level=0.15, noise=1.5)
    field = detect_field(img)
    check_field(field, truth, shape)
    q = quality_flags(img, field)
    assert q["too_dark"] and not q["quality_ok"]


@pytest.mark.parametrize("level", [1.0, 0.12], ids=["normal", "dark"])
def test_text_label_in_corner_does_not_confuse(level):
    # in a dark image the white label is the brightest thing by far: it must not set the level
    shape = (800, 1000)
    truth = disc_mask(shape, 400, 520, 370)
    img = fundus_like(shape, truth, seed=4, level=level)
    img[20:90, 15:140] = 255  # bright label box with dark "letters"
    img[40:70, 30:125:12] = 0
    img[740:790, 880:990] = 230
    check_field(detect_field(img), truth, shape)


def test_notch_and_touching_label():
    shape = (800, 1000)
    truth = disc_mask(shape, 400, 500, 370)
    img = fundus_like(shape, truth, seed=5)
    notch = disc_mask(shape, 400 - 370, 500, 18)  # a dark notch cut into the top of the field
    img[notch] = 2
    img[680:760, 640:760] = 250  # label overlapping the field's lower-right edge
    field = detect_field(img)
    check_field(field, truth & ~notch, shape)
    assert field.radius == pytest.approx(370, rel=0.01)


def test_rectangular_field():
    shape = (600, 800)
    truth = np.zeros(shape, bool)
    truth[60:540, 100:700] = True
    field = detect_field(fundus_like(shape, truth, seed=6))
    check_field(field, truth, shape)


def test_no_border_fills_frame():
    shape = (600, 800)
    truth = np.ones(shape, bool)
    field = detect_field(fundus_like(shape, truth, seed=7))
    assert field.found
    assert field.bounds == (0, 600, 0, 800)
    assert mask_from_field(shape, field).all()
    assert field.mask_fraction == pytest.approx(1.0)


def test_circle_larger_than_frame_cuts_corners():
    shape = (600, 800)
    truth = disc_mask(shape, 300, 400, 450)  # only the corners are black
    check_field(detect_field(fundus_like(shape, truth, seed=8)), truth, shape, min_iou=0.98)


@pytest.mark.parametrize(
    "img",
    [
        np.zeros((400, 600, 3), np.uint8),
        np.random.default_rng(0).integers(0, 6, (400, 600, 3)).astype(np.uint8),
        np.full((400, 600, 3), 128, np.uint8),
        np.zeros((300, 300), np.uint8),
    ],
    ids=["black", "noise", "flat-grey", "black-gray"],
)
def test_blank_images_have_no_field(img):
    field = detect_field(img)
    assert not field.found
    assert field.bounds == (0, img.shape[0], 0, img.shape[1])
    assert field.mask_fraction == 0.0
    q = quality_flags(img, field)
    assert q["no_field"] and not q["quality_ok"]


def test_rejects_bad_input():
    with pytest.raises(TypeError):
        detect_field(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError):
        detect_field(np.zeros((10, 10, 2), np.uint8))


def test_quality_flags_respond():
    shape = (800, 1000)
    truth = disc_mask(shape, 400, 500, 370)
    img = fundus_like(shape, truth, seed=9)
    field = detect_field(img)
    good = quality_flags(img, field)
    assert good["quality_ok"], good
    assert set(good) >= {"brightness", "contrast", "sharpness", "under_exposed", "over_exposed",
                         "too_dark", "too_bright", "blurry", "no_field", "quality_ok"}

    blurred = ndi.gaussian_filter(img, (6, 6, 0))
    qb = quality_flags(blurred, field)
    assert qb["blurry"] and not qb["quality_ok"]
    assert qb["sharpness"] < good["sharpness"] / 10

    bright = img.copy()
    bright[truth] = 252
    qw = quality_flags(bright, field)
    assert qw["too_bright"] and not qw["too_dark"]

    dark = (img * 0.1).astype(np.uint8)
    qd = quality_flags(dark, field)
    assert qd["too_dark"] and not qd["too_bright"]


def test_crop_to_field_is_square_and_centred():
    shape = (700, 1050)
    truth = disc_mask(shape, 350, 525, 490)
    img = fundus_like(shape, truth, seed=10)
    field = detect_field(img)
    out = crop_to_field(img, field)
    top, bottom, left, right = field.bounds
    side = right - left
    assert out.shape == (side, side, 3) and out.dtype == np.uint8
    oy = (side - (bottom - top)) // 2
    np.testing.assert_array_equal(out[oy:oy + bottom - top], img[top:bottom, left:right])
    assert out[: oy].max() == 0 and out[oy + bottom - top:].max() == 0
    gray = crop_to_field(img[..., 1], field)
    assert gray.shape == (side, side)


def test_enhance_contrast_methods():
    shape = (600, 800)
    truth = disc_mask(shape, 300, 400, 280)
    img = fundus_like(shape, truth, seed=11)
    field = detect_field(img)
    none = enhance_contrast(img, "none")
    np.testing.assert_array_equal(none, img)
    assert none is not img
    inside = mask_from_field(shape, field)
    clahe = enhance_contrast(img, "clahe", field)
    assert clahe.shape == img.shape and clahe.dtype == np.uint8
    assert clahe[~inside].max() == 0
    assert clahe[inside].std() > img[inside].std()  # more contrast inside the field
    graham = enhance_contrast(img, "graham", field)
    assert graham.shape == img.shape and graham.dtype == np.uint8
    assert graham[~inside].max() == 0
    # local-average subtraction centres the field near 128 and removes the vignetting
    assert abs(np.median(graham[inside]) - 128) < 20
    ring = inside & ~disc_mask(shape, 300, 400, 270)
    centre = disc_mask(shape, 300, 400, 100)
    assert abs(graham[ring].mean() - graham[centre].mean()) < 15
    assert enhance_contrast(img, "graham").shape == img.shape  # detects the field itself
    assert enhance_contrast(img[..., 1], "graham").ndim == 2
    with pytest.raises(ValueError):
        enhance_contrast(img, "sharpen")


def test_field_is_frozen():
    field = detect_field(np.zeros((50, 50), np.uint8))
    assert isinstance(field, FundusField)
    with pytest.raises(AttributeError):
        field.radius = 3.0


@pytest.mark.realdata
def test_hrf_fields(real_data):
    from PIL import Image

    hrf = real_data / "hrf" / "images"
    if not hrf.is_dir():
        pytest.skip(f"HRF images not found at {hrf}")
    files = sorted(p for p in hrf.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    assert files
    for path in files[::4]:  # every 4th image keeps the test quick; the benchmark covers all
        img = np.asarray(Image.open(path).convert("RGB"))
        h, w = img.shape[:2]
        field = detect_field(img)
        assert field.found, path.name
        top, bottom, left, right = field.bounds
        # HRF: a ~0.93 W diameter circle, cut by the top and bottom edges
        assert (top, bottom) == (0, h), path.name
        assert 0.85 * w < right - left < w, path.name
        assert right - left == pytest.approx(2 * field.radius, abs=4), path.name
        assert 0.4 * h < field.center[0] < 0.6 * h and 0.4 * w < field.center[1] < 0.6 * w
        assert 0.7 < field.mask_fraction < 0.95, path.name
        q = quality_flags(img, field)
        assert not q["no_field"] and not q["too_dark"] and not q["too_bright"], (path.name, q)
