"""Benchmark pretraining data feeding: samples/s per core with each method's training augmentation.

Reads a memory-mapped store (written here: ``--n`` random uint8 images of ``--store-size`` px)
through the same DataLoader the trainer uses (one process, one torch thread = one core) and
prints samples/s and the ratio against the reference line (MAE's per-image CPU pipeline):

- ``mae cpu``: RandomResizedCrop + flip + normalise per image in the loader (reference);
- ``mae batch``: the loader only stacks uint8 images; crop/flip/normalise run as one batched
  ``roi_align`` call (:mod:`retflow.train.batch_augment`) - timed here on the CPU; ``loader only``
  is what is left on the CPU when that call runs on the GPU;
- ``simclr`` / ``dino`` / ``mocov3`` views: two colour-jittered, blurred, solarised views per image
  (DINO: plus its local crops).

Every pipeline is the one a run of ``--config`` (default: the paper's) on CFP gets: its crop scale,
normalisation and method sections, built by :func:`retflow.settings.build.pretrain` as the
workflow builds them; only the model input size is ``--size``.

Example: ``.venv/bin/python bench/bench_pretrain_loader.py --n 512 --store-size 256 --size 224``
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from retflow.data.dataset import StoreDataset, train_transform
from retflow.data.ssl_views import ssl_view_transform
from retflow.data.store import write_images
from retflow.settings import build, load_config
from retflow.train.batch_augment import BatchAugment
from retflow.train.sampling import loader


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=512, help="images in the store")
    p.add_argument("--store-size", type=int, default=256)
    p.add_argument("--size", type=int, default=224, help="model input size")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "config" / "retfound_paper.yaml"),
                   help="config whose runs on cfp give the pipelines (default: the paper's)")
    return p.parse_args(argv)


def throughput(dataset, batch: int, augment=None) -> float:
    order = np.random.default_rng(0).permutation(len(dataset))
    t0 = time.perf_counter()
    n = 0
    for x, _ in loader(dataset, order, batch, 0, 0):
        if augment is not None:
            x = augment(x)
        n += (x[0] if isinstance(x, list) else x).shape[0]
    return n / (time.perf_counter() - t0)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    config = load_config(args.config)
    runs = {m: build.pretrain(config, m, "cfp") for m in ("mae", "simclr", "dino", "mocov3")}
    mae = runs["mae"]
    normalize = mae.normalize.to_dict()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        rng = np.random.default_rng(0)
        write_images(store, (rng.integers(0, 256, (args.store_size, args.store_size, 3), dtype=np.uint8)
                             for _ in range(args.n)), shard_size=256)
        idx = np.arange(args.n)
        cpu = train_transform(args.size, mae.crop_scale, normalize=normalize, in_chans=3)
        lines = [("mae cpu (reference)", StoreDataset(store, idx, None, cpu, 3), None),
                 ("mae batch (roi_align)", StoreDataset(store, idx, None, None, 3),
                  BatchAugment(args.size, mae.crop_scale, normalize=normalize, in_chans=3)),
                 ("mae batch, loader only", StoreDataset(store, idx, None, None, 3), None)]
        for m in ("simclr", "dino", "mocov3"):
            s = runs[m]
            views = ssl_view_transform(m, s.method_settings, args.size, s.crop_scale, s.normalize.to_dict(), 3)
            lines.append((f"{m} {views.n_views} views", StoreDataset(store, idx, None, views, 3), None))
        print(f"store {args.n} x {args.store_size} px -> {args.size} px, batch {args.batch}, 1 core")
        ref = None
        for name, ds, aug in lines:
            rate = throughput(ds, args.batch, aug)
            ref = ref or rate
            print(f"{name:24} {rate:9.1f} samples/s   {rate / ref:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
