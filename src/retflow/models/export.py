"""Export a ViT as ``model.safetensors`` + a timm-style ``config.json``.

The folder loads back with plain timm, either way::

    timm.create_model("local-dir:/path/to/export", pretrained=True)
    timm.create_model(**timm_create_kwargs("/path/to/export"))
    # = timm.create_model(arch, pretrained=True,
    #       pretrained_cfg_overlay=dict(file=".../model.safetensors", num_classes=K, ...),
    #       **config["model_args"])      # model_args holds num_classes, img_size, patch_size, ...

``num_classes`` must be in ``pretrained_cfg_overlay`` as well: timm discards the classifier
weights when the model's ``num_classes`` differs from ``pretrained_cfg['num_classes']`` (the
architecture's registered 1000 unless overlaid).

``config.json`` (timm's layout, as ``timm.models.save_for_hf`` writes it): ``architecture``,
``num_classes``, ``num_features``, ``global_pool``, ``label_names``, ``model_args`` (our
``ViTSpec``: ``img_size``, ``patch_size``, ``in_chans``, ``model_kwargs``, plus ``num_classes``
and ``global_pool``), ``pretrained_cfg`` (``input_size``, ``mean``/``std`` of our
normalisation, ``interpolation`` bilinear and ``crop_pct`` 1.0 as our eval transform, label
names), and a ``retflow`` section (spec, classes, normalize, task, source file and layout,
preprocessing note, and under ``checkpoint`` what a fine-tuned checkpoint records besides its
weights: ``task_spec``, ``target_scale``, ``epoch``, ``val_score``) that timm ignores.  The folder
is read back wherever a weights file is accepted (:func:`retflow.checkpoint_file.read_file`).

A MAE linear-probe head (``BatchNorm1d(affine=False)`` + ``Linear``) is folded into one
``Linear`` (exact in eval mode), so the export is a stock timm ``VisionTransformer``. A LoRA run's
``best.pth`` already holds the merged model; a model that still carries LoRA adapters (a library
user's, :mod:`retflow.train.lora`) is merged on the copy that is exported.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from retflow.atomic import atomic_path
from retflow.checkpoint_file import EXPORT_CONFIG as CONFIG_NAME
from retflow.checkpoint_file import EXPORT_WEIGHTS as WEIGHTS_NAME

from .vit import ViTSpec

__all__ = ["export_model", "export_checkpoint", "timm_create_kwargs", "load_export", "fold_probe_head",
           "WEIGHTS_NAME", "CONFIG_NAME", "META_KEYS", "META_SECTION"]

#: checkpoint metadata kept in ``config.json["retflow"][META_SECTION]`` (JSON values only)
META_KEYS = ("task_spec", "target_scale", "epoch", "val_score")
META_SECTION = "checkpoint"


def fold_probe_head(model: nn.Module) -> nn.Module:
    """Replace a ``Sequential(BatchNorm1d, Linear)`` head by the equivalent ``Linear`` (in place).

    ``y = W (x - mu) / sqrt(var + eps) * g + W b_bn + b`` with the BatchNorm's running statistics
    (and affine parameters, if any).  Other heads are left alone.
    """
    head = getattr(model, "head", None)
    if not (isinstance(head, nn.Sequential) and len(head) == 2 and isinstance(head[0], nn.BatchNorm1d)
            and isinstance(head[1], nn.Linear)):
        return model
    bn, lin = head
    with torch.no_grad():
        scale = (bn.running_var.double() + bn.eps).rsqrt()
        shift = -bn.running_mean.double() * scale
        if bn.affine:
            scale = scale * bn.weight.double()
            shift = shift * bn.weight.double() + bn.bias.double()
        folded = nn.Linear(lin.in_features, lin.out_features, bias=True)
        w = lin.weight.double()
        folded.weight.copy_((w * scale[None, :]).to(lin.weight.dtype))
        bias = lin.bias.double() if lin.bias is not None else torch.zeros(lin.out_features, dtype=torch.float64)
        folded.bias.copy_((bias + w @ shift).to(lin.weight.dtype))
    model.head = folded
    return model


def _norm_stats(normalize: Mapping | None, in_chans: int) -> tuple[list[float], list[float]]:
    """Per-channel mean/std exactly as the training transforms use them (ImageNet when not given)."""
    from retflow.data.dataset import norm_stats

    mean, std = norm_stats(dict(normalize) if normalize else None, in_chans)
    return [float(v) for v in mean], [float(v) for v in std]


def _pool_of(model: nn.Module) -> str:
    pool = getattr(model, "global_pool", "token")
    return pool if isinstance(pool, str) and pool else "token"


def export_model(
    model: nn.Module,
    spec: ViTSpec,
    out_dir: str | Path,
    *,
    classes: list[str] | None = None,
    normalize: Mapping | None = None,
    task: str | None = None,
    source: str | None = None,
    layout: str | None = None,
    verify: bool = True,
    meta: Mapping | None = None,
) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.json``; returns ``out_dir``.

    ``model`` is a timm ``VisionTransformer`` built from ``spec`` (``num_classes`` is read from
    it; ``classes`` names its outputs).  The caller's model is not modified (a probe head is
    folded on a copy).  ``meta``: a checkpoint's metadata; its :data:`META_KEYS` are kept.  With
    ``verify`` the folder is reloaded through :func:`timm_create_kwargs` and must reproduce the
    model's output on a random input.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    m = fold_probe_head(copy.deepcopy(model).float().cpu().eval())
    if any(".lora_" in name for name, _ in m.named_parameters()):  # LoRA adapters: export the merged model
        from retflow.train.lora import merge_adapters

        merge_adapters(m)
    num_classes = int(getattr(m, "num_classes", 0) or 0)
    if classes is not None and len(classes) != num_classes:
        raise ValueError(f"{len(classes)} class names for a model with {num_classes} outputs")
    pool = _pool_of(m)
    model_args: dict[str, Any] = {
        "img_size": spec.img_size, "patch_size": spec.patch_size, "in_chans": spec.in_chans,
        **spec.model_kwargs, "num_classes": num_classes, "global_pool": pool,
    }
    try:
        json.dumps(model_args)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"ViTSpec.model_kwargs are not JSON-serialisable, cannot export: {exc}") from None
    mean, std = _norm_stats(normalize, spec.in_chans)
    labels = [str(c) for c in classes] if classes else None
    pretrained_cfg: dict[str, Any] = {
        "tag": "retflow",
        "input_size": [spec.in_chans, spec.img_size, spec.img_size],
        "fixed_input_size": True,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": mean,
        "std": std,
        "num_classes": num_classes,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }
    if labels:
        pretrained_cfg["label_names"] = labels
    config: dict[str, Any] = {
        "architecture": spec.arch,
        "num_classes": num_classes,
        "num_features": int(getattr(m, "num_features", 0)),
        "global_pool": pool,
    }
    if labels:
        config["label_names"] = labels
    config["model_args"] = model_args
    config["pretrained_cfg"] = pretrained_cfg
    config["retflow"] = {
        "spec": spec.to_dict(),
        "kind": "classifier" if num_classes else "encoder",
        "classes": labels,
        "normalize": {"mean": mean, "std": std} if normalize is None else dict(normalize),
        "task": task,
        "source": source,
        "source_layout": layout,
        "preprocess": "CFP: retflow.data.preprocess.preprocess_cfp (field crop, pad to square, resize); "
                      "OCT: preprocess_oct; then resize to input_size, /255, normalise with mean/std",
    }
    kept = _json_meta(meta)
    if kept:
        config["retflow"][META_SECTION] = kept
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()}
    with atomic_path(out_dir / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    with atomic_path(out_dir / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    if verify:
        _verify(m, out_dir, spec)
    return out_dir


def _json_meta(meta: Mapping | None) -> dict[str, Any]:
    """The :data:`META_KEYS` of ``meta`` as JSON values (tensors / numpy scalars converted; others left out)."""
    out: dict[str, Any] = {}
    for key in META_KEYS:
        if not meta or meta.get(key) is None:
            continue
        value = meta[key]
        if isinstance(value, torch.Tensor):
            value = value.tolist()
        elif hasattr(value, "item") and not isinstance(value, (list, tuple, dict)):
            value = value.item()
        try:
            out[key] = json.loads(json.dumps(value))
        except (TypeError, ValueError):
            continue
    return out


def timm_create_kwargs(out_dir: str | Path) -> dict[str, Any]:
    """Keyword arguments for ``timm.create_model(**kwargs)`` that load an export folder."""
    out_dir = Path(out_dir)
    cfg = json.loads((out_dir / CONFIG_NAME).read_text())
    pc = cfg.get("pretrained_cfg", {})
    overlay = {"file": str(out_dir / WEIGHTS_NAME), "num_classes": cfg["num_classes"]}
    for key in ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode", "label_names"):
        if key in pc:
            overlay[key] = tuple(pc[key]) if isinstance(pc[key], list) else pc[key]
    return {"model_name": cfg["architecture"], "pretrained": True, "pretrained_cfg_overlay": overlay,
            **cfg["model_args"]}


def load_export(out_dir: str | Path) -> nn.Module:
    """The exported model rebuilt by timm (eval mode)."""
    import timm

    return timm.create_model(**timm_create_kwargs(out_dir)).eval()


@torch.no_grad()
def _verify(model: nn.Module, out_dir: Path, spec: ViTSpec) -> None:
    again = load_export(out_dir)
    x = torch.randn(2, spec.in_chans, spec.img_size, spec.img_size, generator=torch.Generator().manual_seed(0))
    a, b = model(x), again(x)
    if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
        raise RuntimeError(f"export check failed: timm reload of {out_dir} gives different outputs "
                           f"(max abs diff {float((a - b).abs().max()) if a.shape == b.shape else 'shape'})")


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    num_heads: int | None = None,
    global_pool: str | None = None,
    verify: bool = True,
):
    """Export any supported checkpoint (see :mod:`retflow.models.checkpoint_layouts`).

    A fine-tuned ``best.pth`` exports the classifier (probe head folded); a pretraining
    ``checkpoint.pth`` or a foreign encoder (RETFound, MAE, DINOv2, timm) exports the encoder
    only (``num_classes=0``; ``global_pool="token"`` by default, which keeps its final norm).
    Returns the :class:`~retflow.models.checkpoint_layouts.LoadedModel` that was exported.
    """
    from .checkpoint_layouts import load_model

    lm = load_model(checkpoint, num_heads=num_heads, global_pool=global_pool)
    export_model(lm.model, lm.spec, out_dir, classes=lm.classes, normalize=lm.normalize, task=lm.task,
                 source=str(checkpoint), layout=lm.report.layout, verify=verify, meta=lm.meta)
    return lm
