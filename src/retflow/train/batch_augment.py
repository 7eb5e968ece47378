"""MAE's training augmentation on a whole batch, on the training device (GPU when there is one).

The loader then only moves uint8 store images (4x fewer bytes than float32, no per-image Python
work in the workers); here, in one call per batch: RandomResizedCrop (scale range, aspect ratio
3/4-4/3, torchvision's sampling rule with a centre-crop fallback) done as ``roi_align`` with
adaptive sampling (an area-averaging resize), horizontal flip, scale to [0, 1] and normalise.

Crop parameters are drawn on the CPU from torch's global generator, which
:func:`retflow.train.sampling.step_seed` seeds per step, so a resumed run replays the same crops
on any device.
"""
from __future__ import annotations

import math

import torch
from torchvision.ops import roi_align

from retflow.data.dataset import norm_stats

_ATTEMPTS = 10


def sample_boxes(n: int, height: int, width: int, scale, ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """``(n, 4)`` crop boxes ``x0, y0, x1, y1`` in pixels, drawn as torchvision's RandomResizedCrop does."""
    area = height * width
    target = area * torch.empty(n, _ATTEMPTS).uniform_(scale[0], scale[1])
    log_r = torch.empty(n, _ATTEMPTS).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_r)
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    # fallback (no attempt fits): the largest centred crop within the ratio range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = float(width), round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), float(height)
    else:
        fw, fh = float(width), float(height)
    idx = first.clamp_min(0).unsqueeze(1)
    cw = torch.where(first >= 0, w.gather(1, idx).squeeze(1), torch.full((n,), fw))
    ch = torch.where(first >= 0, h.gather(1, idx).squeeze(1), torch.full((n,), fh))
    u = torch.rand(n, 2)
    x0 = torch.where(first >= 0, torch.floor(u[:, 0] * (width - cw + 1)), (width - cw) / 2)
    y0 = torch.where(first >= 0, torch.floor(u[:, 1] * (height - ch + 1)), (height - ch) / 2)
    return torch.stack([x0, y0, x0 + cw, y0 + ch], dim=1)


class BatchAugment:
    """uint8 ``(B, C, H, W)`` batch on any device -> normalised float ``(B, C, size, size)``."""

    def __init__(self, size: int, crop_scale, normalize, in_chans: int, hflip: bool = True):
        """``crop_scale``: the settings' ``crop_scale``; ``normalize``: what
        :func:`~retflow.data.dataset.norm_stats` takes (the run's normalisation)."""
        self.size = size
        self.crop_scale = tuple(crop_scale)
        self.hflip = hflip
        mean, std = norm_stats(normalize, in_chans)
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"BatchAugment expects a uint8 (B, C, H, W) batch, got {images.dtype} {tuple(images.shape)}")
        b, _, h, w = images.shape
        boxes = sample_boxes(b, h, w, self.crop_scale)
        flip = torch.rand(b) < 0.5 if self.hflip else torch.zeros(b, dtype=torch.bool)
        device = images.device
        rois = torch.cat([torch.arange(b, dtype=torch.float32).unsqueeze(1), boxes], dim=1).to(device)
        x = roi_align(images.float(), rois, output_size=(self.size, self.size), spatial_scale=1.0,
                      sampling_ratio=-1, aligned=True)
        x = torch.where(flip.to(device).view(-1, 1, 1, 1), x.flip(-1), x)
        return (x / 255.0 - self.mean.to(device)) / self.std.to(device)
