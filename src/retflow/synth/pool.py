"""The real images a generator learns from: prepared stores, their class labels, resizing.

Labels come from the manifests' ``condition.label`` column (normalised like every label in
retflow: ``" 2.0 "`` -> ``"2"``); a missing or unknown value becomes the *null* class ``K`` --
the image still trains the unconditional branch of classifier-free guidance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from retflow.data.dataset import load_manifest
from retflow.data.labels import normalise_label
from retflow.data.pools import pool_mask
from retflow.data.store import ImageStore


class PoolImages(Dataset):
    """The images a pool may use of the given stores (:func:`retflow.data.pools.pool_mask`: a
    pretrain dataset's images, a labelled one's ``splits``) as ``(uint8 tensor C x H x W, class index)``."""

    def __init__(self, stores: list[str | Path], condition: dict | None, modality: str, splits: list[str]):
        if not stores:
            raise ValueError(f"synth.pools.{modality}: no store to learn from")
        self.images = [ImageStore(s) for s in stores]
        shapes = {tuple(im[0].shape) for im in self.images}
        if len(shapes) != 1:
            raise ValueError(f"synth.pools.{modality}: the stores hold images of different shapes {sorted(shapes)}; "
                             f"prepare them with the same preprocess size")
        self.shape = shapes.pop()  # (H, W, C) of the real store: the synthetic store matches it
        manifests = [load_manifest(s) for s in stores]
        for store, manifest, im in zip(stores, manifests, self.images):
            if len(manifest) != len(im):
                raise ValueError(f"store {store}: manifest has {len(manifest)} rows, shards {len(im)} images")
        self.rows = [np.flatnonzero(pool_mask(m, splits)) for m in manifests]  # manifest rows it may use
        self.items = np.concatenate([np.stack([np.full(len(r), k), m["index"].to_numpy()[r]], 1)
                                     for k, (m, r) in enumerate(zip(manifests, self.rows))])
        self.classes = list(condition["classes"]) if condition else []
        self.null_class = len(self.classes) if condition else None
        self.labels = self._labels(stores, manifests, condition, modality) if condition else None

    def _labels(self, stores, manifests, condition: dict, modality: str) -> np.ndarray:
        col = condition["label"]
        lookup = {str(c): i for i, c in enumerate(self.classes)}
        out, found = [], False
        for manifest, rows in zip(manifests, self.rows):
            if col in manifest.columns:
                found = True
                out.append(np.array([lookup.get(normalise_label(v), self.null_class) for v in manifest[col].iloc[rows]]))
            else:
                out.append(np.full(len(rows), self.null_class))
        if not found:
            raise ValueError(f"synth.condition.{modality}.label: column '{col}' is in none of the pool manifests "
                             f"({', '.join(str(s) for s in stores)}); use a labelled pool or drop the condition")
        labels = np.concatenate(out)
        if (labels == self.null_class).all():
            raise ValueError(f"synth.condition.{modality}.classes: no image of the pools has a '{col}' value in "
                             f"{self.classes}")
        return labels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        k, j = self.items[i]
        img = torch.from_numpy(self.images[int(k)][int(j)]).permute(2, 0, 1)
        label = -1 if self.labels is None else int(self.labels[i])
        return img, label

    def class_counts(self) -> list[int]:
        """Images per class (the null class excluded); empty when unconditional."""
        if self.labels is None:
            return []
        return np.bincount(self.labels, minlength=len(self.classes) + 1)[: len(self.classes)].tolist()


def to_model(batch: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float in [-1, 1] at ``size x size`` (area-averaged when shrinking)."""
    x = batch.float() / 127.5 - 1.0
    if tuple(x.shape[-2:]) != (size, size):
        shrink = x.shape[-1] > size
        x = F.interpolate(x, size=(size, size), mode="area" if shrink else "bicubic",
                          align_corners=None if shrink else False)
    return x.clamp(-1.0, 1.0)


def to_store(x: torch.Tensor, shape: tuple[int, int, int]) -> np.ndarray:
    """Model output in [-1, 1] (N, C, s, s) -> uint8 (N, H, W, C) at the real store's ``shape``."""
    h, w, _ = shape
    if tuple(x.shape[-2:]) != (h, w):
        x = F.interpolate(x.float(), size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    img = ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return img.permute(0, 2, 3, 1).cpu().numpy()
