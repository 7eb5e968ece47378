"""The report's "Synthetic images" section: generator training, sampling throughput, quality checks.

Reads, per synthesised modality, the :class:`retflow.layout.Layout` paths of the synthetic branch:
the generator's log and reconstruction figure (training), the merged store's qc.json and the quality
checks' quality.json + PNGs (rule synth_quality). Returns an empty string when there is no synthetic
output, so reports without the branch are unchanged.
"""

from __future__ import annotations

import json
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


def _modalities(layout: Layout, modalities: Iterable[str]) -> list[str]:
    """The configured synthetic modalities with a quality check or a merged store."""
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


def synth_view(results_dir, modalities: Iterable[str]) -> dict | None:
    """The section's tables and figures for the configured ``modalities`` (None without synthetic outputs)."""
    from .view import figure, table

    layout = Layout(results_dir)
    mods = _modalities(layout, modalities)
    if not mods:
        return None
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
                imgs.append(figure(Path(path).read_bytes(), f"{m}: {caption}", "photo"))
    return {
        "title": TITLE, "anchor": ANCHOR,
        "table": table(["modality", "images", "sampler", "images/s", "train s", "epochs AE + UNet", "FD real-synth",
                        "FD real-real", "n per FD set", "NN dist synth (median)", "NN dist real (median)",
                        "near copies (pixel)", "exact copies", "near copies (feature)"], rows),
        "classes": table(["modality", "class", "FD real-synth", "FD real-real", "n per FD set", "synthetic images"],
                         class_rows) if class_rows else None,
        "tstr": table(["modality", "test set", "label", "trained on", "accuracy", "balanced accuracy", "AUROC",
                       "n train"], tstr_rows) if tstr_rows else None,
        "figures": imgs,
    }


def synth_section(results_dir, modalities: Iterable[str] | None = None) -> str:
    """The section alone as HTML ('' without synthetic outputs); ``modalities`` None: every synth
    folder found (a check by hand; the report passes the configured modalities to :func:`synth_view`)."""
    from .html import environment

    if modalities is None:
        import glob

        modalities = [Path(p).name for p in glob.glob(Layout(glob.escape(str(results_dir))).synth_dir("*"))]
    view = synth_view(results_dir, modalities)
    return environment().get_template("synth.html.j2").render(synth=view) if view else ""


def nav_item(results_dir, modalities: Iterable[str]) -> bool:
    """Whether the report lists the section (there are synthetic outputs of ``modalities``)."""
    return bool(_modalities(Layout(results_dir), modalities))
