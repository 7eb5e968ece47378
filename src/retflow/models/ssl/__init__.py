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

from retflow.settings.frozen import Frozen, plain
from retflow.settings.stages import METHOD_SETTINGS

from ..vit import ViTSpec, create_vit
from .base import SSLModel, freeze
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
]

SSL_METHODS = ("simclr", "dino", "mocov3", "token_recon")

_CLASSES: dict[str, type[SSLModel]] = {
    "simclr": SimCLR,
    "dino": DINO,
    "mocov3": MoCoV3,
    "token_recon": TokenReconstruction,
}


def _as_spec(spec: ViTSpec | Mapping[str, Any]) -> ViTSpec:
    return spec if isinstance(spec, ViTSpec) else ViTSpec.from_dict(plain(spec))


def load_teacher(path: str | Path, spec: ViTSpec | Mapping[str, Any]) -> VisionTransformer:
    """A frozen (``requires_grad=False``, eval mode) teacher encoder for ``token_recon``.

    ``spec`` describes the teacher (it may differ from the student's).  Any layout that
    :func:`~retflow.models.checkpoint_layouts.load_encoder`
    read is accepted (RETFound/MAE ``{'model': ...}``, our pretraining checkpoints with ``encoder.``
    keys, timm state dicts, DINOv2 hub / training files); missing encoder weights raise
    ``ValueError``, a missing file ``FileNotFoundError`` naming the path.
    """
    path = Path(path)
    if not path.exists():  # a file or a `retflow export` folder (load_checkpoint_file reads both)
        raise FileNotFoundError(f"token_recon teacher checkpoint not found: {path}")
    teacher = create_vit(_as_spec(spec), num_classes=0, global_pool="token")
    from retflow.models.checkpoint_layouts import load_encoder

    load_encoder(teacher, path)  # any layout; a problem names the file
    return freeze(teacher).eval()


def build_ssl(method: str, spec: ViTSpec, settings: Frozen, teacher: VisionTransformer | None = None) -> nn.Module:
    """The SSL model ``method`` for the student ``spec`` with its settings record
    (``PretrainSettings.method_settings``: :class:`~retflow.settings.stages.SimCLRSettings`, ...).

    ``teacher`` is only for ``token_recon``; without it the record's ``teacher_checkpoint`` is
    loaded with :func:`load_teacher` (as the ``teacher_vit`` spec, or the student's when that is null).
    """
    if method not in _CLASSES:
        raise ValueError(f"unknown SSL method {method!r}; choose one of {SSL_METHODS}")
    record = METHOD_SETTINGS[method]
    if not isinstance(settings, record):
        raise ValueError(f"{method} is built from its {record.__name__} (retflow.settings.build.pretrain), "
                         f"got {type(settings).__name__}")
    if method != "token_recon":
        if teacher is not None:
            raise ValueError(f"{method} builds its own teacher; a teacher module is only used by token_recon")
        return _CLASSES[method](spec, settings)
    if teacher is None:
        teacher = load_teacher(settings.teacher_checkpoint, settings.teacher_vit or spec)
    return TokenReconstruction(spec, teacher, settings)
