"""Benchmark synthetic-image generation: images/s with DDIM (50 steps) vs DDPM (1000 steps).

Both samplers run in this process on the same generator (the latent diffusion model of
``retflow.synth``: class-conditional UNet with classifier-free guidance, then the autoencoder's
decoder, then the resize into the store's size), so the ratio is a like-for-like comparison.
The networks are built from a config's ``synth`` section (default: config/demo_synth.yaml) with
random weights -- speed does not depend on the weights -- or loaded from a trained ``model.pth``.

Example (CPU, this machine)::

    .venv/bin/python bench/bench_synth.py                       # demo sizes, 32 / 4 images
    .venv/bin/python bench/bench_synth.py --model results/synth/cfp/ldm/model.pth --threads 2

On a GPU: ``--device cuda --ddim-images 512 --ddpm-images 64 --batch 256``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from retflow.inference import pick_device
from retflow.settings import load_config
from retflow.synth import autoencoder as aek
from retflow.synth import ldm
from retflow.synth.sample import Generator
from retflow.synth.settings import modalities, modality_settings

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "config/demo_synth.yaml"), help="config with a synth section")
    p.add_argument("--model", default=None, help="trained model.pth (default: random weights from --config)")
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--ddpm-steps", type=int, default=1000)
    p.add_argument("--ddim-images", type=int, default=32)
    p.add_argument("--ddpm-images", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--guidance", type=float, default=None, help="default: the config's guidance_scale")
    p.add_argument("--store-size", type=int, default=None, help="default: the config's preprocess size")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    return p.parse_args(argv)


def random_generator(config_path: str, device: torch.device, store_size: int | None) -> Generator:
    """A Generator with random weights and the config's architecture (no training, nothing read)."""
    cfg = load_config(config_path)  # validated, schema defaults filled
    m = modalities(cfg)[0]
    s = modality_settings(cfg, m)
    side = store_size or cfg["preprocess"][m]["size"]
    channels = 3 if m == "cfp" else 1
    classes = list(s.condition.classes) if s.condition else []
    gen = Generator.__new__(Generator)
    gen.settings, gen.device, gen.classes = s, device, classes
    gen.ae = aek.build_autoencoder(s.autoencoder, channels).to(device).eval()
    gen.unet = ldm.build_unet(s.unet, int(s.autoencoder.latent_channels), len(classes)).to(device).eval()
    lat = int(s.image_size) // aek.downsampling(s.autoencoder)
    gen.latent_shape = (int(s.autoencoder.latent_channels), lat, lat)
    gen.null_class = len(classes) if classes else None
    gen.bundle = {"latent_scale": 1.0, "store_shape": [side, side, channels], "settings": s.to_dict(),
                  "classes": classes}
    return gen


def time_sampler(gen: Generator, sampler: str, steps: int, n: int, batch: int, guidance: float) -> float:
    labels = None
    if gen.classes:
        labels = torch.arange(n) % len(gen.classes)
    g = torch.Generator(device=gen.device).manual_seed(0)
    gen.sample(labels if labels is None else labels.numpy(), min(n, 2), sampler, min(steps, 3), guidance, g, batch)
    if gen.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    gen.sample(labels if labels is None else labels.numpy(), n, sampler, steps, guidance, g, batch)
    if gen.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    gen = Generator(args.model, device) if args.model else random_generator(args.config, device, args.store_size)
    s = gen.settings
    guidance = s.guidance_scale if args.guidance is None else args.guidance
    n_params = sum(p.numel() for p in gen.unet.parameters()) / 1e6
    passes = "2 UNet passes/step" if gen.classes and guidance != 1 else "1 UNet pass/step"
    print(f"device {device} ({torch.get_num_threads()} threads); image {s.image_size} px -> store "
          f"{gen.bundle['store_shape']}; latent {gen.latent_shape}; UNet {n_params:.2f} M params; "
          f"classes {len(gen.classes)}; guidance {guidance} ({passes})")
    rows = []
    for sampler, steps, n in (("ddim", args.ddim_steps, args.ddim_images), ("ddpm", args.ddpm_steps, args.ddpm_images)):
        secs = time_sampler(gen, sampler, steps, n, args.batch, guidance)
        rows.append((sampler, steps, n, secs, n / secs))
    print(f"{'sampler':8} {'steps':>6} {'images':>7} {'seconds':>9} {'images/s':>10}")
    for sampler, steps, n, secs, ips in rows:
        print(f"{sampler:8} {steps:>6} {n:>7} {secs:>9.2f} {ips:>10.3f}")
    print(f"DDIM {args.ddim_steps} / DDPM {args.ddpm_steps} throughput ratio: {rows[0][4] / rows[1][4]:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
