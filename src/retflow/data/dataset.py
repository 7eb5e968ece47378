"""Torch datasets over prepared stores (image shards + ``manifest.parquet``)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from retflow.data.labels import normalise_label
from retflow.data.store import ImageStore

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_manifest(store: Path | str) -> pd.DataFrame:
    return pd.read_parquet(Path(store) / "manifest.parquet")


def norm_stats(normalize: dict | None, in_chans: int) -> tuple[tuple, tuple]:
    """Per-channel (mean, std) for the model input; one value is broadcast, three are averaged
    for a one-channel patch embedding. Default: ImageNet statistics (as RETFound)."""
    normalize = normalize or {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    out = []
    for key in ("mean", "std"):
        vals = [float(v) for v in normalize[key]]
        if len(vals) != in_chans:
            vals = [float(np.mean(vals))] * in_chans
        out.append(tuple(vals))
    return out[0], out[1]


def train_transform(size: int, crop_scale=(0.2, 1.0), hflip: bool = True, normalize: dict | None = None,
                    in_chans: int = 3) -> v2.Compose:
    steps = [v2.RandomResizedCrop(size, scale=tuple(crop_scale), antialias=True)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps + _to_float(normalize, in_chans))


def eval_transform(size: int, normalize: dict | None = None, in_chans: int = 3) -> v2.Compose:
    return v2.Compose([v2.Resize((size, size), antialias=True)] + _to_float(normalize, in_chans))


def _to_float(normalize: dict | None, in_chans: int):
    mean, std = norm_stats(normalize, in_chans)
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def model_channels(img: torch.Tensor, in_chans: int) -> torch.Tensor:
    """uint8 (C, H, W) -> the patch embedding's channels: grayscale replicated, colour averaged."""
    if img.shape[0] == 1 and in_chans == 3:  # grayscale OCT into an RGB patch embed
        return img.expand(3, -1, -1)
    if img.shape[0] == 3 and in_chans == 1:  # colour into a 1-channel patch embed
        return img.float().mean(0, keepdim=True).round().to(torch.uint8)
    return img


def seed_item(aug_seed: int | None, i: int) -> None:
    """Seed augmentations per (seed, item) -- torch (v2 transforms) and random (timm RandAugment) --
    so they are identical across resumes and worker counts; no-op without a seed.

    Only the CPU generator: the transforms run on the CPU, and ``torch.manual_seed`` would also queue a
    lazy CUDA/XPU/MTIA seeding per item, each recording a stack trace (a fifth of a demo fine-tune's time)."""
    if aug_seed is None:
        return
    item_seed = int(np.random.SeedSequence([aug_seed, i]).generate_state(1)[0])
    torch.random.default_generator.manual_seed(item_seed)
    random.seed(item_seed)


def target_array(labels) -> np.ndarray | None:
    """A dataset's targets as it returns them: class indices (int64), multilabel 0/1 rows or
    regression values (float32, kept); None (unlabelled) stays None."""
    if labels is None:
        return None
    labels = np.asarray(labels)
    return labels if np.issubdtype(labels.dtype, np.floating) else labels.astype(np.int64)


class StoreItems(Dataset):
    """What the 2-D and 3-D store datasets share: item ``i`` is stored item ``indices[i]`` with target
    ``labels[i]`` (:func:`target_array`; None: unlabelled, target -1), its augmentations seeded per
    (seed, item) by :meth:`set_aug_seed` (:func:`seed_item`)."""

    def __init__(self, indices, labels=None):
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = target_array(labels)
        self.aug_seed: int | None = None

    def set_aug_seed(self, seed: int | None) -> None:
        """Seed augmentations per (seed, item): identical across resumes and worker counts."""
        self.aug_seed = seed

    def __len__(self) -> int:
        return len(self.indices)

    def target(self, i: int):
        return -1 if self.labels is None else self.labels[i]


class StoreDataset(StoreItems):
    """Rows ``indices`` of a store as (image tensor C x H x W, label) pairs.

    Images are read lazily from a memory-mapped array; grayscale (OCT) images are replicated to
    ``in_chans`` channels at model input. ``labels`` (class indices) may be None for
    unlabelled pretraining, in which case the label is -1.
    """

    def __init__(self, store: Path | str, indices, labels=None, transform=None, in_chans: int = 3):
        super().__init__(indices, labels)
        self.images = ImageStore(store)
        self.transform = transform
        self.in_chans = in_chans

    def __getitem__(self, i: int):
        img = model_channels(torch.from_numpy(self.images[int(self.indices[i])]).permute(2, 0, 1), self.in_chans)
        if self.transform is not None:
            seed_item(self.aug_seed, i)
            img = self.transform(img)
        return img, self.target(i)


def encode_labels(values: pd.Series, classes: list) -> tuple[np.ndarray, np.ndarray]:
    """Map raw label values to class indices; returns (indices, valid mask). Unknown/NaN -> invalid."""
    lookup = {str(c): i for i, c in enumerate(classes)}
    mapped = values.map(lambda v: lookup.get(normalise_label(v)))
    valid = mapped.notna().to_numpy()
    return mapped.fillna(-1).astype(int).to_numpy(), valid
