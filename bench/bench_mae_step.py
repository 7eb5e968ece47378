"""Benchmark MAE pretraining-step throughput (images/s) for one configuration.

Example::

    .venv/bin/python bench/bench_mae_step.py --arch vit_large_patch16_224 --img-size 224 \
        --patch 16 --batch 64 --mask-ratio 0.75 --steps 20

Times forward + backward + AdamW step after ``--warmup`` untimed steps; on CUDA
uses bf16 autocast and reports peak memory.  Prints one line of figures.
"""
from __future__ import annotations

import argparse
import time

import torch

from retflow.models import MaskedAutoencoderViT, ViTSpec, param_groups_weight_decay


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="vit_large_patch16_224", help="timm ViT name")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--embed-dim", type=int, help="override the arch's embed_dim")
    p.add_argument("--depth", type=int, help="override the arch's depth")
    p.add_argument("--num-heads", type=int, help="override the arch's num_heads")
    p.add_argument("--decoder-dim", type=int, default=512)
    p.add_argument("--decoder-depth", type=int, default=8)
    p.add_argument("--decoder-heads", type=int, default=16)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    overrides = {k: v for k, v in (("embed_dim", args.embed_dim), ("depth", args.depth),
                                   ("num_heads", args.num_heads)) if v is not None}
    spec = ViTSpec(args.arch, args.img_size, args.patch, args.in_chans, overrides)
    model = MaskedAutoencoderViT(spec, args.decoder_dim, args.decoder_depth, args.decoder_heads).to(device)
    opt = torch.optim.AdamW(param_groups_weight_decay(model, 0.05), lr=1.5e-4, betas=(0.9, 0.95))
    step_model = torch.compile(model) if args.compile else model
    use_bf16 = device.type == "cuda"
    if use_bf16:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    imgs = torch.randn(args.batch, args.in_chans, args.img_size, args.img_size, device=device)

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss, _, _ = step_model(imgs, args.mask_ratio)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    elapsed = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.encoder.parameters()) / 1e6
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    print(
        f"arch={args.arch} enc_params_M={n_params:.2f} img={args.img_size} patch={args.patch} "
        f"batch={args.batch} mask={args.mask_ratio} device={device.type} "
        f"dtype={'bf16' if use_bf16 else 'fp32'} compile={args.compile} steps={args.steps} "
        f"step_ms={1000 * elapsed / args.steps:.1f} img_per_s={args.batch * args.steps / elapsed:.1f} "
        f"peak_mem_GiB={mem:.2f} loss={float(loss):.4f}"
    )


if __name__ == "__main__":
    main()
