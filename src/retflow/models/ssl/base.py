"""Shared plumbing of the SSL zoo: the base module, EMA teachers, distributed helpers.

Every method is an :class:`SSLModel`: ``self.encoder`` is a timm ``VisionTransformer`` built by
:func:`~retflow.models.vit.create_vit` with ``num_classes=0`` and token pooling (so
``encoder(x)`` is the normalised class token and ``encoder.state_dict()`` has plain timm keys,
exactly like :class:`~retflow.models.mae.MaskedAutoencoderViT`'s encoder); ``forward(views)``
returns a scalar float32 loss; ``update_teacher(progress)`` is called after every optimizer step.

Teachers (EMA copies, frozen distillation targets) have ``requires_grad=False`` so the optimizer
parameter groups skip them; they change only in ``update_teacher`` (or never, for a frozen
teacher).
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from ..vit import ViTSpec, create_vit

__all__ = [
    "SSLModel",
    "build_encoder",
    "freeze",
    "cosine_momentum",
    "ema_update",
    "dist_rank_world",
    "gather_cat",
    "all_reduce_sum",
    "fp32",
]


def build_encoder(spec: ViTSpec, drop_path_rate: float, dynamic_img_size: bool = False) -> VisionTransformer:
    """The student backbone: ``create_vit(spec, num_classes=0, global_pool="token")``.

    ``dynamic_img_size=True`` (DINO local crops) only changes the forward (timm interpolates the
    position table to the input's patch grid); parameter names and shapes are those of ``spec``.
    """
    if dynamic_img_size and not spec.model_kwargs.get("dynamic_img_size"):
        spec = ViTSpec(spec.arch, spec.img_size, spec.patch_size, spec.in_chans,
                       {**spec.model_kwargs, "dynamic_img_size": True})
    enc = create_vit(spec, num_classes=0, drop_path_rate=drop_path_rate, global_pool="token")
    if enc.cls_token is None:
        raise ValueError(f"SSL methods need a ViT with a class token ({spec.arch} has none)")
    return enc


def freeze(module: nn.Module) -> nn.Module:
    """``requires_grad=False`` on every parameter of ``module`` (returned for chaining)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def cosine_momentum(base: float, progress: float) -> float:
    """EMA momentum rising from ``base`` (progress 0) to 1 (progress 1) on a half cosine.

    ``m = 1 - (1 - base) * (1 + cos(pi * progress)) / 2`` -- the schedule of BYOL, DINO and MoCo-v3.
    """
    progress = min(max(float(progress), 0.0), 1.0)
    return 1.0 - (1.0 - base) * (1.0 + math.cos(math.pi * progress)) / 2.0


@torch.no_grad()
def ema_update(teacher: Iterable[nn.Parameter], student: Iterable[nn.Parameter], momentum: float) -> None:
    """``t <- m * t + (1 - m) * s`` for matching parameter lists (buffers are not touched)."""
    t, s = list(teacher), list(student)
    if len(t) != len(s):
        raise RuntimeError(f"EMA teacher has {len(t)} parameters, student {len(s)}")
    if t:
        torch._foreach_lerp_(t, s, 1.0 - momentum)


def dist_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """``all_gather`` + concat whose backward hands every rank the sum over ranks of the gradient
    of its own rows (all-reduce of the full gradient, then the local slice: works on every backend).
    Same semantics as ``torch.distributed.nn.functional.all_gather``, which torch 2.14 deprecates."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        rank, world = dist_rank_world()
        ctx.rank, ctx.n = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) from all ranks along dim 0, in rank order;
    identity in a single process.

    Gradient-carrying: the backward sums the gradients every rank computed for this rank's rows,
    so with DDP's gradient averaging the parameters get the gradient of the global (all-rank mean)
    loss.  Tensors that do not require grad are gathered the same way (no autograd record).
    """
    _, world = dist_rank_world()
    if world == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no autograd); identity in a single process."""
    if dist_rank_world()[1] > 1:
        dist.all_reduce(x)
    return x


def fp32(device: torch.device):
    """Context that switches autocast off, so a loss runs in float32 even inside a bf16 region."""
    return torch.autocast(device_type=device.type, enabled=False)


class SSLModel(nn.Module):
    """Base class: encoder access, view checking, default no-op teacher update."""

    #: method name as in :data:`retflow.models.ssl.SSL_METHODS`
    method: str = ""
    #: number of augmented views ``forward`` consumes
    n_views: int = 1

    encoder: VisionTransformer

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """Student encoder weights in plain timm ViT naming, detached CPU copies (as MAE's)."""
        return {k: v.detach().cpu().clone() for k, v in self.encoder.state_dict().items()}

    def update_teacher(self, progress: float) -> None:  # noqa: B027 - deliberate no-op default
        """Called after every optimizer step with ``progress`` = finished steps / total in [0, 1]."""

    def _check_views(self, views: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        views = [views] if isinstance(views, torch.Tensor) else list(views)
        if len(views) != self.n_views:
            raise ValueError(f"{self.method} expects {self.n_views} views, got {len(views)}")
        return views
