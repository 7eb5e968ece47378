"""Token reconstruction (RETFound-Green; Engelmann & Bernabeu 2025, "Training a high-performance
retinal foundation model with half-the-data and 400 times less compute").

The student sees a *corrupted* image and must predict the tokens -- class token and patch tokens
-- that a *frozen* teacher ViT produces from the *clean* image.  There is no EMA: the teacher never
changes (``update_teacher`` is a no-op), so the objective is a denoising / inpainting feature
regression that is cheap (one view, one student pass, one frozen teacher pass without backward).

What this implementation does (the paper's exact corruption settings are not reproduced here;
the knobs below are ours):

* **Corruption** (per sample, in normalised pixel space): Gaussian noise ``x + sigma * eps`` with
  ``sigma ~ U(noise_std)`` (e.g. U(0, 1): a random strength up to the image's own scale),
  then random patch masking: a share ``r ~ U(mask_ratio)`` (e.g. U(0, 0.5)) of the student's
  patches is set to 0 (the dataset mean after normalisation).  ``noise_std=(0, 0)`` or
  ``mask_ratio=(0, 0)`` switch a corruption off.  Masking is in pixel space, so the encoder
  forward is timm's own and no mask token is added to the encoder.
* **Teacher** (passed in, see :func:`retflow.models.ssl.load_teacher`): frozen, eval mode, may have
  another width, patch size, input size or channel count.  The clean view is resized to the
  teacher's ``img_size`` and its channels adapted (1 -> 3 replicated, 3 -> 1 averaged); the
  teacher's patch-token grid is resampled bilinearly (anti-aliased) to the student's grid.  Both
  models receive the same normalisation.
* **Predictor**: linear map from the student width to the teacher width (or a 2-layer GELU MLP
  with ``predictor_hidden_dim > 0``), applied to every token of the student's final (normed)
  output.
* **Loss**: mean squared error against the teacher tokens after a parameter-free LayerNorm (per
  token zero-mean unit-variance, which makes the target scale-free as in MAE's normalised pixels /
  data2vec), in float32; ``(patch_mse + cls_weight * cls_mse) / (1 + cls_weight)``, so with
  ``cls_weight=1`` the class token weighs as much as all patch tokens together.

Settings: :class:`~retflow.settings.stages.TokenReconSettings` (``pretrain.token_recon``; defaults
in the schema).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from retflow.settings.checks import token_recon_errors
from retflow.settings.load import ConfigError
from retflow.settings.stages import TokenReconSettings

from ..vit import ViTSpec
from .base import SSLModel, build_encoder, fp32, freeze

__all__ = ["TokenReconstruction"]


def _range(value) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    return lo, hi


class TokenReconstruction(SSLModel):
    """Student ViT + predictor regressing a frozen teacher's tokens of the clean image."""

    method = "token_recon"
    n_views = 1

    def __init__(self, spec: ViTSpec, teacher: VisionTransformer, s: TokenReconSettings) -> None:
        """``teacher``: the frozen target ViT (:func:`retflow.models.ssl.load_teacher`); ``s``: the
        corruption ranges, the predictor, the class-token weight and the student's drop-path."""
        super().__init__()
        if not isinstance(teacher, VisionTransformer):
            raise ValueError(f"token_recon needs a timm VisionTransformer teacher, got {type(teacher).__name__}")
        if teacher.cls_token is None:
            raise ValueError("token_recon teacher must have a class token")
        errors = token_recon_errors(s)  # also run at startup (retflow.settings.checks)
        if errors:
            raise ConfigError(errors)
        self.spec = spec
        self.noise_std = _range(s.noise_std)
        self.mask_ratio = _range(s.mask_ratio)
        self.cls_weight = float(s.cls_weight)
        self.encoder = build_encoder(spec, s.drop_path_rate)
        self.grid = tuple(self.encoder.patch_embed.grid_size)

        t_chans = teacher.patch_embed.proj.in_channels
        if t_chans != spec.in_chans and {t_chans, spec.in_chans} != {1, 3}:
            raise ValueError(f"cannot feed {spec.in_chans}-channel images to a {t_chans}-channel teacher")
        self.teacher = freeze(teacher).eval()
        s_dim, t_dim = self.encoder.embed_dim, teacher.embed_dim
        if s.predictor_hidden_dim > 0:
            self.predictor = nn.Sequential(
                nn.Linear(s_dim, s.predictor_hidden_dim), nn.GELU(), nn.Linear(s.predictor_hidden_dim, t_dim)
            )
        else:
            self.predictor = nn.Linear(s_dim, t_dim)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    # -------------------------------------------------------------- pieces
    def corrupt(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample random-strength Gaussian noise, then random patch masking (fill 0)."""
        b = x.shape[0]
        lo, hi = self.noise_std
        if hi > 0:
            sigma = torch.empty(b, 1, 1, 1, device=x.device).uniform_(lo, hi)
            x = x + sigma.to(x.dtype) * torch.randn_like(x)
        lo, hi = self.mask_ratio
        if hi > 0:
            gh, gw = self.grid
            p = self.spec.patch_size
            n = gh * gw
            ratio = torch.empty(b, 1, device=x.device).uniform_(lo, hi)
            ranks = torch.rand(b, n, device=x.device).argsort(dim=1).argsort(dim=1)  # random rank per patch
            keep = (ranks >= (ratio * n).floor()).to(x.dtype)  # the floor(r * n) lowest-ranked patches are masked
            keep = keep.view(b, 1, gh, 1, gw, 1).expand(b, 1, gh, p, gw, p).reshape(b, 1, gh * p, gw * p)
            x = x * keep
        return x

    @torch.no_grad()
    def teacher_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher ``(cls (B, Dt), patches (B, gh*gw, Dt))`` of the clean images on the student grid, float32."""
        t = self.teacher
        if t.patch_embed.proj.in_channels != x.shape[1]:
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x.mean(dim=1, keepdim=True)
        t_size = tuple(t.patch_embed.img_size) if t.patch_embed.img_size is not None else tuple(x.shape[-2:])
        if tuple(x.shape[-2:]) != t_size and not getattr(t, "dynamic_img_size", False):
            x = F.interpolate(x.float(), size=t_size, mode="bilinear", align_corners=False, antialias=True).to(x.dtype)
        tokens = t.forward_features(x)
        cls, patches = tokens[:, 0].float(), tokens[:, t.num_prefix_tokens:].float()
        tp = t.patch_embed.patch_size
        t_grid = (x.shape[-2] // tp[0], x.shape[-1] // tp[1])
        if t_grid != self.grid:
            b, _, d = patches.shape
            grid = patches.transpose(1, 2).reshape(b, d, *t_grid)
            grid = F.interpolate(grid, size=self.grid, mode="bilinear", align_corners=False, antialias=True)
            patches = grid.flatten(2).transpose(1, 2)
        return cls, patches

    # ------------------------------------------------------------- forward
    def forward(self, views) -> torch.Tensor:
        (x,) = self._check_views(views)
        t_cls, t_patch = self.teacher_tokens(x)
        s = self.encoder.forward_features(self.corrupt(x))
        pred = self.predictor(s)
        prefix = self.encoder.num_prefix_tokens
        with fp32(x.device):
            pred = pred.float()
            d = t_cls.shape[-1]
            patch_loss = F.mse_loss(pred[:, prefix:], F.layer_norm(t_patch, (d,)))
            cls_loss = F.mse_loss(pred[:, 0], F.layer_norm(t_cls, (d,)))
            return (patch_loss + self.cls_weight * cls_loss) / (1.0 + self.cls_weight)
