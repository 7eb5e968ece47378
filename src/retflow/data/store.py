"""The preprocessed image store: uint8 arrays in memory-mapped ``.npy`` shards.

A store folder holds ``shards/shard-00000.npy`` ... (each ``(n, H, W, C)`` uint8, ``C`` = 3 for
CFP, 1 for OCT) next to ``manifest.parquet``; row ``index`` of the manifest is the image's
position across the shards in order. Shards are written one at a time (memory stays bounded by
one shard) into a temporary folder that is renamed into place when complete, so a killed
preparation never leaves a half-written store behind. Readers memory-map the shards: a
DataLoader worker touches only the pages of the images it reads.

Segmentation datasets also hold ``mask_shards/`` (:data:`MASK_SHARD_DIR`): uint8 label maps
``(n, H, W, 1)`` written in step with the images, so mask ``i`` belongs to image ``i``; writer and
reader take the folder name as ``folder``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from retflow.atomic import atomic_path

SHARD_DIR = "shards"
MASK_SHARD_DIR = "mask_shards"


class ShardWriter:
    """Append images one by one; every ``shard_size`` images become one ``.npy`` shard."""

    def __init__(self, store_dir: Path | str, shard_size: int = 4096, folder: str = SHARD_DIR):
        self.final = Path(store_dir) / folder
        self.tmp = Path(store_dir) / f".{folder}.tmp-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.shard_size = shard_size
        self.buffer: list[np.ndarray] = []
        self.n_shards = 0
        self.count = 0
        self.shape: tuple[int, ...] | None = None

    def add(self, img: np.ndarray) -> int:
        """Store one uint8 image; returns its global index."""
        if self.shape is None:
            self.shape = img.shape
        elif img.shape != self.shape:
            raise ValueError(f"image shape {img.shape} differs from the store's {self.shape}")
        self.buffer.append(np.asarray(img, dtype=np.uint8))
        self.count += 1
        if len(self.buffer) >= self.shard_size:
            self._flush()
        return self.count - 1

    def _flush(self) -> None:
        if not self.buffer:
            return
        with atomic_path(self.tmp / f"shard-{self.n_shards:05d}.npy") as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, np.stack(self.buffer))
        self.n_shards += 1
        self.buffer = []

    def close(self) -> list[int]:
        """Write the last shard and move the shard folder into place; returns the shape."""
        self._flush()
        shutil.rmtree(self.final, ignore_errors=True)
        os.replace(self.tmp, self.final)
        return [self.count, *(self.shape or ())]

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class ImageStore:
    """Random access to the images of a store by global index (memory-mapped, lazy)."""

    def __init__(self, store_dir: Path | str, folder: str = SHARD_DIR):
        folder = Path(store_dir) / folder
        self.paths = sorted(folder.glob("shard-*.npy"))
        if not self.paths:
            raise FileNotFoundError(f"no image shards in {folder} (prepare the dataset first)")
        sizes = [np.load(p, mmap_mode="r").shape[0] for p in self.paths]
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _shard(self, k: int) -> np.ndarray:
        if k not in self._maps:  # opened lazily, so each DataLoader worker maps its own
            self._maps[k] = np.load(self.paths[k], mmap_mode="r")
        return self._maps[k]

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(f"image index {index} outside the store (0..{len(self) - 1})")
        k = int(np.searchsorted(self.starts, index, side="right")) - 1
        return np.array(self._shard(k)[index - self.starts[k]])

    def __getstate__(self):  # do not pickle open memory maps into worker processes
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state


def write_images(store_dir: Path | str, images, shard_size: int = 4096) -> list[int]:
    """Write an iterable of uint8 images as a store's shards (tests, benchmarks, conversions)."""
    writer = ShardWriter(store_dir, shard_size)
    try:
        for img in images:
            writer.add(img)
    except BaseException:
        writer.abort()
        raise
    return writer.close()
