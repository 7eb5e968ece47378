"""RETFound's fine-tuning recipe pieces: training augmentation and mixup/cutmix.

``augment: retfound`` is RETFound's ``build_transform``: timm's training transform with
RandomResizedCrop, horizontal flip, colour jitter 0.4, RandAugment ``rand-m9-mstd0.5-inc1``
(9 magnitude, 0.5 magnitude noise, increasing-severity ops) and random erasing (p 0.25,
pixel mode), then normalisation -- applied to the stored uint8 image (converted to PIL).
``augment: basic`` is RandomResizedCrop + flip only (cheap; the demo's default).
Mixup/cutmix use :class:`timm.data.Mixup` (soft targets; classification tasks only).
"""

from __future__ import annotations

import torch
from timm.data import Mixup, create_transform
from torchvision.transforms import v2

from retflow.data.dataset import norm_stats, train_transform


def finetune_transform(cfg: dict, img_size: int, normalize: dict | None, in_chans: int):
    if cfg.get("augment", "basic") == "basic":
        return train_transform(img_size, cfg["crop_scale"], normalize=normalize, in_chans=in_chans)
    mean, std = norm_stats(normalize, in_chans)
    timm_tf = create_transform(
        img_size, is_training=True, scale=tuple(cfg["crop_scale"]), color_jitter=cfg.get("color_jitter", 0.4),
        auto_augment=cfg.get("auto_augment", "rand-m9-mstd0.5-inc1"), interpolation="bicubic",
        re_prob=cfg.get("reprob", 0.25), re_mode="pixel", re_count=1, mean=mean, std=std,
    )
    return v2.Compose([v2.ToPILImage(), timm_tf])


def make_mixup(cfg: dict, task_type: str, n_classes: int) -> Mixup | None:
    """timm Mixup when ``mixup`` or ``cutmix`` > 0 (classification only), else None."""
    if task_type not in ("binary", "multiclass", "ordinal"):
        return None
    if cfg.get("mixup", 0.0) <= 0 and cfg.get("cutmix", 0.0) <= 0:
        return None
    return Mixup(mixup_alpha=cfg.get("mixup", 0.0), cutmix_alpha=cfg.get("cutmix", 0.0),
                 prob=cfg.get("mixup_prob", 1.0), switch_prob=cfg.get("mixup_switch_prob", 0.5),
                 label_smoothing=cfg.get("label_smoothing", 0.0), num_classes=n_classes)


def apply_mixup(mixup: Mixup | None, imgs: torch.Tensor, labels: torch.Tensor):
    if mixup is None or imgs.shape[0] % 2:  # timm's batch mixing needs an even batch
        return imgs, labels
    return mixup(imgs, labels)
