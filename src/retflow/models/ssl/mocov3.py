"""MoCo v3 (Chen, Xie, He 2021, "An Empirical Study of Training Self-Supervised Vision
Transformers") on a timm ViT.

* Base branch: encoder (class token) -> projector (3-layer MLP, 4096 hidden, 256 out, BN on every
  layer, the last BN without affine) -> predictor (2-layer MLP, 4096 hidden, 256 out, same BN
  pattern).  Momentum branch: EMA copies of encoder + projector (no predictor), frozen for the
  optimizer; momentum ``m`` rises from 0.99 to 1 on a half-cosine over training.
* Loss: symmetrised InfoNCE, ``ctr(q1, k2) + ctr(q2, k1)``, where ``ctr(q, k)`` is the cross
  entropy of ``q . k / tau`` with the matching key as the positive and the other keys of the
  (global) batch as negatives -- no memory queue in v3 -- multiplied by ``2 * tau`` as in the
  reference implementation (which makes the gradient scale insensitive to ``tau``); ``tau=0.2``.
  In a process group the keys of all ranks are gathered and positive labels offset by
  ``rank * N``.
* ViT stability tricks from the paper: a *random, frozen patch projection* (``freeze_patch_embed``:
  the patch-embedding conv keeps its random Xavier init and gets ``requires_grad=False``) and a fixed 2-D sin-cos position embedding (``sincos_pos_embed``, also
  frozen).  Initialisation follows the reference ViT: Xavier-uniform linears (q, k, v treated as
  three separate matrices), Xavier patch projection, class token ``N(0, 1e-6)``.

Settings: :class:`~retflow.settings.stages.MoCoV3Settings` (``pretrain.mocov3``; defaults in the
schema). The momentum branch stays in train mode (its BatchNorms use batch statistics, as in the paper's
code).  Convert the BatchNorms to ``SyncBatchNorm`` for multi-GPU runs to match the paper.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from retflow.settings.stages import MoCoV3Settings

from ..pos_embed import get_2d_sincos_pos_embed
from ..vit import ViTSpec
from .base import SSLModel, build_encoder, cosine_momentum, dist_rank_world, ema_update, fp32, freeze, gather_cat
from .heads import projection_mlp

__all__ = ["MoCoV3", "infonce"]


def infonce(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo-v3 contrastive loss ``CE(q . k_all / tau, own index) * 2 * tau`` in float32.

    ``q`` (N, D) local queries, ``k`` (N, D) local keys (same images, row-aligned); both are
    L2-normalised here.  Keys are gathered from all ranks in a process group.
    """
    with fp32(q.device):
        q = F.normalize(q.float(), dim=1)
        k = F.normalize(k.float(), dim=1)
        rank, _ = dist_rank_world()
        keys = gather_cat(k)
        logits = q @ keys.t() / temperature
        labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
        return F.cross_entropy(logits, labels) * (2.0 * temperature)


def _mocov3_init(encoder: nn.Module, sincos_pos_embed: bool) -> None:
    """Reference MoCo-v3 ViT initialisation (see module docstring)."""
    for name, m in encoder.named_modules():
        if isinstance(m, nn.Linear):
            if name.endswith(".qkv"):  # q, k, v as three separate (D x D) matrices
                bound = math.sqrt(6.0 / float(m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    proj = encoder.patch_embed.proj
    bound = math.sqrt(6.0 / float(proj.weight[0].numel() + proj.weight.shape[0]))
    nn.init.uniform_(proj.weight, -bound, bound)
    if proj.bias is not None:
        nn.init.zeros_(proj.bias)
    nn.init.normal_(encoder.cls_token, std=1e-6)
    if sincos_pos_embed:
        grid = encoder.patch_embed.grid_size
        if grid[0] != grid[1] or encoder.embed_dim % 4:
            raise ValueError("sincos_pos_embed needs a square patch grid and embed_dim % 4 == 0")
        table = torch.from_numpy(get_2d_sincos_pos_embed(encoder.embed_dim, grid[0]))
        pos_prefix = 0 if encoder.no_embed_class else encoder.num_prefix_tokens  # class (+ register) rows: 0
        with torch.no_grad():
            encoder.pos_embed.zero_()
            encoder.pos_embed[0, pos_prefix:].copy_(table)
        encoder.pos_embed.requires_grad_(False)


class MoCoV3(SSLModel):
    """MoCo v3: base encoder + projector + predictor vs. a momentum encoder + projector."""

    method = "mocov3"
    n_views = 2

    def __init__(self, spec: ViTSpec, s: MoCoV3Settings) -> None:
        """``s``: heads, temperature, base momentum, the ViT tricks and the student's drop-path (its
        colour steps are the views', :func:`~retflow.data.ssl_views.ssl_view_transform`)."""
        super().__init__()
        self.spec = spec
        self.temperature = float(s.temperature)
        self.base_momentum = float(s.momentum)
        self.encoder = build_encoder(spec, s.drop_path_rate)
        _mocov3_init(self.encoder, bool(s.sincos_pos_embed))
        if s.freeze_patch_embed:
            freeze(self.encoder.patch_embed)
        dim = self.encoder.embed_dim
        self.projector = projection_mlp(dim, s.proj_hidden_dim, s.proj_dim, n_layers=3, last_bn=True)
        self.predictor = projection_mlp(s.proj_dim, s.pred_hidden_dim, s.proj_dim, n_layers=2, last_bn=True)
        self.momentum_encoder = freeze(copy.deepcopy(self.encoder))
        self.momentum_projector = freeze(copy.deepcopy(self.projector))

    def _student_params(self):
        return [*self.encoder.parameters(), *self.projector.parameters()]

    def _teacher_params(self):
        return [*self.momentum_encoder.parameters(), *self.momentum_projector.parameters()]

    @torch.no_grad()
    def update_teacher(self, progress: float) -> None:
        """EMA step of the momentum encoder + projector with the cosine-scheduled momentum."""
        ema_update(self._teacher_params(), self._student_params(), cosine_momentum(self.base_momentum, progress))

    def forward(self, views) -> torch.Tensor:
        x1, x2 = self._check_views(views)
        q1 = self.predictor(self.projector(self.encoder(x1)))
        q2 = self.predictor(self.projector(self.encoder(x2)))
        with torch.no_grad():
            k1 = self.momentum_projector(self.momentum_encoder(x1))
            k2 = self.momentum_projector(self.momentum_encoder(x2))
        return infonce(q1, k2, self.temperature) + infonce(q2, k1, self.temperature)
