"""Readability of the report's figures (text size as displayed, curves per panel), the saliency field
mask, the segmentation overlay's column labels and the report's image encoding (issue 17)."""

import base64
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from retflow.report import figures, images, saliency

MODELS = ["mae", "scratch", "simclr", "dino", "retfound"]  # more than MAX_CURVES
PROTOCOLS = ["finetune", "probe_adamw"]
CLASSES = ["0", "1", "2", "3", "4"]


def _roc(rng, k):
    out = {}
    for c in range(k):
        fpr = np.sort(np.r_[0, rng.random(20), 1])
        out[str(c)] = {"fpr": fpr.tolist(), "tpr": np.sqrt(fpr).tolist()}
    return out


def _metrics(rng, k, model="mae", protocol="finetune"):
    return {"model": model, "protocol": protocol, "fraction": 1.0, "roc": _roc(rng, k),
            "metrics": {"auroc": {"value": 0.8, "ci_low": 0.7, "ci_high": 0.9}, "aupr": {"value": 0.6}}}


def _runs(rng, k=5, n=200):
    """Every model x protocol: 10 runs (more than a panel holds, in two protocols)."""
    y = rng.integers(0, k, n)
    out = []
    for protocol in PROTOCOLS:
        for i, model in enumerate(MODELS):
            p = rng.dirichlet(np.ones(k), n)
            out.append({"label": f"{model} ({protocol}, 1)", "panel": protocol, "metrics": _metrics(rng, k, model, protocol),
                        "pr": figures.macro_pr(y, p, "multiclass"), "y": y, "probs": p, "ece": (0.1, 0.05, 0.15),
                        "colour": f"C{i}", "style": figures.LINESTYLES[PROTOCOLS.index(protocol)]})
    return out


def _results(rng):
    rows = []
    for protocol in PROTOCOLS:
        for model in MODELS:
            for fraction in (0.1, 0.3, 1.0):
                for seed in (0, 1, 2):  # a t interval
                    v = rng.uniform(0.5, 0.9)
                    rows.append({"task": "glaucoma", "eval_set": "internal", "protocol": protocol, "model": model,
                                 "fraction": fraction, "seed": seed, "auroc": v, "auroc_lo": v - 0.05,
                                 "auroc_hi": v + 0.05})
    return pd.DataFrame(rows)


def _pretrain_logs(tmp_path):
    paths = {}
    for method in ("mae", "simclr"):
        for modality in ("cfp", "oct"):
            path = tmp_path / f"{method}_{modality}.csv"
            pd.DataFrame({"epoch": range(10), "loss": np.linspace(1, 0.3, 10)}).to_csv(path, index=False)
            paths[f"{method}/{modality}"] = path
    return paths


def figure_calls(tmp_path):
    """(name, call) of every figure function of figures.py with large, realistic inputs."""
    rng = np.random.default_rng(0)
    runs = _runs(rng)
    cm = rng.integers(0, 40, (5, 5))
    ext = [{"label": f"{m} ({p}) → cfp_device_b", "internal": 0.8, "external": 0.7, "internal_lo": 0.75,
            "internal_hi": 0.85, "external_lo": 0.6, "external_hi": 0.8} for p in PROTOCOLS for m in MODELS[:3]]
    return [
        ("roc_figure", lambda: figures.roc_figure([r["metrics"] for r in runs], "dr_grading: internal test set")),
        ("roc_pr_figure", lambda: figures.roc_pr_figure(runs, "dr_grading: internal test set")),
        ("roc_pr_figure_4", lambda: figures.roc_pr_figure(runs[:4], "dr_grading: internal test set")),
        ("reliability_figure", lambda: figures.reliability_figure(runs, 15, "dr_grading: reliability (internal)")),
        ("reliability_figure_8", lambda: figures.reliability_figure(
            [{k: v for k, v in r.items() if k != "panel"} for r in runs[:8]], 15, "glaucoma: reliability")),
        ("confusion_figure", lambda: figures.confusion_figure(cm, CLASSES, "mae (finetune), fraction 1")),
        ("confusion_figure_long", lambda: figures.confusion_figure(
            rng.integers(0, 9, (4, 4)), ["normal", "drusen", "dme", "cnv"], "scratch (probe_logreg), fraction 0.1")),
        ("label_efficiency_figure", lambda: figures.label_efficiency_figure(
            _results(rng), "glaucoma", "auroc", ["internal"], MODELS, PROTOCOLS)),
        ("label_efficiency_figure_2", lambda: figures.label_efficiency_figure(
            _results(rng).query("model in ['mae', 'scratch'] and protocol == 'finetune'"), "glaucoma", "auroc")),
        ("external_drop_figure", lambda: figures.external_drop_figure(ext, "glaucoma: internal vs external (auroc)",
                                                                      "auroc")),
        ("multilabel_confusion_figure", lambda: figures.multilabel_confusion_figure(
            {s: [[30, 4], [6, 10]] for s in ("drusen", "irf", "srf", "ped", "ez_loss", "rpe")}, "mae (finetune)")),
        ("pretrain_loss_figure", lambda: figures.pretrain_loss_figure(_pretrain_logs(tmp_path))),
    ]


