"""Checks of pretraining settings the schema cannot express (orderings, divisibility, method
combinations; the 3-D ViT's sizes), in one torch-free place: the workflow runs them at startup for every method in
``pretrain.methods`` (:func:`retflow.config.semantic_errors`), and the models run the same
functions when a library user builds them directly."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

MULTI_VIEW = ("simclr", "dino", "mocov3")
VOLUME_METHOD = "mae3d"  # the pretraining method of 3-D (volume) models
VOLUME = "volume"  # models.<name>.input (FinetuneSettings.input) of a 3-D model


def _x(size: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in size)


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
    """``pretrain.gpu_augment: true`` is for the single-view image methods (mae, token_recon)."""
    multi = [m for m in methods if m in MULTI_VIEW]
    errors = []
    if gpu_augment is True and multi:
        errors.append(f"pretrain.gpu_augment: true, but {', '.join(multi)} use(s) multi-view CPU augmentations; "
                      f"set gpu_augment: auto (on the device where it applies) or false")
    if gpu_augment is True and VOLUME_METHOD in methods:
        errors.append(f"pretrain.gpu_augment: true, but {VOLUME_METHOD} flips whole volumes in the loader (no "
                      f"batch augmentation on the device); set gpu_augment: auto or false")
    return errors


# ------------------------------------------------------------------ 3-D ViT / MAE (retflow.models.mae3d)
def vit3d_errors(img_size: Sequence[int], tubelet: Sequence[int], embed_dim: int, num_heads: int,
                 key: str = "vit3d") -> list[str]:
    """One line per problem of a 3-D ViT's sizes, naming ``{key}.img_size`` / ``tubelet`` / ...:
    three positive sizes each, every volume axis a multiple of the tubelet's, ``embed_dim`` even
    (3-D sin-cos) and divisible by ``num_heads``."""
    errors = []
    for name, v in (("img_size", img_size), ("tubelet", tubelet)):
        if len(v) != 3 or any(int(s) != s or s < 1 for s in v):
            errors.append(f"{key}.{name}: must be three positive integers [depth, height, width], got {list(v)}")
    if errors:
        return errors
    bad = [f"{axis} {s} % {t} = {s % t}" for axis, s, t in zip(("depth", "height", "width"), img_size, tubelet)
           if s % t]
    if bad:
        fix = [max(t, round(s / t) * t) for s, t in zip(img_size, tubelet)]
        errors.append(f"{key}.img_size: {_x(img_size)} is not divisible by {key}.tubelet {_x(tubelet)} "
                      f"({', '.join(bad)}); set img_size to multiples of the tubelet, e.g. {list(fix)}")
    return errors + width_errors(embed_dim, num_heads, key)


def width_errors(embed_dim: int, num_heads: int, key: str) -> list[str]:
    """``{key}.embed_dim`` even (3-D sin-cos) and divisible by ``{key}.num_heads``."""
    if embed_dim % 2 or embed_dim % num_heads:
        return [f"{key}.embed_dim: {embed_dim} must be even (3-D sin-cos) and divisible by {key}.num_heads "
                f"{num_heads}"]
    return []


def mask_ratio_errors(mask_ratio: float, num_patches: int | None = None,
                      key: str = "pretrain.mae3d.mask_ratio") -> list[str]:
    """``mask_ratio`` must lie in (0, 1) and, given ``num_patches``, leave at least one visible tubelet."""
    if not 0.0 < mask_ratio < 1.0:
        return [f"{key}: must be in (0, 1) (OCTCube uses 0.9), got {mask_ratio}"]
    if num_patches is not None and int(num_patches * (1.0 - mask_ratio) + 1e-6) < 1:
        return [f"{key}: {mask_ratio} leaves no visible tubelet of {num_patches}; lower it below "
                f"{1 - 1 / num_patches:.4g}"]
    return []


def vit3d_section_errors(vit3d: Any) -> list[str]:
    """The ``vit3d`` section's sizes (:func:`vit3d_errors`)."""
    return vit3d_errors(list(_get(vit3d, "img_size")), list(_get(vit3d, "tubelet")), _get(vit3d, "embed_dim"),
                        _get(vit3d, "num_heads"))


def mae3d_errors(vit3d: Any, section: Any) -> list[str]:
    """``pretrain.mae3d``: the decoder's width, a mask ratio that leaves a tubelet of ``vit3d``'s visible
    (the ``vit3d`` section itself: :func:`vit3d_section_errors`)."""
    decoder = _get(section, "decoder")
    errors = width_errors(_get(decoder, "embed_dim"), _get(decoder, "num_heads"), "pretrain.mae3d.decoder")
    img_size, tubelet = list(_get(vit3d, "img_size")), list(_get(vit3d, "tubelet"))
    patches = None if vit3d_section_errors(vit3d) else math.prod(s // t for s, t in zip(img_size, tubelet))
    return errors + mask_ratio_errors(float(_get(section, "mask_ratio")), patches)


def volume_recipe_errors(recipe: Mapping[str, Any], protocol: str, where: str) -> list[str]:
    """A volume model's run (``where``: which model on which task) cannot apply the 2-D image augmentations:
    its training augmentation is a random A-scan-axis flip (:class:`retflow.data.volume_dataset.VolumeDataset`)."""
    errors = []
    if protocol != "probe_logreg" and recipe["augment"] != "basic":
        errors.append(f"{where} ({protocol}): augment '{recipe['augment']}' is a 2-D image augmentation; a volume "
                      f"model trains with random A-scan-axis flips: set augment: basic in its recipe.{protocol}")
    if protocol in ("finetune", "lora") and recipe["cutmix"] > 0:
        errors.append(f"{where} ({protocol}): cutmix {recipe['cutmix']} cuts 2-D boxes; set cutmix: 0 for a volume "
                      f"model in its recipe.{protocol} (mixup works on volumes)")
    return errors


def pretrain_errors(config: dict) -> list[str]:
    """Every such problem of a validated config's ``pretrain`` section (the methods it runs)."""
    p, methods = config["pretrain"], config["pretrain"]["methods"]
    errors = gpu_augment_errors(p["gpu_augment"], methods)
    if "dino" in methods:
        errors += dino_errors(p["dino"], config["vit"]["patch_size"])
    if "token_recon" in methods:
        errors += token_recon_errors(p["token_recon"])
    if VOLUME_METHOD in methods:
        errors += mae3d_errors(config["vit3d"], p[VOLUME_METHOD])
    return errors
