"""Benchmark the 3-D MAE pretraining step (tubelets over OCT volumes): volumes/s, MFU, peak memory.

For every (size, mask ratio) it times two implementations of the same step in this process:

- ``monai``: MONAI's ``MaskedAutoEncoderViT`` (``spatial_dims=3``, conv tubelet embedding, sin-cos
  positions, ``qkv_bias``, MLP 4x) as MONAI ships it (explicit attention, ``torch.multinomial``
  masking), plus the loss MONAI leaves out (MSE on masked tubelets, ``--norm-pix-loss``); its 3-D
  sin-cos needs widths divisible by 6, so a decoder that is not (the demo's 64) gets MONAI's
  learnable decoder table instead (same FLOPs);
- ``retflow``: :class:`retflow.models.mae3d.MaskedAutoencoderViT3D` (timm ``Block`` s with fused
  SDPA attention, argsort masking on the device), ``torch.compile`` with ``--compile``;

both with the same step: AdamW (fused on CUDA, for-each on the CPU), bf16 autocast on CUDA, fp32
on the CPU. ``--monai-sdpa`` adds MONAI with its ``use_flash_attention`` switched on, to separate
the attention kernel from the rest. It prints volumes/s, the ratio to the first version, model
GFLOPs per volume (each version's own forward + backward, counted by ``torch.utils.flop_counter``
in fp32 with explicit attention), achieved TFLOP/s, MFU against the device's peak
(``--peak-tflops``; default: H100 SXM bf16 dense 989 on an H100, else the matmul peak measured
here) and peak memory (CUDA:
``max_memory_allocated``; CPU: each version in a fresh child process, resident memory added by
the model and its step). Step times are medians over ``--steps``; ``cpu_ms`` is the process CPU
time of a step (all threads), steadier than wall time when other jobs share the cores.

Sizes (``--sizes``): ``demo`` = embed 96, depth 4, heads 3, decoder 64/2/4, volume 16x64x64,
tubelet 4x8x8 (256 tubelets); ``small`` = ViT-S 384/12/6, decoder 256/4/8, 32x128x128, tubelet
4x16x16 (512); ``base`` = ViT-B 768/12/12, decoder 384/4/12, 48x224x224, tubelet 4x16x16 (2,352);
``large`` = ViT-L 1024/24/16, decoder 512/8/16, 48x256x256, tubelet 4x16x16 (4,096, OCTCube-like).

Example (CPU)::

    .venv/bin/python bench/bench_mae3d_step.py --sizes demo small --batch 8 4 --steps 8 --warmup 2 \
        --threads 1 --monai-sdpa

On an H100: ``--sizes base large --batch 64 16 --steps 10 --warmup 3 [--compile]``.
"""
from __future__ import annotations

import argparse
import math
import resource
import statistics
import time
import warnings

import torch
from bench_common import device_name, mfu_peak, pick_device, run_measure, sync
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from retflow.models.lr_decay import param_groups_weight_decay
from retflow.models.mae3d import MaskedAutoencoderViT3D, ViT3DSpec

SIZES = {
    "demo": dict(img_size=(16, 64, 64), tubelet=(4, 8, 8), embed_dim=96, depth=4, num_heads=3, decoder=(64, 2, 4)),
    "small": dict(img_size=(32, 128, 128), tubelet=(4, 16, 16), embed_dim=384, depth=12, num_heads=6,
                  decoder=(256, 4, 8)),
    "base": dict(img_size=(48, 224, 224), tubelet=(4, 16, 16), embed_dim=768, depth=12, num_heads=12,
                 decoder=(384, 4, 12)),
    "large": dict(img_size=(48, 256, 256), tubelet=(4, 16, 16), embed_dim=1024, depth=24, num_heads=16,
                  decoder=(512, 8, 16)),
}
warnings.filterwarnings("ignore", message="torch.meshgrid")  # inside MONAI's sin-cos table


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["demo", "small"], choices=sorted(SIZES))
    p.add_argument("--batch", nargs="+", type=int, default=[8, 4], help="one per size (or one for all)")
    p.add_argument("--mask-ratios", nargs="+", type=float, default=[0.9], help="OCTCube-style 0.9 by default")
    p.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=1.5e-4)
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the retflow step")
    p.add_argument("--skip-reference", action="store_true", help="time retflow's version only")
    p.add_argument("--monai-sdpa", action="store_true", help="also time MONAI with use_flash_attention on")
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: see module doc)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    return p.parse_args(argv)


