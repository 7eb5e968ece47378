"""A torch dataset over a store's whole volumes (``volume_shards/``, :mod:`retflow.data.volume_store`).

The 3-D counterpart of :class:`retflow.data.dataset.StoreDataset`: the same targets
(:func:`~retflow.data.dataset.target_array`; -1 when unlabelled), normalisation statistics
(:func:`~retflow.data.dataset.norm_stats`, the ``preprocess.oct.normalize`` form) and per-item
augmentation seeding (:class:`~retflow.data.dataset.StoreItems`, which both extend). The one augmentation (``train``)
is a random flip along the A-scan axis; no crops, no resizing (the store holds the model's size).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from retflow.data.dataset import StoreItems, norm_stats, seed_item
from retflow.data.store import ImageStore
from retflow.data.volume_store import VOLUME_INDEX, VOLUME_SHARD_DIR


def volume_rows(manifest: pd.DataFrame) -> pd.DataFrame:
    """One manifest row per stored volume (the first of its B-scan rows), in manifest order: the
    rows a :class:`VolumeDataset` and its targets (``retflow.train.targets.encode_targets``) take."""
    if VOLUME_INDEX not in manifest.columns:
        raise ValueError(f"the manifest has no '{VOLUME_INDEX}' column: its store holds no {VOLUME_SHARD_DIR}/ "
                         f"(set preprocess.oct.volume and prepare the dataset again)")
    return manifest.drop_duplicates(VOLUME_INDEX)


class VolumeDataset(StoreItems):
    """Whole volumes as (float tensor ``(1, D, H, W)``, target) pairs.

    ``manifest_rows``: one manifest row per volume (:func:`volume_rows`); ``labels``: their
    targets in the same order (class indices, multilabel rows or regression values), None for
    unlabelled pretraining (target -1). Voxels are scaled to [0, 1] and normalised with
    ``normalize`` (``{mean, std}``; several values are averaged to the one channel; None:
    ImageNet's, as the 2-D dataset). ``train``: flip each volume along the A-scan axis with
    probability 0.5, seeded per item by :meth:`set_aug_seed` like the 2-D augmentations.
    """

    def __init__(self, store_dir: Path | str, manifest_rows: pd.DataFrame, labels=None,
                 normalize: dict | None = None, train: bool = False):
        rows = volume_rows(manifest_rows)
        if len(rows) != len(manifest_rows):
            raise ValueError(f"{len(manifest_rows) - len(rows)} manifest rows repeat a {VOLUME_INDEX}: pass one "
                             f"row per volume (retflow.data.volume_dataset.volume_rows(manifest))")
        super().__init__(manifest_rows[VOLUME_INDEX].to_numpy(dtype=np.int64), labels)
        if self.labels is not None and len(self.labels) != len(self.indices):
            raise ValueError(f"{len(self.labels)} labels for {len(self.indices)} volumes: give one per manifest row")
        self.volumes = ImageStore(store_dir, folder=VOLUME_SHARD_DIR)
        (mean,), (std,) = norm_stats(normalize, 1)
        self.mean, self.std = mean, std
        self.train = train

    def __getitem__(self, i: int):
        vol = torch.from_numpy(self.volumes[int(self.indices[i])]).float().div_(255.0)
        vol = vol.sub_(self.mean).div_(self.std)[None]  # (1, D, H, W)
        if self.train:
            seed_item(self.aug_seed, i)
            if torch.rand(()) < 0.5:
                vol = vol.flip(-1)  # the A-scan axis: a left-right mirror of every B-scan
        return vol, self.target(i)
