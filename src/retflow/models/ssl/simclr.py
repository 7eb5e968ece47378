"""SimCLR (Chen, Kornblith, Norouzi, Hinton 2020, "A Simple Framework for Contrastive Learning of
Visual Representations") on a timm ViT.

Two augmented views of each image go through the encoder (class token) and an MLP projection head
``g`` (Linear-BN-ReLU hidden layers, 2048 wide, to a 128-d output; the paper found a non-linear
head essential and evaluates the representation *before* it).  The loss is NT-Xent (normalised
temperature-scaled cross entropy): with ``z`` L2-normalised and ``sim = z_i . z_j / tau``, each of
the ``2N`` embeddings must pick its partner view among the other ``2N - 1`` embeddings of the
batch; the loss is averaged over all ``2N`` anchors, i.e. both directions (the paper's
``l(2k-1, 2k) + l(2k, 2k-1)``).  ``tau`` in 0.1-0.5 works (paper Table 5).

Settings: :class:`~retflow.settings.stages.SimCLRSettings` (``pretrain.simclr``; defaults in the schema).

Distributed: the embeddings of all ranks are gathered with a gradient-carrying ``all_gather`` so
every local anchor is contrasted against the global batch (the paper's large-batch negatives);
the positive index of a local anchor is offset by ``rank * N``.  The projector's BatchNorms are
per-process unless the caller converts them to ``SyncBatchNorm`` (the paper's "global BN").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from retflow.settings.stages import SimCLRSettings

from ..vit import ViTSpec
from .base import SSLModel, build_encoder, dist_rank_world, fp32, gather_cat
from .heads import projection_mlp

__all__ = ["SimCLR", "nt_xent"]


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent loss of two ``(N, D)`` view embeddings (row ``i`` of both is the same image).

    Computed in float32; embeddings are L2-normalised here.  In a process group the candidates
    are the embeddings of all ranks (gathered with gradient), anchors are the local ``2N`` rows.
    """
    with fp32(z1.device):
        z1 = F.normalize(z1.float(), dim=1)
        z2 = F.normalize(z2.float(), dim=1)
        n = z1.shape[0]
        rank, world = dist_rank_world()
        keys = torch.cat([gather_cat(z1), gather_cat(z2)], dim=0)  # (2 * N * world, D): all view-1, all view-2
        anchors = torch.cat([z1, z2], dim=0)  # (2N, D)
        logits = anchors @ keys.t() / temperature
        local = torch.arange(n, device=z1.device) + rank * n  # global index of the local images
        half = n * world
        self_idx = torch.cat([local, local + half])
        pos_idx = torch.cat([local + half, local])
        rows = torch.arange(2 * n, device=z1.device)
        logits[rows, self_idx] = float("-inf")
        return F.cross_entropy(logits, pos_idx)


class SimCLR(SSLModel):
    """SimCLR: encoder + projection MLP + NT-Xent over two views."""

    method = "simclr"
    n_views = 2

    def __init__(self, spec: ViTSpec, s: SimCLRSettings) -> None:
        """``s``: the projector, the temperature and the student's drop-path (its colour steps
        are the views', :func:`~retflow.data.ssl_views.ssl_view_transform`)."""
        super().__init__()
        self.spec = spec
        self.temperature = float(s.temperature)
        self.encoder = build_encoder(spec, s.drop_path_rate)
        self.projector = projection_mlp(self.encoder.embed_dim, s.proj_hidden_dim, s.proj_dim, s.proj_layers)

    def forward(self, views) -> torch.Tensor:
        x1, x2 = self._check_views(views)
        z = self.projector(self.encoder(torch.cat([x1, x2], dim=0)))
        z1, z2 = z.chunk(2, dim=0)
        return nt_xent(z1, z2, self.temperature)