def patchify(vols: torch.Tensor, tubelet) -> torch.Tensor:
    b, c, d, h, w = vols.shape
    t, ph, pw = tubelet
    x = vols.reshape(b, c, d // t, t, h // ph, ph, w // pw, pw).permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(b, -1, t * ph * pw * c)


class MonaiMAE(nn.Module):
    """MONAI's 3-D MAE with the MAE loss it does not include."""

    def __init__(self, size: dict, norm_pix_loss: bool, sdpa: bool) -> None:
        super().__init__()
        from monai.networks.nets import MaskedAutoEncoderViT

        de, dd, dh = size["decoder"]
        e = size["embed_dim"]
        self.net = MaskedAutoEncoderViT(
            in_channels=1, img_size=size["img_size"], patch_size=size["tubelet"], hidden_size=e, mlp_dim=4 * e,
            num_layers=size["depth"], num_heads=size["num_heads"], decoder_hidden_size=de, decoder_mlp_dim=4 * de,
            decoder_num_layers=dd, decoder_num_heads=dh, proj_type="conv",
            pos_embed_type="sincos" if e % 6 == 0 else "learnable",
            decoder_pos_embed_type="sincos" if de % 6 == 0 else "learnable", spatial_dims=3, qkv_bias=True)
        for m in self.net.modules():
            if hasattr(m, "use_flash_attention"):
                m.use_flash_attention = sdpa
        self.tubelet, self.norm_pix_loss = size["tubelet"], norm_pix_loss

    def forward(self, vols: torch.Tensor, mask_ratio: float):
        pred, mask = self.net(vols, mask_ratio)
        target = patchify(vols, self.tubelet).float()
        if self.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        per_patch = ((pred.float() - target) ** 2).mean(-1)
        return (per_patch * mask).sum() / mask.sum(), pred, mask


def build(name: str, version: str, device, norm_pix_loss: bool) -> nn.Module:
    torch.manual_seed(0)
    size = SIZES[name]
    if version.startswith("monai"):
        return MonaiMAE(size, norm_pix_loss, sdpa=version == "monai_sdpa").to(device)
    spec = ViT3DSpec(size["img_size"], size["tubelet"], 1, size["embed_dim"], size["depth"], size["num_heads"], 4.0)
    return MaskedAutoencoderViT3D(spec, *size["decoder"], norm_pix_loss=norm_pix_loss).to(device)


def volumes(name: str, batch: int, device) -> torch.Tensor:
    return torch.randn(batch, 1, *SIZES[name]["img_size"], device=device)


def model_flops(name: str, version: str, batch: int, ratio: float, device, norm_pix_loss: bool) -> float:
    """FLOPs of one fp32 forward + backward of this version, counted with explicit attention
    matmuls (the counter does not see the CPU's fused attention kernel): 'model FLOPs'."""
    model = build(name, version, device, norm_pix_loss)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
        if hasattr(m, "use_flash_attention"):
            m.use_flash_attention = False
    with FlopCounterMode(display=False) as counter:
        model(volumes(name, batch, device), ratio)[0].backward()
    return counter.get_total_flops()


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def measure(name: str, version: str, batch: int, ratio: float, device_str: str, compile_: bool, steps: int,
            warmup: int, flops: float, norm_pix_loss: bool, wd: float, lr: float, threads: int | None = None) -> dict:
    """Build one version and time its step (on the CPU in a child process, for its memory peak)."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device_str)
    before = rss_bytes()
    model = build(name, version, device, norm_pix_loss)
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(param_groups_weight_decay(model, wd), lr=lr, betas=(0.9, 0.95),
                            **({"fused": True} if cuda else {"foreach": True}))
    run = torch.compile(model) if compile_ and version == "retflow" else model
    vols = volumes(name, batch, device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = run(vols, ratio)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    walls, cpus = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync(device)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    dt = statistics.median(walls)
    if cuda:
        mem = torch.cuda.max_memory_allocated() / 2**30
    else:
        mem = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before) / 2**30 if before else float("nan")
    return {"vol_s": batch / dt, "step_ms": 1000 * dt, "cpu_ms": 1000 * statistics.median(cpus),
            "gflop_vol": flops / batch / 1e9, "tflops": flops / dt / 1e12, "mem": mem,
            "dtype": "bf16" if cuda else "fp32"}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    batches = args.batch if len(args.batch) == len(args.sizes) else args.batch[:1] * len(args.sizes)
    name = device_name(device)
    peak, peak_src = mfu_peak(device, args.peak_tflops)
    versions = ([] if args.skip_reference else ["monai"] + (["monai_sdpa"] if args.monai_sdpa else [])) + ["retflow"]
    print(f"device: {name}; MFU against {peak:.3g} TFLOP/s ({peak_src}); norm_pix_loss {args.norm_pix_loss}"
          f"{'; compile' if args.compile else ''}")
    print(f"{'size':6} {'volume':>10} {'tubelet':>8} {'tokens':>6} {'mask':>5} {'batch':>5} {'version':10} "
          f"{'dtype':5} {'vol/s':>8} {'ratio':>6} {'cpu_ms':>7} {'GFLOP/vol':>9} {'TFLOP/s':>8} {'MFU%':>6} "
          f"{'peakGiB':>7}")
    for size, batch in zip(args.sizes, batches):
        sz = SIZES[size]
        tokens = math.prod(s // t for s, t in zip(sz["img_size"], sz["tubelet"]))
        for ratio in args.mask_ratios:
            ref = None
            for version in versions:
                flops = model_flops(size, version, batch, ratio, device, args.norm_pix_loss)
                job = (size, version, batch, ratio, str(device), args.compile, args.steps, args.warmup, flops,
                       args.norm_pix_loss, args.weight_decay, args.lr, torch.get_num_threads())
                r = run_measure(measure, job, device)
                ref = ref or r
                print(f"{size:6} {'x'.join(map(str, sz['img_size'])):>10} {'x'.join(map(str, sz['tubelet'])):>8} "
                      f"{tokens:6d} {ratio:5.2f} {batch:5d} {version:10} {r['dtype']:5} {r['vol_s']:8.2f} "
                      f"{r['vol_s'] / ref['vol_s']:6.2f} {r['cpu_ms']:7.0f} {r['gflop_vol']:9.2f} {r['tflops']:8.3f} "
                      f"{100 * r['tflops'] / peak:6.1f} {r['mem']:7.2f}", flush=True)


if __name__ == "__main__":
    main()
