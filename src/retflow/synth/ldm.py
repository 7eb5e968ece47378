"""The second stage: a diffusion UNet (MONAI ``DiffusionModelUNet``) on the autoencoder's latents.

Class conditioning uses the UNet's class embedding (``num_class_embeds = K + 1``): classes
``0..K-1`` and a *null* class ``K`` that stands for "no label". Training replaces a label by the
null class with probability ``cond_drop`` (and unlabelled images always carry it), so one network
learns the conditional and the unconditional noise prediction; sampling mixes the two with
classifier-free guidance, ``out = uncond + scale * (cond - uncond)``. (MONAI's
``LatentDiffusionInferer`` guides through cross-attention context only, which needs transformer
blocks at every attention level; the class embedding is cheaper, so the short loops below drive
the MONAI schedulers' ``add_noise`` / ``get_velocity`` / ``step`` themselves.) An unconditional
generator has no class embedding at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from retflow.settings.synth import UNetSettings

SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}


def build_unet(cfg: UNetSettings, latent_channels: int, n_classes: int) -> DiffusionModelUNet:
    """``cfg``: the ``synth.unet`` settings; ``n_classes`` 0 = unconditional."""
    return DiffusionModelUNet(
        spatial_dims=2,
        in_channels=latent_channels,
        out_channels=latent_channels,
        channels=tuple(int(c) for c in cfg.channels),
        attention_levels=tuple(bool(a) for a in cfg.attention_levels),
        num_res_blocks=int(cfg.num_res_blocks),
        num_head_channels=int(cfg.num_head_channels),
        norm_num_groups=int(cfg.norm_num_groups),
        num_class_embeds=n_classes + 1 if n_classes else None,
    )


def make_scheduler(kind: str, train_timesteps: int, beta_schedule: str, prediction: str):
    """A MONAI noise scheduler; ``clip_sample`` off (latents are not bounded to [-1, 1])."""
    if kind not in SCHEDULERS:
        raise ValueError(f"synth.scheduler: unknown sampler {kind!r}; expected one of {sorted(SCHEDULERS)}")
    return SCHEDULERS[kind](num_train_timesteps=int(train_timesteps), schedule=beta_schedule,
                            prediction_type=prediction, clip_sample=False)


def diffusion_loss(unet: DiffusionModelUNet, scheduler, z: torch.Tensor, labels: torch.Tensor | None,
                   null_class: int | None, cond_drop: float, generator: torch.Generator) -> torch.Tensor:
    """MSE of the UNet's noise (epsilon) or velocity prediction at random timesteps.

    ``z``: scaled latents; ``labels``: class indices (``null_class`` = unlabelled) or None when
    unconditional. Random numbers come from ``generator`` (on the CPU, so runs are reproducible
    and resumable on any device)."""
    n = z.shape[0]
    noise = torch.randn(z.shape, generator=generator).to(z.device)
    t = torch.randint(0, scheduler.num_train_timesteps, (n,), generator=generator).to(z.device)
    if labels is not None:
        drop = (torch.rand(n, generator=generator) < cond_drop).to(z.device)
        labels = torch.where(drop, torch.full_like(labels, null_class), labels)
    noisy = scheduler.add_noise(original_samples=z, noise=noise, timesteps=t)
    target = noise if scheduler.prediction_type == "epsilon" else scheduler.get_velocity(z, noise, t)
    pred = unet(noisy, t, class_labels=labels)
    return F.mse_loss(pred.float(), target.float())


@torch.no_grad()
def sample_latents(unet: DiffusionModelUNet, scheduler, shape: tuple, labels: torch.Tensor | None,
                   null_class: int | None, guidance_scale: float, steps: int, generator: torch.Generator,
                   device: torch.device) -> torch.Tensor:
    """Denoise Gaussian noise of ``shape`` (batch, C, h, w) in ``steps`` sampler steps.

    ``generator`` lives on ``device`` (DDPM draws fresh noise there at every step), so the same
    seed gives the same images on the same kind of device. Guidance: ``scale`` 1 = conditional
    only, 0 = unconditional only, otherwise both (one doubled batch) mixed as
    ``uncond + scale * (cond - uncond)``."""
    scheduler.set_timesteps(int(steps))
    x = torch.randn(shape, generator=generator, device=device)
    guided = labels is not None and guidance_scale != 1.0
    if labels is not None:
        labels = labels.to(device)
        null = torch.full_like(labels, null_class)
        if guidance_scale == 0.0:
            labels, guided = null, False
    for t in scheduler.timesteps:
        tt = torch.full((shape[0] * (2 if guided else 1),), int(t), device=device, dtype=torch.long)
        if guided:
            uncond, cond = unet(torch.cat([x, x]), tt, class_labels=torch.cat([null, labels])).chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        else:
            out = unet(x, tt, class_labels=labels)
        if isinstance(scheduler, DDIMScheduler):
            x, _ = scheduler.step(out, int(t), x)  # eta 0: deterministic given the starting noise
        else:
            x, _ = scheduler.step(out, int(t), x, generator=generator)
    return x
