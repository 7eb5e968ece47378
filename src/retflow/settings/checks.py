"""Checks of pretraining settings the schema cannot express (orderings, divisibility, method
combinations), in one torch-free place: the workflow runs them at startup for every method in
``pretrain.methods`` (:func:`retflow.config.semantic_errors`), and the models run the same
functions when a library user builds them directly."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MULTI_VIEW = ("simclr", "dino", "mocov3")


def _get(section: Any, key: str):
    return section[key] if isinstance(section, Mapping) else getattr(section, key)


def dino_errors(section: Any, patch_size: int) -> list[str]:
    """``pretrain.dino``: the local crops' scale range and size."""
    errors = []
    lo, hi = (float(v) for v in _get(section, "local_crop_scale"))
    if not 0.0 < lo <= hi <= 1.0:
        errors.append(f"pretrain.dino.local_crop_scale: must be [lo, hi] with 0 < lo <= hi <= 1, "
                      f"got {[lo, hi]}")
    if _get(section, "local_crops") and _get(section, "local_size") % patch_size:
        errors.append(f"pretrain.dino.local_size: {_get(section, 'local_size')} is not a multiple of the ViT's "
                      f"patch_size {patch_size}; pick a multiple")
    return errors


def token_recon_errors(section: Any) -> list[str]:
    """``pretrain.token_recon``: the corruption ranges."""
    errors = []
    for name in ("noise_std", "mask_ratio"):
        lo, hi = (float(v) for v in _get(section, name))
        if lo > hi:
            errors.append(f"pretrain.token_recon.{name}: must be [lo, hi] with lo <= hi, got {[lo, hi]}")
    if float(_get(section, "mask_ratio")[1]) >= 1.0:
        errors.append(f"pretrain.token_recon.mask_ratio: must stay below 1 (a student that sees no patch learns "
                      f"nothing), got {list(_get(section, 'mask_ratio'))}")
    return errors


def gpu_augment_errors(gpu_augment: Any, methods) -> list[str]:
    """``pretrain.gpu_augment: true`` is for the single-view methods (mae, token_recon)."""
    multi = [m for m in methods if m in MULTI_VIEW]
    if gpu_augment is True and multi:
        return [f"pretrain.gpu_augment: true, but {', '.join(multi)} use(s) multi-view CPU augmentations; "
                f"set gpu_augment: auto (on the device where it applies) or false"]
    return []


def pretrain_errors(config: dict) -> list[str]:
    """Every such problem of a validated config's ``pretrain`` section (the methods it runs)."""
    p, methods = config["pretrain"], config["pretrain"]["methods"]
    errors = gpu_augment_errors(p["gpu_augment"], methods)
    if "dino" in methods:
        errors += dino_errors(p["dino"], config["vit"]["patch_size"])
    if "token_recon" in methods:
        errors += token_recon_errors(p["token_recon"])
    return errors
