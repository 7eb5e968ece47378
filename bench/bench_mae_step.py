"""Benchmark the MAE pretraining step: throughput, model FLOPs utilisation (MFU), peak memory.

For every (arch, mask ratio) it times two versions of the same step in this process:

- ``reference``: written the way facebookresearch/mae's ``models_mae.py`` runs it - plain
  attention (``softmax(q k^T) v`` as explicit matmuls), fp32, per-sample gather masking,
  ``torch.optim.AdamW`` (for-each);
- ``retflow``: what ``retflow.train.pretrain`` runs - timm's fused SDPA attention, bf16 autocast
  and fused AdamW on CUDA, ``torch.compile`` with ``--compile``;

with the recipe of a config's MAE run on CFP (``--config``, default the paper's: decoder,
``norm_pix_loss``, weight decay, blr, the CFP and OCT mask ratios; built by
:func:`retflow.settings.build.pretrain` as the workflow builds it), and prints img/s, the ratio
retflow / reference, model GFLOPs per image (counted by ``torch.utils.flop_counter`` on one
forward + backward), achieved TFLOP/s, MFU against the
device's peak (``--peak-tflops``; default: H100 SXM bf16 dense 989 on an H100, else the matmul
peak measured here in this process) and peak memory: on CUDA ``max_memory_allocated``; on the CPU
each version runs in a fresh child process and the figure is its peak resident memory
(``ru_maxrss``) minus its resident memory before the model was built (weights, gradients, AdamW
state and activations of the step).

Example (CPU, this machine)::

    .venv/bin/python bench/bench_mae_step.py --archs tiny base large --batch 16 8 4 --steps 3

On an H100: ``--archs large --batch 256 --steps 20 --warmup 5 [--compile]``.
"""
from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch
from bench_common import device_name, mfu_peak, pick_device, run_measure, sync
from torch.utils.flop_counter import FlopCounterMode

from retflow.models import MaskedAutoencoderViT, ViTSpec, param_groups_weight_decay
from retflow.settings import build as build_settings
from retflow.settings import load_config
from retflow.settings.stages import PretrainSettings

ROOT = Path(__file__).resolve().parents[1]

ARCHS = {"tiny": "vit_tiny_patch16_224", "small": "vit_small_patch16_224", "base": "vit_base_patch16_224",
         "large": "vit_large_patch16_224"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=["tiny", "base", "large"], choices=sorted(ARCHS))
    p.add_argument("--batch", nargs="+", type=int, default=[16, 8, 4], help="one per arch (or one for all)")
    p.add_argument("--config", default=str(ROOT / "config" / "retfound_paper.yaml"),
                   help="config whose mae run on cfp gives the recipe (default: the paper's)")
    p.add_argument("--mask-ratios", nargs="+", type=float, help="default: the config's CFP and OCT mask ratios")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the retflow step")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: see module doc)")
    return p.parse_args(argv)


def build(arch: str, img_size: int, device, plain_attention: bool, s: PretrainSettings) -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    dec = s.decoder
    model = MaskedAutoencoderViT(ViTSpec(ARCHS[arch], img_size, 16, 3, {}), dec.embed_dim, dec.depth, dec.num_heads,
                                 s.norm_pix_loss).to(device)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = not plain_attention
    return model


def model_flops(arch: str, batch: int, img_size: int, mask_ratio: float, device, s: PretrainSettings) -> float:
    """FLOPs of one forward + backward, counted on the plain-attention fp32 model (the same
    'model FLOPs' for both versions, so MFU compares like with like)."""
    model = build(arch, img_size, device, plain_attention=True, s=s)
    imgs = torch.randn(batch, 3, img_size, img_size, device=device)
    with FlopCounterMode(display=False) as counter:
        model(imgs, mask_ratio)[0].backward()
    return counter.get_total_flops()


def time_step(model, batch: int, img_size: int, mask_ratio: float, device, fast: bool, compile_: bool,
              steps: int, warmup: int, flops: float, s: PretrainSettings) -> dict:
    bf16 = fast and device.type == "cuda"
    extra = {"fused": True} if fast and device.type == "cuda" else {"foreach": True}
    opt = torch.optim.AdamW(param_groups_weight_decay(model, s.weight_decay), lr=s.schedule(batch).lr,
                            betas=(0.9, 0.95), **extra)
    run = torch.compile(model) if compile_ else model
    imgs = torch.randn(batch, 3, img_size, img_size, device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = run(imgs, mask_ratio)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    dt = (time.perf_counter() - t0) / steps
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"img_s": batch / dt, "step_ms": 1000 * dt, "gflop_img": flops / batch / 1e9,
            "tflops": flops / dt / 1e12, "mem": mem, "dtype": "bf16" if bf16 else "fp32"}


def rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def measure(arch: str, img_size: int, plain: bool, batch: int, ratio: float, device_str: str, compile_: bool,
            steps: int, warmup: int, flops: float, settings_json: str, threads: int | None = None) -> dict:
    """Build one version and time its step; on the CPU, run in a child process for its memory peak
    (the settings travel as JSON: a record's read-only mappings do not pickle)."""
    if threads:
        torch.set_num_threads(threads)
    s = PretrainSettings.from_json(settings_json)
    device = torch.device(device_str)
    before = rss_bytes()
    model = build(arch, img_size, device, plain_attention=plain, s=s)
    r = time_step(model, batch, img_size, ratio, device, fast=not plain, compile_=compile_ and not plain,
                  steps=steps, warmup=warmup, flops=flops, s=s)
    if device.type == "cpu" and before:
        r["mem"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before) / 2**30
    return r


def main(argv=None) -> None:
    args = parse_args(argv)
    config = load_config(args.config)
    s = build_settings.pretrain(config, "mae", "cfp")
    ratios = args.mask_ratios or [config["pretrain"]["mask_ratio"][m] for m in ("cfp", "oct")]
    device = pick_device(args.device)
    batches = args.batch if len(args.batch) == len(args.archs) else args.batch[:1] * len(args.archs)
    name = device_name(device)
    peak, peak_src = mfu_peak(device, args.peak_tflops)
    print(f"device: {name}; MFU against {peak:.3g} TFLOP/s ({peak_src}); recipe: {args.config} "
          f"(decoder {s.decoder.embed_dim}x{s.decoder.depth}, {s.decoder.num_heads} heads)")
    print(f"{'arch':6} {'mask':>5} {'batch':>5} {'version':9} {'dtype':5} {'img/s':>9} {'ratio':>6} "
          f"{'GFLOP/img':>9} {'TFLOP/s':>8} {'MFU%':>6} {'peakGiB':>7}")
    for arch, batch in zip(args.archs, batches):
        for ratio in ratios:
            ref = None
            flops = model_flops(arch, batch, args.img_size, ratio, device, s)
            versions = [("retflow", False)] if args.skip_reference else [("reference", True), ("retflow", False)]
            for version, plain in versions:
                job = (arch, args.img_size, plain, batch, ratio, str(device), args.compile, args.steps, args.warmup,
                       flops, s.to_json(), torch.get_num_threads())
                r = run_measure(measure, job, device)
                ref = ref or r
                print(f"{arch:6} {ratio:5.2f} {batch:5d} {version:9} {r['dtype']:5} {r['img_s']:9.1f} "
                      f"{r['img_s'] / ref['img_s']:6.2f} {r['gflop_img']:9.1f} {r['tflops']:8.3f} "
                      f"{100 * r['tflops'] / peak:6.1f} {r['mem']:7.2f}", flush=True)


if __name__ == "__main__":
    main()
