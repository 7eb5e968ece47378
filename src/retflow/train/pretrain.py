"""MAE pretraining entry point, launched by torchrun (1 CPU process up to N GPUs x M nodes).

Resumable: the full training state is written atomically to ``<out>/resume/last.pth`` after
every epoch (and every ``checkpoint_every_steps`` steps, and when SLURM's SIGTERM/SIGUSR1
arrives); a rerun continues from it. The final ``checkpoint.pth`` holds ``{'model': ...}`` in
RETFound's layout (encoder keys ``encoder.*`` = timm ViT names).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from retflow.atomic import atomic_path
from retflow.data.dataset import StoreDataset, load_manifest, train_transform
from retflow.models.mae import MaskedAutoencoderViT
from retflow.models.lr_decay import param_groups_weight_decay
from retflow.models.vit import ViTSpec, load_checkpoint_file
from retflow.train import distributed as D
from retflow.train.checkpoint import load_state, save_atomic
from retflow.train.engine_pretrain import NonFiniteLoss, train_one_epoch
from retflow.train.sampling import epoch_order, loader


def build_pool(stores: list[str], spec: ViTSpec, crop_scale, normalize: dict | None = None
               ) -> torch.utils.data.ConcatDataset:
    parts = []
    for store in stores:
        n = len(load_manifest(store))
        transform = train_transform(spec.img_size, crop_scale, normalize=normalize, in_chans=spec.in_chans)
        parts.append(StoreDataset(store, np.arange(n), None, transform, spec.in_chans))
    return torch.utils.data.ConcatDataset(parts)


def build_model(cfg: dict) -> MaskedAutoencoderViT:
    spec = ViTSpec.from_dict(cfg["vit"])
    dec = cfg.get("decoder", {})
    model = MaskedAutoencoderViT(
        spec, decoder_embed_dim=dec.get("embed_dim", 512), decoder_depth=dec.get("depth", 8),
        decoder_num_heads=dec.get("num_heads", 16), norm_pix_loss=cfg.get("norm_pix_loss", True),
    )
    if cfg.get("init"):
        state = load_checkpoint_file(cfg["init"])
        result = model.load_state_dict(state, strict=False)
        if not any(k.startswith("encoder.blocks") for k in state):
            # encoder-only checkpoint in timm naming
            result = model.encoder.load_state_dict(state, strict=False)
        print(f"initialised from {cfg['init']}: missing={len(result.missing_keys)} unexpected={len(result.unexpected_keys)}")
    return model


class StopFlag:
    """Set by SIGTERM/SIGUSR1 (SLURM's pre-timeout signal): checkpoint at the next step, exit."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._set)

    def _set(self, signum, frame):
        print(f"signal {signum} received: checkpointing at the next step", flush=True)
        self.raised = True


def run(cfg: dict, stores: list[str], out_dir: Path) -> int:
    info = D.init_distributed(cfg.get("device", "auto"))
    torch.manual_seed(cfg["seed"] + info.rank)
    spec = ViTSpec.from_dict(cfg["vit"])
    dataset = build_pool(stores, spec, cfg["crop_scale"], cfg.get("normalize"))
    model = build_model(cfg).to(info.device)
    eff_batch = cfg["batch_size"] * cfg["accum_iter"] * info.world_size
    cfg = {**cfg, "lr": cfg["blr"] * eff_batch / 256}
    optimizer = torch.optim.AdamW(param_groups_weight_decay(model, cfg["weight_decay"]), lr=cfg["lr"], betas=(0.9, 0.95))
    resume_path = out_dir / "resume" / "last.pth"
    start_epoch, start_batch, log_rows = 0, 0, []
    if resume_path.exists():
        state = load_state(resume_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, start_batch, log_rows = state["epoch"], state["batch"], state["log"]
        if info.is_main:
            print(f"Resuming from {resume_path}: epoch {start_epoch} batch {start_batch}", flush=True)
    ddp = DistributedDataParallel(model) if info.world_size > 1 else model
    n_batches = len(dataset) // info.world_size // cfg["batch_size"]
    if n_batches == 0:
        raise SystemExit(f"pretraining pool of {len(dataset)} images is smaller than one batch of {cfg['batch_size']} per process")
    if info.is_main:
        print(f"MAE pretraining: {len(dataset)} images, {info.world_size} process(es) on {info.device}, "
              f"eff. batch {eff_batch}, lr {cfg['lr']:.3g}, {cfg['epochs']} epochs x {n_batches} steps", flush=True)
    stop = StopFlag()
    every = cfg.get("checkpoint_every_steps", 0)

    def save(epoch: int, batch: int) -> None:
        if info.is_main:
            save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "epoch": epoch, "batch": batch, "log": log_rows}, resume_path)

    for epoch in range(start_epoch, cfg["epochs"]):
        order = epoch_order(len(dataset), cfg["seed"], epoch, info.rank, info.world_size)
        for part in dataset.datasets:
            part.set_aug_seed(cfg["seed"] * 100003 + epoch)
        dl = loader(dataset, order, cfg["batch_size"], start_batch, cfg.get("num_workers", 0))

        def on_step(next_batch: int, epoch=epoch) -> bool:
            # a signal reaches the ranks at slightly different steps: agree, or the next
            # collective would hang between a stopped rank and a running one
            stop_now = D.any_rank(stop.raised)
            if stop_now or (every and next_batch % every == 0 and next_batch < n_batches):
                save(epoch, next_batch)
            return stop_now

        try:
            stats = train_one_epoch(ddp, dl, optimizer, epoch, start_batch, n_batches, cfg, info.device, info.rank, on_step)
        except NonFiniteLoss as exc:
            print(f"ERROR: {exc}", file=sys.stderr, flush=True)
            return 3
        if stats["stopped"]:
            D.barrier()
            return 143
        loss = D.all_reduce_mean(stats["loss"])
        log_rows.append({"epoch": epoch, "loss": loss, "lr": stats["lr"], "seconds": stats["seconds"]})
        if info.is_main:
            print(f"epoch {epoch}: loss {loss:.4f} lr {stats['lr']:.3g} {stats['seconds']:.1f}s", flush=True)
        start_batch = 0
        save(epoch + 1, 0)
        D.barrier()
    if info.is_main:
        finish(model, cfg, dataset, log_rows, out_dir, info.device)
    D.barrier()
    D.cleanup()
    return 0


def finish(model, cfg, dataset, log_rows, out_dir: Path, device) -> None:
    import pandas as pd

    from retflow.train.recon_figure import save_reconstruction_figure

    with atomic_path(out_dir / "log.csv") as tmp:
        pd.DataFrame(log_rows).to_csv(tmp, index=False)
    save_reconstruction_figure(model, dataset, cfg["mask_ratio"], out_dir / "recon.png", device, seed=cfg["seed"],
                              normalize=cfg.get("normalize"))
    save_atomic({"model": model.state_dict(), "epoch": cfg["epochs"],
                 "args": json.loads(json.dumps(cfg))}, out_dir / "checkpoint.pth")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="MAE pretraining (run under torchrun).")
    ap.add_argument("--settings", required=True, help="pretraining settings, JSON")
    ap.add_argument("--stores", nargs="+", required=True, help="prepared dataset folders of the pool")
    ap.add_argument("--out-dir", required=True)
    args = ap.parse_args(argv)
    return run(json.loads(args.settings), args.stores, Path(args.out_dir))


if __name__ == "__main__":
    sys.exit(main())