@pytest.fixture
def captured(monkeypatch):
    """Every Figure rendered through figures._png, with its measures taken inside the figure's style."""
    seen = []
    render = figures._png

    def capture(fig):
        png = render(fig)
        width = figures.png_size(png)[0]
        sizes = figures.text_sizes_px(fig, pixel_width=width)
        seen.append({"width": width, "min_px": sizes[0][0], "smallest": sizes[0], "curves": figures.curves_per_axes(fig)})
        return png

    monkeypatch.setattr(figures, "_png", capture)
    return seen


def test_every_figure_is_readable_as_displayed(tmp_path, captured):
    for name, call in figure_calls(tmp_path):
        captured.clear()
        assert call().startswith(b"\x89PNG"), name
        (m,) = captured
        assert m["width"] <= figures.MAX_WIDTH_PX, (name, m["width"])
        assert m["min_px"] >= figures.MIN_TEXT_PX, (name, m["smallest"])
        assert max(m["curves"], default=0) <= figures.MAX_CURVES, (name, m["curves"])


def test_many_runs_become_small_multiples(tmp_path, captured):
    rng = np.random.default_rng(1)
    runs = _runs(rng)
    figures.reliability_figure(runs, 15, "t")  # 5 runs in each of 2 protocols: 2 panels of 3 and 2
    assert [c for c in captured[0]["curves"] if c] == [3, 2, 3, 2]
    figures.reliability_figure([{k: v for k, v in r.items() if k != "panel"} for r in runs[:8]], 15, "t")
    assert [c for c in captured[1]["curves"] if c] == [4, 4]  # no panel names: 8 runs in order
    figures.label_efficiency_figure(_results(rng).query("protocol == 'finetune'"), "glaucoma", "auroc", None, MODELS)
    assert [c for c in captured[2]["curves"] if c] == [3, 2]  # 5 models: split over two panels


def test_min_text_px_follows_display_width(captured):
    fig = figures.Figure(figsize=(4, 3))
    ax = fig.add_subplot()
    ax.set_title("t", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    width = figures.png_size(figures._png(fig))[0]
    assert figures.min_text_px(fig, width) == pytest.approx(9 * figures.DPI / 72)
    assert figures.min_text_px(fig, width / 2) == pytest.approx(9 * figures.DPI / 72 / 2)


def test_saliency_grid_is_readable(captured):
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(15)]
    rows = [[3 * c, 3 * c + 1, 3 * c + 2] for c in range(5)]
    maps = rng.random((15, 64, 64))
    png = saliency.saliency_grid(imgs, rows, CLASSES, np.repeat(np.arange(5), 3), rng.dirichlet(np.ones(5), 15),
                                 maps, maps, "dr_grading: mae (finetune), label fraction 1, seed 0; test images")
    assert png.startswith(b"\x89PNG")
    (m,) = captured
    assert m["width"] <= figures.MAX_WIDTH_PX and m["min_px"] >= figures.MIN_TEXT_PX, m


