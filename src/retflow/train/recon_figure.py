"""The pretraining run's figure: MAE reconstructions (original, masked input, reconstruction with
visible patches pasted; the 3-D MAE's: the central B-scan of each volume); for the other methods the
augmented views the method trains on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from retflow.atomic import atomic_path
from retflow.data.dataset import norm_stats
from retflow.settings.stages import PretrainSettings


def _to_rgb(t: torch.Tensor, normalize) -> np.ndarray:
    chans = t.shape[0]
    mean, std = (torch.tensor(v).view(chans, 1, 1) for v in norm_stats(normalize, chans))
    img = (t.float().cpu() * std + mean).clamp(0, 1)
    return img.expand(3, -1, -1).permute(1, 2, 0).numpy()


@torch.no_grad()
def save_reconstruction_figure(model, dataset, mask_ratio: float, path: Path, device, seed: int, normalize,
                               n: int = 6) -> None:
    """``n`` images, original / masked / reconstructed; ``normalize``: what
    :func:`~retflow.data.dataset.norm_stats` takes (the run's normalisation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    count = min(n, len(dataset))
    picks = np.random.default_rng(seed).choice(len(dataset), size=count, replace=False)
    imgs = torch.stack([dataset[int(i)][0] for i in picks]).to(device)
    torch.manual_seed(seed)
    masked, recon = model.reconstruct(imgs, mask_ratio)
    what = "MAE reconstructions"
    if imgs.ndim == 5:  # volumes (B, C, D, H, W): the central B-scan of each
        imgs, masked, recon = (t[:, :, t.shape[2] // 2] for t in (imgs, masked, recon))
        what = "3-D MAE reconstructions, central B-scan of each volume"
    fig, axes = plt.subplots(3, count, figsize=(1.6 * count, 5.0), squeeze=False)
    for col in range(count):
        for row, (title, t) in enumerate((("original", imgs[col]), ("masked", masked[col]), ("reconstruction", recon[col]))):
            ax = axes[row][col]
            ax.imshow(_to_rgb(t, normalize))
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(title, fontsize=10)
    fig.suptitle(f"{what} (mask ratio {mask_ratio:g})", fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def save_pretrain_figure(model, dataset, s: PretrainSettings, path: Path, device) -> None:
    """``figure.png`` of a pretraining run (see the module docstring)."""
    if s.is_mae:  # mae, mae3d
        save_reconstruction_figure(model, dataset, s.run_mask_ratio, path, device, seed=s.seed,
                                   normalize=s.normalize.to_dict())
    else:
        save_views_figure(dataset, s, path)


def save_views_figure(dataset, s: PretrainSettings, path: Path, n: int = 6) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = min(n, len(dataset))
    picks = np.random.default_rng(s.seed).choice(len(dataset), size=count, replace=False)
    torch.manual_seed(s.seed)
    samples = [dataset[int(i)][0] for i in picks]
    samples = [s if isinstance(s, (list, tuple)) else [s] for s in samples]
    rows = len(samples[0])
    fig, axes = plt.subplots(rows, count, figsize=(1.6 * count, 1.7 * rows + 0.4), squeeze=False)
    for col, views in enumerate(samples):
        for row, view in enumerate(views):
            ax = axes[row][col]
            ax.imshow(_to_rgb(view, s.normalize.to_dict()))
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(f"view {row + 1}", fontsize=10)
    fig.suptitle(f"{s.method}: augmented views per image", fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
