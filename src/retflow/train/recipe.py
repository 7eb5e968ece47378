"""RETFound's fine-tuning recipe pieces: training augmentation and mixup/cutmix.

``augment: retfound`` is RETFound's ``build_transform``: timm's training transform with
RandomResizedCrop, horizontal flip, colour jitter 0.4, RandAugment ``rand-m9-mstd0.5-inc1``
(9 magnitude, 0.5 magnitude noise, increasing-severity ops) and random erasing (p 0.25,
pixel mode), then normalisation -- applied to the stored uint8 image (converted to PIL).
``augment: basic`` is RandomResizedCrop + flip only (cheap; the demo's default).
Mixup/cutmix use :class:`timm.data.Mixup` (soft targets; classification tasks only). Every
value comes from the run's :class:`~retflow.settings.stages.FinetuneSettings` (RETFound's values
are the schema's defaults).
"""

from __future__ import annotations

import torch
from timm.data import Mixup, create_transform
from torchvision.transforms import v2

from retflow.data.dataset import norm_stats, train_transform
from retflow.settings.stages import FinetuneSettings


def finetune_transform(s: FinetuneSettings):
    """The training transform of a run's ``augment`` recipe, at its ViT's size and channels."""
    normalize, size, in_chans = s.normalize.to_dict(), s.vit.img_size, s.vit.in_chans
    if s.augment == "basic":
        return train_transform(size, s.crop_scale, normalize=normalize, in_chans=in_chans)
    mean, std = norm_stats(normalize, in_chans)
    timm_tf = create_transform(
        size, is_training=True, scale=tuple(s.crop_scale), color_jitter=s.color_jitter,
        auto_augment=s.auto_augment, interpolation="bicubic", re_prob=s.reprob, re_mode="pixel", re_count=1,
        mean=mean, std=std,
    )
    return v2.Compose([v2.ToPILImage(), timm_tf])


def make_mixup(s: FinetuneSettings) -> Mixup | None:
    """timm Mixup when ``mixup`` or ``cutmix`` > 0 (classification only), else None."""
    if s.task.type not in ("binary", "multiclass", "ordinal"):
        return None
    if s.mixup <= 0 and s.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=s.mixup, cutmix_alpha=s.cutmix, prob=s.mixup_prob, switch_prob=s.mixup_switch_prob,
                 label_smoothing=s.label_smoothing, num_classes=len(s.task.classes))


def apply_mixup(mixup: Mixup | None, imgs: torch.Tensor, labels: torch.Tensor):
    if mixup is None or imgs.shape[0] % 2:  # timm's batch mixing needs an even batch
        return imgs, labels
    return mixup(imgs, labels)