# ---------------------------------------------------------------- saliency inside the fundus field
def _fundus(size=64):
    """A synthetic fundus photograph: an orange disc (radius 0.45 size) on black, with some texture."""
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 <= (0.45 * size) ** 2
    rng = np.random.default_rng(0)
    img = np.zeros((size, size, 3), np.uint8)
    img[disc] = np.array([200, 90, 40]) + rng.integers(-20, 20, (int(disc.sum()), 3))
    return img, disc


def test_saliency_map_is_zero_outside_the_fundus_field():
    img, disc = _fundus()
    masks = saliency.field_masks([img, img])
    assert masks.shape == (2, 64, 64)
    yy, xx = np.mgrid[:64, :64]
    r = np.hypot(yy - 31.5, xx - 31.5)
    assert masks[0][disc].all() and not masks[0][r > 0.45 * 64 + 1.5].any()  # the detector finds the disc
    maps = np.random.default_rng(0).random((2, 64, 64)) + 5.0  # hot everywhere, corners included
    shown = saliency.scale_in_field(maps, masks)
    assert (shown[~masks] == 0).all()
    assert (shown[:, r > 0.45 * 64 + 1.5] == 0).all()  # nothing beyond the disc's edge pixel
    assert shown[masks].min() == 0.0 and shown[masks].max() == 1.0  # scaled on the field's values only


def test_oct_and_fieldless_images_are_not_masked():
    rng = np.random.default_rng(0)
    oct_bscan = rng.integers(0, 255, (64, 64, 1), dtype=np.uint8)  # OCT stores one channel
    noise = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)  # no field found: whole frame
    masks = saliency.field_masks([oct_bscan, noise])
    assert masks.all()


# ---------------------------------------------------------------- segmentation overlay labels
def test_segmentation_overlay_has_column_labels(tmp_path):
    import torch

    from retflow.train.segment import OVERLAY_COLUMNS, write_overlay

    class Tiny:
        def __len__(self):
            return 2

        def raw(self, i):
            return np.full((32, 32, 3), 90, np.uint8), None

        def __getitem__(self, i):
            return torch.zeros(3, 32, 32), torch.ones(32, 32, dtype=torch.long)

    out = tmp_path / "overlay.png"
    assert write_overlay(Tiny(), np.ones((2, 32, 32), np.uint8), out, n=2, tile=128) == 2
    sheet = np.asarray(Image.open(out).convert("RGB"))
    header = sheet.shape[0] - 2 * (128 + 2)
    assert header >= 16 and sheet.shape[1] == 3 * 128
    assert OVERLAY_COLUMNS == ("image", "ground truth", "prediction")
    for j in range(3):  # dark label text in each column of the white header strip
        assert (sheet[:header, j * 128:(j + 1) * 128] < 100).any()


# ---------------------------------------------------------------- encoding for the report
def _decode(uri):
    head, data = uri.split(",", 1)
    return head, Image.open(io.BytesIO(base64.b64decode(data)))


def test_data_uri_compresses_figures_and_photos(tmp_path):
    rng = np.random.default_rng(0)
    png = figures.confusion_figure(rng.integers(0, 40, (5, 5)), CLASSES, "t")
    uri = images.data_uri(png, "figure")
    head, im = _decode(uri)
    assert head == "data:image/png;base64" and im.size == figures.png_size(png)
    assert len(base64.b64decode(uri.split(",", 1)[1])) < len(png)
    img, _ = _fundus(256)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    head, im = _decode(images.data_uri(buf.getvalue(), "photo"))
    assert head == "data:image/jpeg;base64" and im.size == (256, 256)
    head, im = _decode(images.data_uri(np.zeros((40, 3000, 3), np.uint8), "photo"))
    assert im.size == (images.MAX_PHOTO_WIDTH, 40 * images.MAX_PHOTO_WIDTH // 3000)
    assert images.pixel_size(png) == figures.png_size(png)


def test_data_uri_bad_input_messages():
    with pytest.raises(ValueError, match=r"^image kind 'vector': use one of \('figure', 'photo'\)$"):
        images.data_uri(b"\x89PNG", "vector")
    with pytest.raises(ValueError, match=r"^image data \(4 bytes\) is not a readable PNG/JPEG image"):
        images.data_uri(b"abcd", "figure")
