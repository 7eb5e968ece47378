"""The report's "Synthetic images" section: generator training, sampling throughput, quality checks.

Reads, per synthesised modality, the :class:`retflow.layout.Layout` paths of the synthetic branch:
the generator's log and reconstruction figure (training), the merged store's qc.json and the quality
checks' quality.json + PNGs (rule synth_quality). Returns an empty string when there is no synthetic
output, so reports without the branch are unchanged.
"""

from __future__ import annotations

import json
from html import escape
import glob
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from ..layout import Layout

TITLE = "Synthetic images"
ANCHOR = "synth"


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _modalities(layout: Layout, modalities: Iterable[str] | None) -> list[str]:
    """The modalities (the given ones, else every synth folder) with a quality check or a merged store."""
    if modalities is None:
        modalities = [Path(p).name for p in glob.glob(Layout(glob.escape(layout.root)).synth_dir("*"))]
    return [m for m in sorted(modalities)
            if Path(layout.synth_quality_json(m)).is_file() or Path(layout.synth_store_qc(m)).is_file()]


def _train_seconds(layout: Layout, m: str) -> tuple[float | None, str | None]:
    """Training seconds and epochs per stage (``autoencoder + unet``) from the generator's log."""
    try:
        log = pd.read_csv(layout.synth_train_log(m))
        epochs = " + ".join(str(int((log["stage"] == s).sum())) for s in ("autoencoder", "unet"))
        return float(log["seconds"].sum()), epochs
    except (OSError, ValueError, KeyError):
        return None, None


def _fd(entry: dict | None) -> tuple:
    entry = entry or {}
    return entry.get("real_vs_synth"), entry.get("real_vs_real"), entry.get("n_compared")


def _scores(t: dict | None) -> list:
    t = t or {}
    return [t.get("accuracy"), t.get("balanced_accuracy"), t.get("auroc"), t.get("n_train")]


def synth_section(results_dir, modalities: Iterable[str] | None = None) -> str:
    """HTML of the section ('' without synthetic outputs) for ``modalities`` (None: every one found)."""
    from .html import _img, _table  # the report's helpers; imported late (html imports this module)

    layout = Layout(results_dir)
    mods = _modalities(layout, modalities)
    if not mods:
        return ""
    parts = [f"<h2 id='{ANCHOR}'>{TITLE}</h2>"]
    rows, class_rows, tstr_rows, imgs = [], [], [], []
    for m in mods:
        qc, q = _load(Path(layout.synth_store_qc(m))), _load(Path(layout.synth_quality_json(m)))
        secs, epochs = _train_seconds(layout, m)
        fd_s, fd_r, n_half = _fd((q.get("frechet") or {}).get("all"))
        mem = (q.get("memorisation") or {}).get("pixel") or {}
        feat = (q.get("memorisation") or {}).get("feature") or {}
        rows.append([m, qc.get("n_images"), f"{qc.get('sampler', '')} {qc.get('sampler_steps', '')}".strip(),
                     qc.get("images_per_second"), None if secs is None else round(secs, 1), epochs, fd_s, fd_r,
                     n_half, (mem.get("synth_to_real") or {}).get("median"),
                     (mem.get("real_to_real") or {}).get("median"), mem.get("near_copies"), mem.get("exact_copies"),
                     feat.get("near_copies")])
        for c, e in ((q.get("frechet") or {}).get("per_class") or {}).items():
            class_rows.append([m, c, *_fd(e), e.get("n_synthetic")])
        t = q.get("tstr") or {}
        if "train_on_synthetic" in t:
            tstr_rows.append([m, t.get("dataset"), t.get("label"), "synthetic", *_scores(t["train_on_synthetic"])])
            if "train_on_real" in t:
                tstr_rows.append([m, t.get("dataset"), t.get("label"), "real (train split)",
                                  *_scores(t["train_on_real"])])
        elif t.get("skipped"):
            tstr_rows.append([m, None, None, f"skipped: {t['skipped']}", None, None, None, None])
        for path, caption in ((layout.synth_quality_png(m, "samples"), "real vs synthetic samples"),
                              (layout.synth_quality_png(m, "memorisation"), "memorisation check"),
                              (layout.synth_quality_png(m, "nearest"), "closest synthetic / real pairs"),
                              (layout.synth_recon(m), "autoencoder: real (top) vs reconstructed (bottom)")):
            if Path(path).is_file():
                imgs.append(_img(Path(path).read_bytes(), f"{m}: {caption}"))
    parts.append(_table(
        ["modality", "images", "sampler", "images/s", "train s", "epochs AE + UNet", "FD real-synth", "FD real-real",
         "n per FD set", "NN dist synth (median)", "NN dist real (median)", "near copies (pixel)", "exact copies",
         "near copies (feature)"], rows))
    if class_rows:
        parts.append("<h3>Frechet distance per class</h3>" + _table(
            ["modality", "class", "FD real-synth", "FD real-real", "n per FD set", "synthetic images"], class_rows))
    if tstr_rows:
        parts.append("<h3>Train on synthetic, test on real</h3>" + _table(
            ["modality", "test set", "label", "trained on", "accuracy", "balanced accuracy", "AUROC", "n train"],
            tstr_rows))
    parts.append(
        "<p class='caption'>A latent diffusion model (KL autoencoder + diffusion UNet, EMA weights, classifier-free "
        "guidance when class-conditional) trained on the real pretraining pool; samples go into a store flagged "
        "<code>synthetic</code>. FD: Frechet distance between Gaussian fits of features of our own pretrained "
        "encoder; <i>real-synth</i> compares one random half of the real images with as many synthetic ones, "
        "<i>real-real</i> the two real halves (the value a perfect generator would reach at this sample size). "
        "Memorisation: RMS difference (pixels; standardised encoder features) of each synthetic image to its "
        "nearest real training image vs each real image's nearest other real image; a near copy is closer than "
        "99% of real pairs (blurry, average-looking samples can be close in pixel space without copying: see the "
        "closest pairs). Train on synthetic: "
        "a logistic regression on encoder features trained on synthetic images (their generating classes) and "
        "tested on a real labelled test split, next to the same classifier trained on real images. Sampling "
        "images/s over all sampling jobs (wall time, model loading included).</p>")
    if imgs:
        parts.append("<div class='figs'>" + "".join(imgs) + "</div>")
    return "\n".join(parts)


def nav_item(results_dir, modalities: Iterable[str] | None = None) -> str:
    return f"<li><a href='#{ANCHOR}'>{escape(TITLE)}</a></li>" if _modalities(Layout(results_dir), modalities) else ""
