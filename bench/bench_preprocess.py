"""Data-stage throughput on real fundus photos (HRF, 3504 x 2336 JPEG).

Prints figures, as ratios against a reference measured in the same process:

1. Preprocessing (read + field detection + crop + resize + hashes), images/s with 1 and 2
   worker processes; JPEG draft decoding vs full decoding (reference).
2. Loader throughput in augmented 224 px samples/s (RandomResizedCrop + flip + normalise, the
   fine-tuning transform) from the preprocessed store (256 px uint8 shards, memory-mapped)
   vs decoding the original JPEGs every epoch (reference: what an ImageFolder of the raw files does).

    python bench/bench_preprocess.py [--images ../shared/data/real/hrf/images] [--samples 180]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from retflow.data.dataset import StoreDataset, train_transform  # noqa: E402
from retflow.data.prepare import _map, _work  # noqa: E402
from retflow.data.store import write_images  # noqa: E402
from retflow.settings import section_defaults  # noqa: E402

PREP = section_defaults("preprocess")  # the workflow's defaults: 256 px, min_side 32


class JpegDataset(Dataset):
    """Decode the original JPEG every time (no preprocessing store)."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as im:
            img = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
        return self.transform(img), 0


def preprocessing(paths: list[Path], workers: int, draft: bool, repeat: int = 1) -> tuple[float, list[np.ndarray]]:
    records = [{"image_id": p.stem, "source": str(p), "patient_id": p.stem, "eye": "", "given_split": ""}
               for p in paths] * repeat
    worker = partial(_work, modality="cfp", prep=PREP, volume=False, jpeg_draft=draft)
    images, t_first = [], None
    for result in _map(records, worker, workers):
        assert result[0] == "ok", result
        images += result[2]
        t_first = t_first or time.perf_counter()
    # steady state: from the first finished image on (worker start-up excluded)
    rate = (len(records) - 1) / (time.perf_counter() - t_first)
    return rate, images[: len(paths)]


def loader_rate(dataset: Dataset, samples: int, workers: int, batch: int = 16) -> float:
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0, drop_last=False)
    seen, t0 = 0, None
    while seen < samples:
        for imgs, _ in loader:
            if t0 is None:  # exclude worker start-up and the first batch
                t0 = time.perf_counter()
                continue
            seen += imgs.shape[0]
            if seen >= samples:
                break
    return seen / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", default=str(ROOT.parent / "shared/data/real/hrf/images"))
    ap.add_argument("--samples", type=int, default=180, help="augmented samples per loader measurement")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        print(f"no images in {args.images}")
        return 1
    torch.set_num_threads(1)
    print(f"{len(paths)} images from {args.images}; 2-core figures, same process")
    print("\n1. preprocessing (decode + field + crop + 256 px + sha256 + pHash)")
    full1, _ = preprocessing(paths, 1, draft=False)
    draft1, stored = preprocessing(paths, 1, draft=True)
    draft2, _ = preprocessing(paths, args.workers, draft=True, repeat=3)
    print(f"   full JPEG decode, 1 worker   : {full1:6.2f} img/s  (reference)")
    print(f"   draft JPEG decode, 1 worker  : {draft1:6.2f} img/s  ({draft1 / full1:.2f}x)")
    print(f"   draft JPEG decode, {args.workers} workers : {draft2:6.2f} img/s  ({draft2 / full1:.2f}x)")

    print(f"\n2. loader, augmented 224 px samples/s ({args.workers} DataLoader workers)")
    tf = train_transform(224, (0.5, 1.0))
    jpeg = loader_rate(JpegDataset(paths, tf), max(32, args.samples // 4), args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        write_images(tmp, stored)
        store = loader_rate(StoreDataset(tmp, np.arange(len(stored)), np.zeros(len(stored)), tf), args.samples,
                            args.workers)
    print(f"   decode original JPEGs        : {jpeg:7.1f} samples/s  (reference)")
    print(f"   preprocessed store (shards)  : {store:7.1f} samples/s  ({store / jpeg:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
