"""The first stage: a KL autoencoder (MONAI ``AutoencoderKL``) from images to a latent grid.

Images are scaled to [-1, 1]. ``len(channels) - 1`` levels each halve the side, so a 64 px image
with ``channels: [16, 32, 64]`` becomes a ``latent_channels x 16 x 16`` grid. The loss is L1 +
``edge_weight`` x L1 of the image gradients (finite differences; keeps thin vessels sharp
without a downloaded perceptual network) + ``kl_weight`` x KL of the posterior to N(0, I).
The decoder is trained on the posterior mean: with the tiny KL weight of latent diffusion the
sampled posterior only adds noise, and the diffusion model learns (and decodes) the means.
"""

from __future__ import annotations

import torch
from monai.networks.nets import AutoencoderKL

from retflow.settings.synth import AutoencoderSettings


def build_autoencoder(cfg: AutoencoderSettings, in_channels: int) -> AutoencoderKL:
    """``cfg``: the ``synth.autoencoder`` settings (channels, latent_channels, num_res_blocks, norm_num_groups)."""
    channels = tuple(int(c) for c in cfg.channels)
    return AutoencoderKL(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=in_channels,
        channels=channels,
        num_res_blocks=int(cfg.num_res_blocks),
        attention_levels=(False,) * len(channels),
        latent_channels=int(cfg.latent_channels),
        norm_num_groups=int(cfg.norm_num_groups),
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )


def downsampling(cfg: AutoencoderSettings) -> int:
    """Side of an image / side of its latent grid."""
    return 2 ** (len(cfg.channels) - 1)


def kl_divergence(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over latent elements, averaged over the batch."""
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-8) - 1.0)
    return kl.flatten(1).sum(1).mean()


def edge_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 between the horizontal and vertical finite differences of two image batches."""
    dx = (a[..., :, 1:] - a[..., :, :-1]) - (b[..., :, 1:] - b[..., :, :-1])
    dy = (a[..., 1:, :] - a[..., :-1, :]) - (b[..., 1:, :] - b[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


def autoencoder_loss(ae: AutoencoderKL, x: torch.Tensor, cfg: AutoencoderSettings) -> tuple[torch.Tensor, dict]:
    """Loss of one batch ``x`` in [-1, 1]; returns (loss, {"l1", "edge", "kl"} as floats)."""
    mu, sigma = ae.encode(x)
    rec = ae.decode(mu)
    l1 = (rec - x).abs().mean()
    edge = edge_l1(rec, x)
    kl = kl_divergence(mu, sigma)
    loss = l1 + float(cfg.edge_weight) * edge + float(cfg.kl_weight) * kl
    return loss, {"l1": float(l1.detach()), "edge": float(edge.detach()), "kl": float(kl.detach())}


@torch.no_grad()
def encode(ae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """Latent grid (posterior mean) of images in [-1, 1]."""
    return ae.encode(x)[0]


@torch.no_grad()
def decode(ae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] from latents (unscaled)."""
    return ae.decode(z).clamp(-1.0, 1.0)
