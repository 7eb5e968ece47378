"""Resumable two-stage training of the latent diffusion model of one modality.

Stage 1 trains the autoencoder on the real pool (resized to ``image_size``, random horizontal
flips); stage 2 freezes its EMA weights, encodes the pool once (posterior means, both flips;
``latent_scale`` = 1 / their std, as in latent diffusion) and trains the UNet on these latents,
cached in host memory (2 x pool size x latent grid floats: 4.9 GB for 150 k images with 4 x 32 x 32
latents). Both stages keep an EMA of their weights (:class:`retflow.synth.ema.EMA`); the EMA
weights are what is saved and sampled.

``out_dir/resume/last.pth`` is written atomically at the end of every epoch, every
``checkpoint_every_steps`` steps and when SIGTERM/SIGUSR1 arrives (SLURM's pre-timeout signal;
the process then exits 1 and the job's retry resumes); a checkpoint written with other training
settings or another pool size is ignored (sampling settings may change freely). It holds the weights, optimizer and EMA
states, the position (stage, epoch, batch) and the state of the one CPU random generator that
draws flips, timesteps, noise and label drops; epoch orders are a function of (seed, stage,
epoch). So an interrupted run continues where it stopped and ends with the same weights as an
uninterrupted one. Outputs: ``model.pth`` (EMA weights + everything sampling needs),
``log.csv`` (per epoch: stage, loss, lr, seconds), ``recon.png`` (real vs autoencoded) and
``settings.json`` (the :class:`~retflow.settings.synth.SynthSettings` it ran with, written first).

With ``synth.sd_checkpoint`` the same loop fine-tunes the UNet of a local Stable-Diffusion pipeline
instead (one stage, ``unet``; :mod:`retflow.synth.stable_diffusion`), with the same outputs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from retflow.atomic import atomic_path
from retflow.inference import pick_device
from retflow.settings.synth import STAGES, SynthSettings
from retflow.synth import autoencoder as aek
from retflow.synth import ldm
from retflow.synth.ema import EMA
from retflow.synth.pool import PoolImages, to_model
from retflow.train.checkpoint import save_atomic
from retflow.train.resume import load_resume, run_fingerprint
from retflow.train.schedule import lr_at as scheduled_lr
from retflow.train.stop_signal import StopFlag

#: settings that only affect sampling: changing them keeps a resume checkpoint valid
SAMPLING_KEYS = frozenset({"guidance_scale", "scheduler", "steps", "n_images", "shard_size", "sample_batch",
                           "class_balance", "device", "checkpoint_every_steps"})


def fingerprint(settings: dict, n_images: int) -> str:
    """What a resume checkpoint was trained with: the training settings (plain, e.g.
    ``SynthSettings.to_dict()``) and the pool size."""
    return run_fingerprint({k: v for k, v in settings.items() if k not in SAMPLING_KEYS}, n_images=n_images)


def lr_at(step: int, total: int, base: float, floor: float = 0.01) -> float:
    """Linear warm-up over min(100, 5 %) of the steps, then cosine decay to ``floor`` x ``base``
    (the shared schedule, counted in steps; warm-up step ``s`` trains at ``(s + 1) / warm``)."""
    warm = max(1, min(100, total // 20))
    return scheduled_lr(step + 1 if step < warm else step, base, floor * base, warm, total)


def epoch_batches(n: int, batch_size: int, seed: int, stage: str, epoch: int) -> list[np.ndarray]:
    """The batches of one epoch: a permutation seeded by (seed, stage, epoch), last partial batch dropped
    (one batch of everything when the pool is smaller than a batch)."""
    order = np.random.default_rng([seed, STAGES.index(stage), epoch]).permutation(n)
    bs = min(batch_size, n)
    return [order[i * bs:(i + 1) * bs] for i in range(n // bs)]


class Trainer:
    #: the stages :meth:`run` goes through, in order (a subclass may train fewer)
    stages = STAGES

    def __init__(self, settings: SynthSettings, stores: list[str], out_dir: Path, device: torch.device):
        self.setup(settings, stores, out_dir, device)
        channels = self.pool.shape[2]
        ae, unet = settings.autoencoder, settings.unet
        self.ae = aek.build_autoencoder(ae, channels).to(device)
        self.ae_ema = EMA(self.ae, settings.ema_decay)
        self.unet = ldm.build_unet(unet, int(ae.latent_channels), self.n_classes).to(device)
        self.unet_ema = EMA(self.unet, settings.ema_decay)
        self.opt = {"autoencoder": torch.optim.AdamW(self.ae.parameters(), lr=ae.lr, weight_decay=0.0),
                    "unet": torch.optim.AdamW(self.unet.parameters(), lr=unet.lr, weight_decay=0.0)}
        self.scheduler = ldm.make_scheduler("ddpm", settings.train_timesteps, settings.beta_schedule,
                                            settings.prediction)
        self.latents: torch.Tensor | None = None

    def setup(self, settings: SynthSettings, stores: list[str], out_dir: Path, device: torch.device) -> None:
        """What every generator trainer has: settings, seeded RNGs, the pool, the position in training."""
        self.s = settings
        self.out_dir = out_dir
        self.device = device
        self.resume_path = out_dir / "resume" / "last.pth"
        torch.manual_seed(int(settings.seed))
        cond = settings.condition.to_dict() if settings.condition is not None else None
        self.pool = PoolImages(stores, cond, settings.modality, settings.labelled_pool_splits)
        self.n_classes = len(self.pool.classes)
        self.gen = torch.Generator().manual_seed(int(settings.seed))
        self.pos = {"stage": self.stages[0], "epoch": 0, "batch": 0, "step": 0}
        self.log: list[dict] = []
        self.latent_scale: float | None = None

    # ------------------------------------------------------------------ checkpoints
    def networks(self) -> dict:
        """What a resume checkpoint holds besides optimizers and position (objects with state dicts)."""
        return {"ae": self.ae, "ae_ema": self.ae_ema, "unet": self.unet, "unet_ema": self.unet_ema}

    def fingerprint(self) -> str:
        return fingerprint(self.s.to_dict(), len(self.pool))

    def save(self) -> None:
        save_atomic({**{k: v.state_dict() for k, v in self.networks().items()},
                     "opt": {k: o.state_dict() for k, o in self.opt.items()}, "pos": dict(self.pos),
                     "gen": self.gen.get_state(), "log": self.log, "fingerprint": self.fingerprint()},
                    self.resume_path)

    def load(self) -> bool:
        state = load_resume(self.resume_path, self.fingerprint())
        if state is None:
            return False
        for k, v in self.networks().items():
            v.load_state_dict(state[k])
        for k, o in self.opt.items():
            o.load_state_dict(state["opt"][k])
        self.pos = dict(state["pos"])
        self.gen.set_state(state["gen"])
        self.log = list(state["log"])
        print(f"resumed from {self.resume_path}: {self.pos}", flush=True)
        return True

    # ------------------------------------------------------------------ data
    def _flip(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flip = torch.rand(x.shape[0], generator=self.gen) < 0.5
        if not self.s.hflip:
            flip[:] = False
        return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x), flip

    def _images(self, idx: np.ndarray) -> torch.Tensor:
        batch = torch.stack([self.pool[int(i)][0] for i in idx]).to(self.device)
        return to_model(batch, int(self.s.image_size))

    def _labels(self, idx: np.ndarray) -> torch.Tensor | None:
        if self.pool.labels is None:
            return None
        return torch.from_numpy(self.pool.labels[idx]).long().to(self.device)

    @torch.no_grad()
    def encode_pool(self) -> None:
        """Latents of every pool image and of its mirror image (EMA autoencoder), scaled to unit std."""
        ae = self.ae_ema.shadow
        out = []
        for flip in (False, True):
            for start in range(0, len(self.pool), 64):
                x = self._images(np.arange(start, min(start + 64, len(self.pool))))
                out.append(aek.encode(ae, x.flip(-1) if flip else x).cpu())  # cached in host memory
        z = torch.cat(out)
        self.latent_scale = float(1.0 / z.std().clamp_min(1e-6))
        self.latents = z * self.latent_scale

    # ------------------------------------------------------------------ steps
    def step(self, stage: str, idx: np.ndarray, lr: float) -> dict:
        opt = self.opt[stage]
        for group in opt.param_groups:
            group["lr"] = lr
        if stage == "autoencoder":
            self.ae.train()
            x, _ = self._flip(self._images(idx))
            loss, parts = aek.autoencoder_loss(self.ae, x, self.s.autoencoder)
        else:
            self.unet.train()
            flip = torch.rand(len(idx), generator=self.gen) < 0.5
            if not self.s.hflip:
                flip[:] = False
            rows = torch.from_numpy(idx).long() + flip.long() * len(self.pool)
            z = self.latents[rows].to(self.device)
            loss = ldm.diffusion_loss(self.unet, self.scheduler, z, self._labels(idx), self.pool.null_class,
                                      float(self.s.unet.cond_drop), self.gen)
            parts = {}
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{stage}: loss is {float(loss)} at step {self.pos['step']} "
                                     f"(lower synth.{stage}.lr)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        (self.ae_ema if stage == "autoencoder" else self.unet_ema).update(self.ae if stage == "autoencoder"
                                                                          else self.unet)
        return {"loss": float(loss.detach()), **parts}

    def run(self, stop: StopFlag | None = None, stop_after_steps: int | None = None) -> bool:
        """Train to the end (True) or until a stop request, after checkpointing (False)."""
        self.load()
        every = int(self.s.checkpoint_every_steps)
        done_here = 0
        n = len(self.pool)
        for stage in self.stages[self.stages.index(self.pos["stage"]):]:
            cfg = self.s.stage(stage)
            epochs = int(cfg.epochs)
            per_epoch = len(epoch_batches(n, int(cfg.batch_size), 0, stage, 0))
            total = epochs * per_epoch
            if stage == "unet":
                self.encode_pool()
            for epoch in range(self.pos["epoch"], epochs):
                batches = epoch_batches(n, int(cfg.batch_size), int(self.s.seed), stage, epoch)
                t0, losses, stopping = time.perf_counter(), [], False
                for b in range(self.pos["batch"], len(batches)):
                    step = epoch * per_epoch + b
                    out = self.step(stage, batches[b], lr_at(step, total, float(cfg.lr)))
                    losses.append(out)
                    self.pos.update(stage=stage, epoch=epoch, batch=b + 1, step=step + 1)
                    done_here += 1
                    stopping = (stop is not None and stop.raised) or (stop_after_steps is not None
                                                                      and done_here >= stop_after_steps)
                    if b + 1 == len(batches):
                        break  # the epoch's end saves below
                    if stopping or (every and (step + 1) % every == 0):
                        self.save()
                    if stopping:
                        return False
                row = {"stage": stage, "epoch": epoch + 1, "steps": (epoch + 1) * per_epoch,
                       "lr": lr_at((epoch + 1) * per_epoch - 1, total, float(cfg.lr)),
                       "seconds": round(time.perf_counter() - t0, 3)}
                for key in losses[0] if losses else ():
                    row[key] = float(np.mean([r[key] for r in losses]))
                self.log.append(row)
                print(json.dumps(row), flush=True)
                self.pos.update(stage=stage, epoch=epoch + 1, batch=0)
                self.save()
                if stopping:
                    return False
            nxt = self.stages.index(stage) + 1
            if nxt < len(self.stages):
                self.pos.update(stage=self.stages[nxt], epoch=0, batch=0, step=0)
                self.save()
        return True

    # ------------------------------------------------------------------ outputs
    def export(self) -> dict:
        """The sampling bundle: EMA weights + architecture + everything the store and report need."""
        if self.latent_scale is None:
            self.encode_pool()
        self.ae_ema.shadow.eval()
        self.unet_ema.shadow.eval()
        counts = self.pool.class_counts()
        return {
            "autoencoder": self.ae_ema.shadow.state_dict(),
            "unet": self.unet_ema.shadow.state_dict(),
            "latent_scale": self.latent_scale,
            "settings": self.s.to_dict(),  # plain types: model.pth is read with weights_only=True
            "classes": list(self.pool.classes),
            "class_counts": counts,
            "store_shape": [int(v) for v in self.pool.shape],
            "n_real": len(self.pool),
            "train_seconds": float(sum(r["seconds"] for r in self.log)),
        }

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] through the (EMA) autoencoder, same shape."""
        return aek.decode(self.ae_ema.shadow, aek.encode(self.ae_ema.shadow, x))

    @torch.no_grad()
    def recon_figure(self, path: Path, n: int = 8) -> None:
        from PIL import Image

        idx = np.linspace(0, len(self.pool) - 1, n).astype(int)
        x = self._images(idx)
        rec = self.reconstruct(x)
        rows = [((t + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy() for t in (x, rec)]
        grid = np.concatenate([np.concatenate(list(r), 1) for r in rows], 0)
        if grid.shape[2] == 1:
            grid = grid[..., 0]
        scale = max(1, 256 // grid.shape[0])
        img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
        with atomic_path(path) as tmp:
            img.save(tmp, format="PNG")


def train(settings: SynthSettings, stores: list[str], out_dir: Path, stop_after_steps: int | None = None) -> bool:
    """Train (or resume) and write ``settings.json`` (first), ``model.pth``, ``log.csv``, ``recon.png``;
    False if stopped early. ``settings.sd_checkpoint``: fine-tune that Stable-Diffusion pipeline's UNet instead."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings.write(out_dir / "settings.json")
    kind = Trainer
    if settings.sd_checkpoint:
        from retflow.synth.stable_diffusion import SDTrainer as kind
    trainer = kind(settings, stores, out_dir, pick_device(settings.device))
    if not trainer.run(StopFlag() if stop_after_steps is None else None, stop_after_steps):
        return False
    with atomic_path(out_dir / "log.csv") as tmp:
        pd.DataFrame(trainer.log).to_csv(tmp, index=False)
    trainer.recon_figure(out_dir / "recon.png")
    save_atomic(trainer.export(), out_dir / "model.pth")
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train the latent diffusion model of one modality (resumable).")
    ap.add_argument("--settings", required=True,
                    help="SynthSettings as JSON (retflow.synth.settings.modality_settings(config, modality).to_json())")
    ap.add_argument("--stores", nargs="+", required=True, help="prepared real stores (the pool)")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)  # tests
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        finished = train(SynthSettings.from_json(args.settings), args.stores, Path(args.out_dir),
                         args.stop_after_steps)
    except (ValueError, NotImplementedError, FloatingPointError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    if not finished:
        print(f"stopped early; resume/last.pth written in {args.out_dir}; rerun to continue", file=sys.stderr)
        return 1
    print(f"trained in {time.perf_counter() - t0:.1f}s -> {args.out_dir}/model.pth")
    return 0


if __name__ == "__main__":
    sys.exit(main())
