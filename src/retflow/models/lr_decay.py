"""Optimizer parameter groups: layer-wise lr decay (fine-tuning) and plain weight-decay split (pretraining).

Groups carry an ``lr_scale`` key that :func:`retflow.train.schedule.apply_lr`
multiplies into the scheduled learning rate.
"""
from __future__ import annotations

from typing import Iterable

from torch import nn

__all__ = ["vit_layer_id", "param_groups_lrd", "param_groups_weight_decay"]

_STEM = ("cls_token", "reg_token", "pos_embed", "dist_token")
_STEM_PREFIXES = ("patch_embed.", "norm_pre.")
_TOKEN_SUFFIXES = ("cls_token", "reg_token", "dist_token", "mask_token", "pos_embed")


def vit_layer_id(name: str, num_blocks: int) -> int:
    """Layer index of a timm ViT parameter for lr decay.

    Tokens, ``pos_embed``, ``patch_embed`` (and ``norm_pre``) -> 0;
    ``blocks.i.*`` -> ``i + 1``; everything else (final norm, fc_norm,
    head) -> ``num_blocks + 1``.
    """
    if name in _STEM or name.startswith(_STEM_PREFIXES):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_blocks + 1


def param_groups_lrd(
    model: nn.Module,
    weight_decay: float = 0.05,
    no_weight_decay_list: Iterable[str] = (),
    layer_decay: float = 0.75,
) -> list[dict]:
    """Layer-wise lr-decay parameter groups for a timm ViT (MAE/RETFound fine-tuning).

    Layer ``i`` gets ``lr_scale = layer_decay ** (num_blocks + 1 - i)`` (the
    head has scale 1).  No weight decay for 1-D parameters (biases, norms) and
    for names in ``no_weight_decay_list`` united with ``model.no_weight_decay()``
    when the model defines it (timm ViT: ``pos_embed``, ``cls_token``, ...), as
    MAE's ``main_finetune.py`` passes that set.  Frozen parameters are skipped.
    Each group: ``params``, ``weight_decay``, ``lr_scale``, ``layer_id``.
    """
    skip = set(no_weight_decay_list)
    if hasattr(model, "no_weight_decay"):
        skip |= set(model.no_weight_decay())
    num_blocks = len(model.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name.endswith(".bias") or name in skip
        layer = vit_layer_id(name, num_blocks)
        key = (layer, no_decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": layer_decay ** (num_blocks + 1 - layer),
                "layer_id": layer,
            }
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def param_groups_weight_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups for pretraining: decayed weights, and non-decayed norms/biases/tokens/pos-embeds.

    Note: MAE's original pretraining decays the 3-D ``cls_token``/``mask_token``;
    here all tokens and position embeddings are excluded from decay.
    Frozen parameters (e.g. fixed sin-cos tables) are skipped; empty groups omitted.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name.endswith(_TOKEN_SUFFIXES):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]
