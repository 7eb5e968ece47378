"""Self-supervised pretraining entry point (MAE, SimCLR, DINO, MoCo-v3, token reconstruction),
launched by torchrun (1 CPU process up to N GPUs x M nodes).

Resumable: the full training state (model incl. momentum teachers and method buffers, optimizer;
the lr schedule is a function of the step and every step's randomness is seeded from
(seed, epoch, step, rank), so nothing else is needed) and the loader position (epoch, batch) are
written atomically to ``<out>/resume/last.pth`` after every epoch, every
``checkpoint_every_steps`` steps and when SLURM's SIGTERM/SIGUSR1 arrives; a rerun continues from
it and reaches the same weights as an uninterrupted run (only a checkpoint written with the same
settings, process count and input files: :mod:`retflow.train.resume`). The final ``checkpoint.pth`` holds
``{'model': ...}`` in RETFound's layout (encoder keys ``encoder.*`` = timm ViT names; MAE: the
full encoder + decoder state) and ``'args'``: the settings it ran with, which are also written to
``<out>/settings.json`` when the run starts (:class:`~retflow.settings.stages.PretrainSettings`,
built by :func:`retflow.settings.build.pretrain`). ``mae3d`` runs the same loop on whole OCT volumes
(its pool: :func:`retflow.train.volume.volume_pool`; the model: :mod:`retflow.models.mae3d`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from retflow.atomic import atomic_path
from retflow.data.dataset import StoreDataset, load_manifest, train_transform
from retflow.data.pools import pool_indices
from retflow.data.store import ImageStore
from retflow.models.lr_decay import param_groups_weight_decay
from retflow.models.vit import ViTSpec
from retflow.settings.checks import VOLUME_METHOD, gpu_augment_errors
from retflow.settings.load import ConfigError
from retflow.settings.stages import PretrainSettings
from retflow.train import distributed as D
from retflow.train.batch_augment import BatchAugment
from retflow.train.checkpoint import save_atomic
from retflow.train.engine_pretrain import NonFiniteLoss, train_one_epoch
from retflow.train.pretrain_data import PretrainData
from retflow.train.pretrain_model import build_model, export_state
from retflow.train.resume import load_resume, run_fingerprint
from retflow.train.sampling import loader
from retflow.train.stop_signal import StopFlag
from retflow.train.volume import volume_pool


def use_batch_augment(s: PretrainSettings, device: torch.device) -> bool:
    """Crops/flips on the training device: MAE-style single-view methods; 'auto' = on CUDA."""
    single_view = s.method in ("mae", "token_recon")
    errors = gpu_augment_errors(s.gpu_augment, [s.method])  # also run at startup (retflow.settings.checks)
    if errors:
        raise ConfigError(errors)
    return single_view and (s.gpu_augment is True or (s.gpu_augment == "auto" and device.type == "cuda"))


def sample_transform(s: PretrainSettings, on_device: bool):
    """What the loader does per image: nothing (uint8, augmented on the device) or the CPU pipeline."""
    if on_device:
        return None
    size, chans, normalize = s.vit.img_size, s.vit.in_chans, s.normalize.to_dict()
    if s.method in ("mae", "token_recon"):
        return train_transform(size, s.crop_scale, normalize=normalize, in_chans=chans)
    from retflow.data.ssl_views import ssl_view_transform

    return ssl_view_transform(s.method, s.method_settings, size, s.crop_scale, normalize, chans)


def pool_dataset(s: PretrainSettings, stores: list[str], on_device: bool, train: bool = True):
    """The run's dataset over ``stores``: images through :func:`sample_transform`, or mae3d's whole
    volumes (``train``: their random flips; the figure's are shown as stored)."""
    if s.method == VOLUME_METHOD:
        return volume_pool(stores, s.normalize.to_dict(), s.labelled_pool_splits, train=train)
    return build_pool(stores, s.vit.spec(), sample_transform(s, on_device), s.labelled_pool_splits)


def build_pool(stores: list[str], spec: ViTSpec, transform, splits) -> torch.utils.data.ConcatDataset | None:
    """The images a pool may use of ``stores``: a pretrain dataset's, a labelled one's ``splits``
    (``pretrain.labelled_pool_splits``; :func:`retflow.data.pools.pool_indices`)."""
    if not stores:
        return None
    parts = [StoreDataset(s, pool_indices(load_manifest(s), splits), None, transform, spec.in_chans) for s in stores]
    return torch.utils.data.ConcatDataset(parts)


def check_same_image_size(stores: list[str]) -> None:
    """uint8 batches need one stored image size across the pool."""
    shapes = {s: ImageStore(s)[0].shape[:2] for s in stores}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"gpu_augment needs one stored image size across the pool, got {shapes}")


