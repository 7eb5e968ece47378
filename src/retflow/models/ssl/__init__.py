"""Self-supervised pretraining methods on the same timm ViT backbone as our MAE.

* ``simclr`` -- SimCLR, Chen et al. 2020: 2 views, no teacher (:mod:`.simclr`)
* ``dino`` -- DINO, Caron et al. 2021: 2 global views (+ ``local_crops``), EMA teacher (:mod:`.dino`)
* ``mocov3`` -- MoCo v3, Chen, Xie & He 2021: 2 views, EMA momentum encoder (:mod:`.mocov3`)
* ``token_recon`` -- RETFound-Green token reconstruction, Engelmann & Bernabeu 2025: 1 view,
  frozen teacher ViT (:mod:`.token_recon`)

Every model is an :class:`~.base.SSLModel`: ``model.encoder`` is the student timm ViT
(``create_vit(spec, num_classes=0, global_pool="token")``; ``encoder_state_dict()`` loads into a
fine-tuning ViT with :func:`~retflow.models.vit.load_encoder_weights`), ``model.n_views`` is the
number of augmented views ``forward(views)`` takes (see :mod:`retflow.data.ssl_views`), ``forward``
returns a float32 scalar loss, and ``model.update_teacher(progress)`` must be called on the
*unwrapped* model after every optimizer step.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from torch import nn
from timm.models.vision_transformer import VisionTransformer

from retflow.data.ssl_views import VIEW_DEFAULTS

from ..vit import ViTSpec, create_vit, load_checkpoint_file, load_encoder_weights
from .base import SSLModel, freeze, merge_cfg
from .dino import DINO
from .mocov3 import MoCoV3
from .simclr import SimCLR
from .token_recon import TokenReconstruction

__all__ = [
    "SSL_METHODS",
    "SSLModel",
    "SimCLR",
    "DINO",
    "MoCoV3",
    "TokenReconstruction",
    "build_ssl",
    "load_teacher",
    "resolve_cfg",
    "ssl_defaults",
]

SSL_METHODS = ("simclr", "dino", "mocov3", "token_recon")

_CLASSES: dict[str, type[SSLModel]] = {
    "simclr": SimCLR,
    "dino": DINO,
    "mocov3": MoCoV3,
    "token_recon": TokenReconstruction,
}
#: config keys consumed by build_ssl itself, not passed to the model's constructor
_BUILD_ONLY = {"token_recon": ("teacher_checkpoint", "teacher_vit")}


def _check_method(method: str) -> None:
    if method not in _CLASSES:
        raise ValueError(f"unknown SSL method {method!r}; choose one of {SSL_METHODS}")


def ssl_defaults(method: str) -> dict[str, Any]:
    """A copy of ``method``'s default config (its keys are the allowed keys)."""
    _check_method(method)
    return dict(_CLASSES[method].DEFAULTS)


def resolve_cfg(method: str, cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults of ``method`` overridden by ``cfg``; unknown method or key -> ``ValueError`` naming it."""
    _check_method(method)
    return merge_cfg(method, _CLASSES[method].DEFAULTS, cfg)


def _as_spec(spec: ViTSpec | Mapping[str, Any]) -> ViTSpec:
    return spec if isinstance(spec, ViTSpec) else ViTSpec.from_dict(spec)


def load_teacher(path: str | Path, spec: ViTSpec | Mapping[str, Any]) -> VisionTransformer:
    """A frozen (``requires_grad=False``, eval mode) teacher encoder for ``token_recon``.

    ``spec`` describes the teacher (it may differ from the student's).  Any layout that
    :func:`~retflow.models.vit.load_checkpoint_file` + :func:`~retflow.models.vit.load_encoder_weights`
    read is accepted (RETFound/MAE ``{'model': ...}``, our pretraining checkpoints with ``encoder.``
    keys, timm state dicts, DINOv2 hub / training files); missing encoder weights raise
    ``ValueError``, a missing file ``FileNotFoundError`` naming the path.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token_recon teacher checkpoint not found: {path}")
    teacher = create_vit(_as_spec(spec), num_classes=0, global_pool="token")
    load_encoder_weights(teacher, load_checkpoint_file(path))
    return freeze(teacher).eval()


def build_ssl(method: str, spec: ViTSpec, cfg: Mapping[str, Any] | None = None,
              teacher: VisionTransformer | None = None) -> nn.Module:
    """Build the SSL model ``method`` for the student ``spec`` with config overrides ``cfg``.

    ``teacher`` is only for ``token_recon``; without it the config's ``teacher_checkpoint`` (and
    optional ``teacher_vit`` spec dict, default the student's spec) is loaded with
    :func:`load_teacher`.
    """
    params = resolve_cfg(method, cfg)
    for key in VIEW_DEFAULTS:  # the views' colour steps: ssl_view_transform's, not the model's
        params.pop(key, None)
    build_only = {k: params.pop(k) for k in _BUILD_ONLY.get(method, ())}
    if method != "token_recon":
        if teacher is not None:
            raise ValueError(f"{method} builds its own teacher; a teacher module is only used by token_recon")
        return _CLASSES[method](spec, **params)
    if teacher is None:
        ckpt = build_only["teacher_checkpoint"]
        if not ckpt:
            raise ValueError("token_recon needs a teacher: pass teacher= or set token_recon.teacher_checkpoint")
        teacher = load_teacher(ckpt, build_only["teacher_vit"] or spec)
    return TokenReconstruction(spec, teacher, **params)
