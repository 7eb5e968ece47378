"""Sharded sampling into store parts, and the merge of the parts into one synthetic store.

``n_images`` are cut into sampling jobs of ``shard_size`` images; job ``k`` makes images
``k * shard_size ...`` and writes them as a small store of its own (``shards/`` +
``manifest.parquet``, manifest last), so a cluster samples a million images in parallel and a
rerun of one job replaces exactly its images. The class of every image is fixed up front for all
``n_images`` (``class_balance``: ``pool`` = the pool's label frequencies, ``uniform`` = equal;
largest-remainder counts, shuffled with ``seed``) and each job seeds its noise with
``(seed, k)``; so the store does not depend on how many jobs run at once.

:func:`merge_parts` links (or copies) the parts' shard files into ``store/shards/`` and writes
``manifest.parquet`` last, in the format of a prepared real dataset: one row per image with
``index``, ``image_id``, ``patient_id`` (each synthetic image is its own "patient"), ``split``
= ``pool`` (as the real pretraining pools), ``dataset`` = ``synth_<modality>``, ``synthetic`` =
True, the label column (conditional generators), ``sha256`` and ``phash`` (as the leakage checks
read them) and the sampler settings.

A ``model.pth`` of a Stable-Diffusion fine-tune (``synth.sd_checkpoint``) samples through the diffusers
pipeline instead (:func:`load_generator`, :mod:`retflow.synth.stable_diffusion`), into the same format.

The architecture comes from the ``model.pth`` (the :class:`~retflow.settings.synth.SynthSettings` it
was trained with); the sampling job's own settings give the sampler, counts and seed, and are
written next to its part as ``settings.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from retflow.atomic import atomic_path, write_json
from retflow.data.leakage import phash
from retflow.data.store import SHARD_DIR, ShardWriter
from retflow.inference import pick_device
from retflow.settings.synth import SynthSettings
from retflow.synth import autoencoder as aek
from retflow.synth import ldm
from retflow.synth.pool import to_store
from retflow.train.checkpoint import load_state


def shard_range(k: int, n_images: int, shard_size: int) -> tuple[int, int]:
    """Global image indices ``[start, stop)`` of sampling job ``k``."""
    start = k * shard_size
    if k < 0 or start >= n_images:
        raise ValueError(f"shard {k} is outside the {-(-n_images // shard_size)} shards of n_images {n_images} "
                         f"(shard_size {shard_size})")
    return start, min(n_images, start + shard_size)


def class_plan(class_counts: list[int], n_images: int, balance: str, seed: int) -> np.ndarray:
    """The class index of every one of the ``n_images`` images (largest-remainder allocation)."""
    counts = np.asarray(class_counts, dtype=float)
    if balance == "uniform":
        p = np.ones_like(counts)
    elif balance == "pool":
        p = counts.copy()
    else:
        raise ValueError(f"synth.class_balance: unknown value {balance!r} (pool | uniform)")
    if p.sum() <= 0:
        raise ValueError("synth.class_balance: the pool has no labelled image to take class frequencies from")
    share = p / p.sum() * n_images
    alloc = np.floor(share).astype(int)
    rest = n_images - alloc.sum()
    alloc[np.argsort(-(share - alloc), kind="stable")[:rest]] += 1
    labels = np.repeat(np.arange(len(counts)), alloc)
    return np.random.default_rng([seed, 1]).permutation(labels)


class Generator:
    """The trained generator of one modality (EMA weights) ready to sample."""

    #: whether guidance applies without class labels (an unconditional MONAI generator has no guidance)
    guides_unconditional = False

    def __init__(self, model_path: str | Path | dict, device: torch.device):
        self.bundle = model_path if isinstance(model_path, dict) else load_state(model_path)
        if self.bundle.get("kind") == "stable_diffusion":
            raise ValueError("this model.pth is a Stable-Diffusion fine-tune: load it with "
                             "retflow.synth.sample.load_generator")
        s = trained_settings(self.bundle, "model.pth" if isinstance(model_path, dict) else model_path)
        self.settings = s
        self.device = device
        channels = int(self.bundle["store_shape"][2])
        self.ae = aek.build_autoencoder(s.autoencoder, channels).to(device).eval()
        self.ae.load_state_dict(self.bundle["autoencoder"])
        self.classes = list(self.bundle["classes"])
        self.unet = ldm.build_unet(s.unet, int(s.autoencoder.latent_channels), len(self.classes))
        self.unet.load_state_dict(self.bundle["unet"])
        self.unet = self.unet.to(device).eval()
        side = int(s.image_size) // aek.downsampling(s.autoencoder)
        self.latent_shape = (int(s.autoencoder.latent_channels), side, side)
        self.null_class = len(self.classes) if self.classes else None

    @torch.no_grad()
    def sample(self, labels: np.ndarray | None, n: int, scheduler: str, steps: int, guidance: float,
               generator: torch.Generator, batch: int = 64) -> np.ndarray:
        """``n`` uint8 images (n, H, W, C) at the real store's shape; ``labels`` class indices or None."""
        s = self.settings
        sched = ldm.make_scheduler(scheduler, s.train_timesteps, s.beta_schedule, s.prediction)
        out = []
        for start in range(0, n, batch):
            m = min(batch, n - start)
            y = None if labels is None else torch.as_tensor(labels[start:start + m], dtype=torch.long)
            z = ldm.sample_latents(self.unet, sched, (m, *self.latent_shape), y, self.null_class, guidance, steps,
                                   generator, self.device)
            x = aek.decode(self.ae, z / float(self.bundle["latent_scale"]))
            out.append(to_store(x, tuple(self.bundle["store_shape"])))
        return np.concatenate(out) if out else np.zeros((0, *self.bundle["store_shape"]), np.uint8)