def leaves(dataset):
    """The StoreDatasets inside (nested) ConcatDatasets."""
    if isinstance(dataset, torch.utils.data.ConcatDataset):
        return [leaf for d in dataset.datasets for leaf in leaves(d)]
    return [dataset]


def input_files(s: PretrainSettings, stores: list[str], synthetic_stores: list[str] | None) -> list[str]:
    """Files whose change makes a resume checkpoint stale: the pools' manifests, the init and teacher checkpoints."""
    files = [str(Path(store) / "manifest.parquet") for store in [*stores, *(synthetic_stores or [])]]
    teacher = s.token_recon.teacher_checkpoint if s.method == "token_recon" else None
    return files + [f for f in (s.init, teacher) if f]


def make_optimizer(model, weight_decay: float, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, betas (0.9, 0.95), no decay on norms/biases/tokens; the fused kernel on CUDA."""
    groups = param_groups_weight_decay(model, weight_decay)
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), **extra)


def run(s: PretrainSettings, stores: list[str], out_dir: Path, synthetic_stores: list[str] | None = None) -> int:
    info = D.init_distributed(s.device)
    if info.is_main:
        s.write(Path(out_dir) / "settings.json")  # what this run ran with, next to its outputs
    torch.manual_seed(s.seed)  # identical initial weights on every rank
    on_device = use_batch_augment(s, info.device)
    if on_device:
        check_same_image_size(list(stores) + list(synthetic_stores or []))
    data = PretrainData(pool_dataset(s, stores, on_device), pool_dataset(s, synthetic_stores or [], on_device),
                        s.data, s.epochs, s.synthetic_epochs, s.seed)
    augment = BatchAugment(s.vit.img_size, s.crop_scale, normalize=s.normalize.to_dict(),
                           in_chans=s.vit.in_chans) if on_device else None
    fingerprint = run_fingerprint(s, input_files(s, stores, synthetic_stores), world_size=info.world_size)
    model = build_model(s, log=print if info.is_main else None).to(info.device)
    if info.world_size > 1 and info.device.type == "cuda" and s.method in ("simclr", "mocov3"):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # projector BN over the global batch
    eff_batch = s.batch_size * s.accum_iter * info.world_size
    schedule = s.schedule(eff_batch)
    optimizer = make_optimizer(model, s.weight_decay, schedule.lr, info.device)
    resume_path = out_dir / "resume" / "last.pth"
    start_epoch, start_batch, log_rows = 0, 0, []
    state = load_resume(resume_path, fingerprint, report=info.is_main)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, start_batch, log_rows = state["epoch"], state["batch"], state["log"]
        if info.is_main:
            print(f"Resuming from {resume_path}: epoch {start_epoch} batch {start_batch}", flush=True)
    ddp = DistributedDataParallel(model) if info.world_size > 1 else model
    step_fn = torch.compile(ddp) if s.compile else ddp
    if data.n_batches(0, s.batch_size, info.world_size) == 0:
        raise SystemExit(f"pretraining pool of {len(data.dataset)} images is smaller than one batch of "
                         f"{s.batch_size} per process")
    if info.is_main:
        print(f"{s.method} pretraining on {s.data} data: {data.n_real} real + "
              f"{data.n_syn} synthetic images, {info.world_size} process(es) on {info.device}, "
              f"eff. batch {eff_batch}, lr {schedule.lr:.3g}, {s.epochs} epochs, "
              f"augment on {'device' if on_device else 'loader'}", flush=True)
    stop = StopFlag()
    every = s.checkpoint_every_steps
    accum = s.accum_iter

    def save(epoch: int, batch: int) -> None:
        if info.is_main:
            save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "epoch": epoch, "batch": batch, "log": log_rows, "fingerprint": fingerprint}, resume_path)

    for epoch in range(start_epoch, s.epochs):
        order = data.order(epoch, info.rank, info.world_size)
        n_batches = len(order) // s.batch_size
        for part in leaves(data.dataset):
            part.set_aug_seed(s.seed * 100003 + epoch)
        dl = loader(data.dataset, order, s.batch_size, start_batch, s.num_workers)

        def on_step(next_batch: int, epoch=epoch, n_batches=n_batches) -> bool:
            if next_batch % accum and next_batch < n_batches:
                return False  # mid-accumulation: gradients not yet applied, nothing to save
            # a signal reaches the ranks at slightly different steps: agree, or the next
            # collective would hang between a stopped rank and a running one
            stop_now = D.any_rank(stop.raised)
            if stop_now or (every and next_batch % every == 0 and next_batch < n_batches):
                save(epoch, next_batch)
            return stop_now

        teacher = getattr(model, "update_teacher", None)
        try:
            stats = train_one_epoch(step_fn, dl, optimizer, epoch, start_batch, n_batches, s, schedule,
                                    info.device, info.rank, on_step, augment=augment, after_update=teacher)
        except NonFiniteLoss as exc:
            print(f"ERROR: {exc}", file=sys.stderr, flush=True)
            return 3
        if stats["stopped"]:
            D.barrier()
            return 143
        loss = D.all_reduce_mean(stats["loss"])
        log_rows.append({"epoch": epoch, "data": data.source(epoch), "loss": loss, "lr": stats["lr"],
                         "seconds": stats["seconds"]})
        if info.is_main:
            print(f"epoch {epoch} ({data.source(epoch)}): loss {loss:.4f} lr {stats['lr']:.3g} "
                  f"{stats['seconds']:.1f}s", flush=True)
        start_batch = 0
        save(epoch + 1, 0)
        D.barrier()
    if info.is_main:
        finish(model, s, (list(stores) or list(synthetic_stores))[0], log_rows, out_dir, info.device)
    D.barrier()
    D.cleanup()
    return 0


def finish(model, s: PretrainSettings, figure_store: str, log_rows, out_dir: Path, device) -> None:
    import pandas as pd

    from retflow.train.recon_figure import save_pretrain_figure

    with atomic_path(out_dir / "log.csv") as tmp:
        pd.DataFrame(log_rows).to_csv(tmp, index=False)
    figure_data = pool_dataset(s, [figure_store], on_device=False, train=False)
    save_pretrain_figure(model, figure_data, s, out_dir / "figure.png", device)
    save_atomic({"model": export_state(model), "method": s.method, "epoch": s.epochs, "args": s.to_dict()},
                out_dir / "checkpoint.pth")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Self-supervised ViT pretraining (run under torchrun).")
    ap.add_argument("--settings", required=True,
                    help="pretraining settings, JSON (retflow.settings.build.pretrain(...).to_json())")
    ap.add_argument("--stores", nargs="*", default=[], help="prepared dataset folders of the real pool")
    ap.add_argument("--synthetic-stores", nargs="*", default=[], help="stores of generated images")
    ap.add_argument("--out-dir", required=True)
    args = ap.parse_args(argv)
    try:
        return run(PretrainSettings.from_json(args.settings), args.stores, Path(args.out_dir), args.synthetic_stores)
    except (ValueError, FileNotFoundError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
