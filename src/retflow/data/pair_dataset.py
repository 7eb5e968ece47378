"""A torch dataset over pairs of two stores (a CFP and an OCT image of one eye, :mod:`retflow.data.pairing`)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from retflow.data.dataset import StoreDataset


class PairDataset(Dataset):
    """Item ``i``: (the CFP and the OCT image of pair ``i`` stacked along the channels, label).

    Each modality has its own transform (size, normalisation, channels) and its own augmentation
    stream: the two images of a pair are cropped and flipped independently."""

    def __init__(self, cfp_store, oct_store, cfp_indices, oct_indices, labels, cfp_transform, oct_transform,
                 cfp_chans: int, oct_chans: int):
        self.cfp = StoreDataset(cfp_store, cfp_indices, None, cfp_transform, cfp_chans)
        self.oct = StoreDataset(oct_store, oct_indices, None, oct_transform, oct_chans)
        if len(self.cfp) != len(self.oct):
            raise ValueError(f"{len(self.cfp)} CFP but {len(self.oct)} OCT indices")
        self.labels = np.asarray(labels)
        if not np.issubdtype(self.labels.dtype, np.floating):
            self.labels = self.labels.astype(np.int64)

    def set_aug_seed(self, seed: int | None) -> None:
        """Seed augmentations per (seed, modality, item): identical across resumes and worker counts."""
        self.cfp.set_aug_seed(None if seed is None else 2 * seed)
        self.oct.set_aug_seed(None if seed is None else 2 * seed + 1)

    def __len__(self) -> int:
        return len(self.cfp)

    def __getitem__(self, i: int):
        a, _ = self.cfp[i]
        b, _ = self.oct[i]
        return torch.cat([a, b], dim=0), self.labels[i]
