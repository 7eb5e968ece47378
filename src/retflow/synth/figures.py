"""Figures of the synthetic-image quality checks (PNG, written atomically)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from retflow.atomic import atomic_path  # noqa: E402
from retflow.settings.synth import ConditionSettings  # noqa: E402


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _row(images: np.ndarray, n: int, shape: tuple) -> np.ndarray:
    """``n`` images side by side (blank tiles where there are fewer), 2 px gaps."""
    h, w, c = shape
    tiles = [images[i] if i < len(images) else np.full(shape, 255, np.uint8) for i in range(n)]
    gap = np.full((h, 2, c), 255, np.uint8)
    return np.concatenate([x for t in tiles for x in (t, gap)][:-1], 1)


def sample_grid(synth: np.ndarray, synth_y: np.ndarray, real: np.ndarray, real_y: np.ndarray,
                cond: ConditionSettings | None, n: int, path: Path) -> None:
    """Per class one row of real and one of synthetic images (unconditional: two rows each)."""
    shape = synth.shape[1:]
    rows, names = [], []
    groups = [(c, i) for i, c in enumerate(cond.classes)] if cond else [("", None)]
    for name, i in groups:
        r = real if i is None else real[real_y == i]
        s = synth if i is None else synth[synth_y == i]
        reps = 2 if i is None else 1
        for k in range(reps):
            rows.append(_row(r[k * n:(k + 1) * n], n, shape))
            names.append(f"real {name}".strip())
        for k in range(reps):
            rows.append(_row(s[k * n:(k + 1) * n], n, shape))
            names.append(f"synthetic {name}".strip())
    gap = np.full((4, rows[0].shape[1], shape[2]), 255, np.uint8)
    mosaic = np.concatenate([x for r in rows for x in (r, gap)][:-1], 0)
    h = shape[0] + 4
    fig, ax = plt.subplots(figsize=(min(16, 1.0 + 1.1 * n), 0.55 + 1.1 * len(rows) * shape[0] / shape[1]))
    ax.imshow(mosaic[..., 0] if shape[2] == 1 else mosaic, cmap="gray" if shape[2] == 1 else None,
              interpolation="nearest")
    ax.set_yticks([k * h + shape[0] / 2 for k in range(len(rows))], names, fontsize=8)
    ax.set_xticks([])
    title = f"per class of '{cond.label}'" if cond else "unconditional"
    ax.set_title(f"Real vs synthetic images ({title})", fontsize=10)
    _save(fig, path)


def memorisation_histogram(pix: dict, feat: dict, path: Path) -> None:
    """Nearest-real distance of synthetic images vs nearest-other-real distance of real images."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    panels = ((axes[0], pix, "pixel RMS difference"), (axes[1], feat, "standardised feature RMS difference"))
    for ax, mem, what in panels:
        d_s, d_r = mem["distances"], mem["real_distances"]
        hi = float(max(d_s.max(), d_r.max())) or 1.0
        bins = np.linspace(0.0, hi * 1.02, 40)
        ax.hist(d_r, bins=bins, alpha=0.55, density=True, label="real -> nearest other real")
        ax.hist(d_s, bins=bins, alpha=0.55, density=True, label="synthetic -> nearest real")
        ax.axvline(mem["near_copy_threshold"], color="k", ls="--", lw=1, label="1st percentile real-real")
        ax.set_xlabel(what)
        ax.set_ylabel("density")
        ax.set_title(f"{mem['near_copies']} near copies, {mem['exact_copies']} exact", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle("Memorisation check: distance to the nearest real training image", fontsize=10)
    _save(fig, path)


def nearest_pairs(synth: np.ndarray, real: np.ndarray, mem: dict, path: Path, n: int = 8) -> None:
    """The ``n`` synthetic images closest to a real image (top) above that real image (bottom)."""
    order = np.argsort(mem["distances"])[:n]
    top = _row(synth[order], n, synth.shape[1:])
    bottom = _row(real[mem["nearest"][order]], n, synth.shape[1:])
    mosaic = np.concatenate([top, np.full((4, top.shape[1], top.shape[2]), 255, np.uint8), bottom], 0)
    fig, ax = plt.subplots(figsize=(min(16, 1.0 + 1.1 * n), 2.6))
    ax.imshow(mosaic[..., 0] if mosaic.shape[2] == 1 else mosaic, cmap="gray" if mosaic.shape[2] == 1 else None,
              interpolation="nearest")
    ax.set_axis_off()
    dists = ", ".join(f"{mem['distances'][i]:.3f}" for i in order)
    ax.set_title(f"Closest synthetic (top) / nearest real (bottom); pixel RMS {dists}", fontsize=8)
    _save(fig, path)
