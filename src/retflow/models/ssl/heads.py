"""Heads shared by the SSL methods: BN projection MLPs (SimCLR, MoCo-v3) and the DINO head.

* :func:`projection_mlp` -- ``Linear -> BN -> ReLU`` hidden layers and a final ``Linear``
  (optionally followed by a BatchNorm without affine parameters, as MoCo-v3's projector and
  predictor).  Hidden linears have no bias because a BatchNorm follows them.
* :class:`DINOHead` -- DINO's head (Caron et al. 2021, Sec. 3.1 / App.): a ``n_layers`` MLP with
  GELU (2048 hidden, 256 bottleneck), L2 normalisation of the bottleneck, then a weight-normalised
  linear layer without bias to ``out_dim`` prototypes (65536 in the paper).  The weight norm's gain
  is fixed to 1 (DINO's ``norm_last_layer=True``), i.e. each prototype row is unit-normalised.
  The last layer can be "frozen" (zero gradient) early in training, which the paper found to
  stabilise it; this is done with a gradient gate, so the parameter stays in the autograd graph
  and DDP needs no ``find_unused_parameters``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import trunc_normal_

__all__ = ["projection_mlp", "NormalizedLinear", "DINOHead"]


def projection_mlp(in_dim: int, hidden_dim: int, out_dim: int, n_layers: int,
                   last_bn: bool = False) -> nn.Sequential:
    """``n_layers`` MLP: ``(Linear[no bias] -> BatchNorm1d -> ReLU) x (n_layers-1) -> Linear``.

    With ``last_bn`` the final linear has no bias and is followed by ``BatchNorm1d(affine=False)``.
    """
    if n_layers < 1:
        raise ValueError(f"an MLP needs at least 1 layer, got {n_layers}")
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(n_layers - 1):
        layers += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=not last_bn))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


class NormalizedLinear(nn.Module):
    """Bias-free linear layer whose weight rows are L2-normalised (weight norm with gain 1).

    ``grad_enabled=False`` keeps the output unchanged but makes the weight's gradient exactly zero
    (``w.detach() + 0 * (w - w.detach())``): DINO's "freeze the last layer during the first epoch".
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        trunc_normal_(self.weight, std=0.02)
        self.grad_enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if not self.grad_enabled:
            w = w.detach() + 0.0 * (w - w.detach())
        return F.linear(x, F.normalize(w, dim=1))


class DINOHead(nn.Module):
    """DINO projection head: MLP -> L2-normalise -> weight-normalised prototypes layer."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int, n_layers: int) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"DINO head needs at least 1 layer, got {n_layers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(n_layers - 1):
            layers += [nn.Linear(dim, hidden_dim), nn.GELU()]
            dim = hidden_dim
        layers.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = NormalizedLinear(bottleneck_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return self.last_layer(x)
