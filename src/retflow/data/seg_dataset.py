"""Torch dataset of (image, mask) pairs from a prepared store with ``mask_shards/``.

Image ``i`` and mask ``i`` share the manifest's ``index``. Augmentations are applied jointly with
torchvision's ``tv_tensors`` (a random resized crop and flip move image and mask together; masks
are resampled NEAREST and never normalised).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision import tv_tensors

from retflow.data.dataset import StoreDataset, eval_transform, model_channels, seed_item, train_transform
from retflow.data.store import MASK_SHARD_DIR, ImageStore

__all__ = ["SegDataset", "seg_train_transform", "seg_eval_transform", "max_mask_value"]


# images and masks go through the classification transforms: torchvision v2 applies the
# geometric steps to both (a tv_tensors.Mask is resized with NEAREST) and dtype/normalisation
# to the image only
seg_train_transform = train_transform
seg_eval_transform = eval_transform


def max_mask_value(store: Path | str) -> int:
    """Largest label value in a store's masks (one pass over the memory-mapped shards)."""
    masks = ImageStore(store, MASK_SHARD_DIR)
    return max(int(np.load(p, mmap_mode="r").max()) for p in masks.paths)


class SegDataset(StoreDataset):
    """Rows ``indices`` of a store as (image float (C, S, S), mask int64 (S, S)) pairs; the store
    reading and per-item augmentation seeding are :class:`StoreDataset`'s."""

    def __init__(self, store: Path | str, indices, transform, in_chans: int):
        super().__init__(store, indices, None, transform, in_chans)
        self.masks = ImageStore(store, MASK_SHARD_DIR)

    def raw(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """The stored uint8 image (H, W, C) and mask (H, W) of item ``i``."""
        idx = int(self.indices[i])
        return self.images[idx], self.masks[idx][..., 0]

    def __getitem__(self, i: int):
        img_np, mask_np = self.raw(i)
        img = tv_tensors.Image(model_channels(torch.from_numpy(img_np).permute(2, 0, 1), self.in_chans))
        mask = tv_tensors.Mask(torch.from_numpy(mask_np)[None])
        if self.transform is not None:
            seed_item(self.aug_seed, i)
            img, mask = self.transform(img, mask)
        return img.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)[0].long()