def trained_settings(bundle: dict, where: str | Path = "model.pth") -> SynthSettings:
    """The :class:`SynthSettings` a ``model.pth`` bundle was trained with; other ones (a ``model.pth`` of
    an older retflow: rerun rule synth_train) are an error naming ``where``."""
    return SynthSettings.from_dict(bundle["settings"], f"{where}: settings")


def load_generator(model_path: str | Path, device: torch.device):
    """The generator ``model_path`` holds: the MONAI latent diffusion model or a Stable-Diffusion fine-tune."""
    bundle = load_state(model_path)
    if bundle.get("kind") == "stable_diffusion":
        from retflow.synth.stable_diffusion import SDGenerator

        return SDGenerator(bundle, device)
    return Generator(bundle, device)


def sample_shard(model_path: str | Path, settings: SynthSettings, shard: int, out_dir: str | Path) -> pd.DataFrame:
    """Sampling job ``shard``: write ``settings.json`` and its images as a store (``shards/`` +
    ``manifest.parquet``, last) in ``out_dir``."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    n_images, shard_size, seed = int(settings.n_images), int(settings.shard_size), int(settings.seed)
    start, stop = shard_range(shard, n_images, shard_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings.write(out_dir / "settings.json")
    device = pick_device(settings.device)
    gen = load_generator(model_path, device)
    labels = None
    if gen.classes:
        labels = class_plan(gen.bundle["class_counts"], n_images, settings.class_balance, seed)[start:stop]
    noise = torch.Generator(device=device).manual_seed(int(np.random.SeedSequence([seed, shard]).generate_state(1)[0]))
    images = gen.sample(labels, stop - start, settings.scheduler, int(settings.steps),
                        float(settings.guidance_scale), noise, int(settings.sample_batch))
    seconds = time.perf_counter() - t0
    writer = ShardWriter(out_dir, shard_size=max(1, len(images)))
    rows = []
    try:
        for i, img in enumerate(images):
            g = start + i
            row = {"index": writer.add(img), "sample_index": g, "image_id": f"synth_{settings.modality}_{g:07d}"}
            row["patient_id"] = row["image_id"]
            if labels is not None:
                row["class_index"] = int(labels[i])
                row[gen.settings.condition.label] = str(gen.classes[int(labels[i])])
            row.update(sha256=hashlib.sha256(np.ascontiguousarray(img).tobytes()).hexdigest(), phash=phash(img))
            rows.append(row)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    manifest = pd.DataFrame(rows)
    manifest["eye"] = ""
    manifest["synthetic"] = True
    manifest["split"] = "pool"
    manifest["dataset"] = f"synth_{settings.modality}"
    manifest["shard"] = int(shard)
    manifest["sampler"] = settings.scheduler
    manifest["sampler_steps"] = int(settings.steps)
    guided = labels is not None or gen.guides_unconditional
    manifest["guidance_scale"] = float(settings.guidance_scale) if guided else float("nan")
    manifest["seed"] = seed
    manifest["sample_seconds"] = seconds / max(1, len(images))  # per image, this job's wall time
    with atomic_path(out_dir / "manifest.parquet") as tmp:
        manifest.to_parquet(tmp, index=False)
    return manifest


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or no hard links: copy
        shutil.copy2(src, dst)


def merge_parts(parts: list[str | Path], out_dir: str | Path) -> dict:
    """Merge sampling parts (in the given order) into one store in ``out_dir``; returns its qc dict."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{SHARD_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    frames, offset, k, shape = [], 0, 0, None
    try:
        for part in parts:
            part = Path(part)
            manifest = pd.read_parquet(part / "manifest.parquet").sort_values("index")
            n_part = 0
            for f in sorted((part / SHARD_DIR).glob("shard-*.npy")):
                arr = np.load(f, mmap_mode="r")
                if shape is None:
                    shape = tuple(arr.shape[1:])
                elif tuple(arr.shape[1:]) != shape:
                    raise ValueError(f"part {part}: images of shape {tuple(arr.shape[1:])}, not {shape}")
                n_part += arr.shape[0]
                _link(f, tmp / f"shard-{k:05d}.npy")
                k += 1
            if n_part != len(manifest):
                raise ValueError(f"part {part}: {len(manifest)} manifest rows but {n_part} images")
            manifest = manifest.assign(index=manifest["index"] + offset)
            offset += n_part
            frames.append(manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not frames or offset == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError("no synthetic images to merge")
    final = out_dir / SHARD_DIR
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    manifest = pd.concat(frames, ignore_index=True)
    if manifest["image_id"].duplicated().any():
        raise ValueError("duplicate synthetic image ids across parts (two parts of the same shard?)")
    with atomic_path(out_dir / "manifest.parquet") as t:
        manifest.to_parquet(t, index=False)
    seconds = float((manifest["sample_seconds"]).sum())
    label_cols = [c for c in manifest.columns if c not in _FIXED_COLUMNS]
    qc = {"dataset": manifest["dataset"].iloc[0], "synthetic": True, "n_images": int(len(manifest)),
          "shape": [int(len(manifest)), *shape], "n_shards": k, "label_columns": label_cols,
          "class_counts": {c: manifest[c].value_counts().sort_index().to_dict() for c in label_cols},
          "sampler": manifest["sampler"].iloc[0], "sampler_steps": int(manifest["sampler_steps"].iloc[0]),
          "sample_seconds": round(seconds, 2), "images_per_second": round(len(manifest) / max(seconds, 1e-9), 3),
          "split_counts": manifest["split"].value_counts().to_dict()}
    write_json(qc, out_dir / "qc.json")
    return qc


_FIXED_COLUMNS = {"index", "sample_index", "image_id", "patient_id", "class_index", "sha256", "phash", "eye",
                  "synthetic", "split", "dataset", "shard", "sampler", "sampler_steps", "guidance_scale", "seed",
                  "sample_seconds"}


def main_sample(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Sample one shard of synthetic images into a store part.")
    ap.add_argument("--model", required=True, help="model.pth of retflow.synth.train_ldm")
    ap.add_argument("--settings", required=True,
                    help="SynthSettings as JSON (retflow.synth.settings.modality_settings(config, modality).to_json())")
    ap.add_argument("--shard", type=int, required=True)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        manifest = sample_shard(args.model, SynthSettings.from_json(args.settings), args.shard, args.out_dir)
    except ValueError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    dt = time.perf_counter() - t0
    print(f"shard {args.shard}: {len(manifest)} images in {dt:.1f}s ({len(manifest) / dt:.2f} img/s) -> {args.out_dir}")
    return 0


def main_merge(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Merge sampled parts into the synthetic store.")
    ap.add_argument("--parts", nargs="+", required=True, help="part folders, in shard order")
    ap.add_argument("--out-dir", required=True)
    args = ap.parse_args(argv)
    try:
        qc = merge_parts(args.parts, args.out_dir)
    except ValueError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(qc))
    return 0
