"""A pretrained ViT encoder frozen as a feature extractor: uint8 images in, mean-pooled features out.

Used by the synthetic-image quality checks (Frechet distance, memorisation, train-on-synthetic in
:mod:`retflow.synth.quality`) and by ``bench/probe_encoders.py`` (frozen-feature probes).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from retflow.data.dataset import eval_transform, model_channels

__all__ = ["FeatureExtractor"]


class FeatureExtractor:
    """Our pretrained ViT encoder (mean-pooled patch tokens) as a feature extractor."""

    def __init__(self, checkpoint: str | Path, vit: dict, normalize: dict | None, device: torch.device):
        from retflow.models.vit import ViTSpec, create_vit, load_checkpoint_file, load_encoder_weights

        spec = ViTSpec.from_dict(vit)
        self.model = create_vit(spec, num_classes=0, global_pool="avg")
        load_encoder_weights(self.model, load_checkpoint_file(checkpoint), strict_report=False)
        self.model = self.model.to(device).eval()
        self.spec, self.device = spec, device
        self.transform = eval_transform(spec.img_size, normalize, spec.in_chans)

    @torch.no_grad()
    def __call__(self, images: np.ndarray, batch: int = 128) -> np.ndarray:
        """uint8 (n, H, W, C) -> float32 (n, embed_dim)."""
        out = []
        for s in range(0, len(images), batch):
            x = torch.stack([self.transform(model_channels(torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1),
                                                           self.spec.in_chans)) for im in images[s:s + batch]])
            f = self.model.forward_head(self.model.forward_features(x.to(self.device)), pre_logits=True)
            out.append(f.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.num_features), np.float32)
