"""timm Vision Transformer construction and encoder-weight loading.

All models are built with ``pretrained=False``: weights only ever come from
local files given by the workflow (:func:`load_checkpoint_file`), never from
the network.

Fine-tuning recipe (RETFound / MAE ``main_finetune.py``), implemented by
:func:`load_encoder_weights`:

* the classifier uses ``global_pool="avg"``; timm then puts a LayerNorm
  *after* pooling (``model.fc_norm``) and replaces ``model.norm`` by
  ``nn.Identity``;
* the pretrained encoder's final ``norm.weight`` / ``norm.bias`` are therefore
  **discarded** and ``fc_norm`` keeps its fresh initialisation (weight 1,
  bias 0) - exactly what RETFound does (it deletes ``model.norm`` when
  ``global_pool`` is set and expects ``fc_norm.*`` among the missing keys);
* the head is re-initialised with ``trunc_normal(std=2e-5)`` and zero bias.

With ``global_pool="token"`` the model keeps ``norm`` and the encoder's final
norm is loaded into it (linear-probe style / MAE-native layout; DINOv2 and RETFound-DINOv2
fine-tune on the class token this way). Which of the two a downstream run uses is the model's
``models.<name>.pool`` (:class:`~retflow.settings.stages.FinetuneSettings` ``pool``).

DINOv2-family architectures (timm's ``vit_{small,base,large,giant}_patch14[_reg4]_dinov2``:
LayerScale, register tokens, SwiGLU for ``giant``) are built like any other: at the configured
``img_size`` / ``patch_size`` (timm registers them at 518 px; the position table here is the
configured grid), never downloaded. Register tokens are prefix tokens (``num_prefix_tokens``):
average pooling leaves them out, as it leaves out the class token. A checkpoint's position
table (e.g. DINOv2's 37x37) is interpolated to the configured grid on loading; a checkpoint
whose patch size differs from the configured one is refused in one line.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Mapping

import timm
import torch
from torch import nn
from timm.layers import trunc_normal_
from timm.models import adapt_input_conv
from timm.models.vision_transformer import VisionTransformer

from .pos_embed import interpolate_pos_embed

__all__ = ["ViTSpec", "create_vit", "load_encoder_weights", "load_checkpoint_file"]

#: keyword arguments :func:`create_vit` sets itself; not allowed in ``model_kwargs``.
_RESERVED_KWARGS = frozenset(
    {"pretrained", "img_size", "patch_size", "in_chans", "num_classes", "drop_path_rate", "global_pool"}
)
#: prefixes stripped (repeatedly, in any order) from checkpoint keys.
_STRIP_PREFIXES = ("module.", "encoder.", "backbone.")
_BLOCK_KEY = re.compile(r"^blocks\.\d+\.")


@dataclasses.dataclass
class ViTSpec:
    """Architecture of a ViT encoder.

    ``arch`` is a timm model name (e.g. ``"vit_large_patch16_224"``); the
    other fields override the registered defaults.  ``model_kwargs`` carries
    further timm ``VisionTransformer`` arguments (``embed_dim``, ``depth``,
    ``num_heads``, ``mlp_ratio`` ...).
    """

    arch: str
    img_size: int
    patch_size: int
    in_chans: int = 3
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.model_kwargs = dict(self.model_kwargs or {})
        clash = sorted(_RESERVED_KWARGS & self.model_kwargs.keys())
        if clash:
            raise ValueError(f"ViTSpec.model_kwargs may not set {clash}; use the dedicated fields")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ViTSpec":
        """Build from a config mapping; unknown keys raise ``ValueError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ViTSpec keys {unknown}; allowed: {sorted(names)}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (safe to store in a weights_only checkpoint)."""
        return dataclasses.asdict(self)


def create_vit(
    spec: ViTSpec, num_classes: int, drop_path_rate: float = 0.0, global_pool: str = "avg"
) -> VisionTransformer:
    """Create a randomly initialised timm ``VisionTransformer`` (never downloads).

    ``global_pool="avg"`` gives timm's ``fc_norm`` after mean pooling of the
    patch tokens (RETFound); ``"token"`` uses the class token and ``norm``.
    ``num_classes=0`` yields ``head = nn.Identity()``.
    """
    if not timm.is_model(spec.arch):
        raise ValueError(f"unknown timm architecture {spec.arch!r}")
    model = timm.create_model(
        spec.arch,
        pretrained=False,
        img_size=spec.img_size,
        patch_size=spec.patch_size,
        in_chans=spec.in_chans,
        num_classes=num_classes,
        drop_path_rate=drop_path_rate,
        global_pool=global_pool,
        **spec.model_kwargs,
    )
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"{spec.arch!r} is not a timm VisionTransformer ({type(model).__name__})")
    return model


def load_checkpoint_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.pth``/``.pt``/``.bin``, ``.safetensors`` or a ``retflow export`` folder.

    Read by :func:`retflow.checkpoint_file.read_file` (``weights_only=True``, memory-mapped; a
    refused pickle names the file and the global).  A ``{'model': sd}`` or ``{'state_dict': sd}``
    wrapper is unwrapped (an export folder reads as ``{'model': sd, ...}``).  DINOv2 layouts
    (``{'teacher': {'backbone.*': ...}}`` as in RETFound-DINOv2, or a flat DINOv2 backbone) are
    converted to timm key names (:func:`retflow.models.checkpoint_layouts.convert_dinov2`).  Other
    keys are returned unchanged (``encoder.`` / decoder keys stay; see :func:`load_encoder_weights`).
    """
    from retflow.checkpoint_file import CheckpointError, read_file

    from .checkpoint_layouts import _is_dinov2_flat, convert_dinov2

    path = Path(path)
    obj: Any = read_file(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("teacher"), Mapping):
        teacher = obj["teacher"]
        backbone = {k[len("backbone."):]: v for k, v in teacher.items() if k.startswith("backbone.")}
        return convert_dinov2(backbone or teacher)[0]
    if isinstance(obj, Mapping):
        for wrapper in ("model", "state_dict"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: no state dict of tensors in it, not a model checkpoint")
    if _is_dinov2_flat(obj) and not any(k.startswith(("encoder.", "decoder_")) for k in obj):
        return convert_dinov2(obj)[0]
    return dict(obj)


def strip_prefixes(key: str, prefixes=_STRIP_PREFIXES) -> str:
    """Remove any of ``prefixes`` from the start of ``key``, repeatedly and in any order."""
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def _is_dropped(key: str, uses_fc_norm: bool) -> bool:
    """Keys that are never loaded into a classifier ViT."""
    if key.startswith("decoder_") or key.startswith("decoder.") or key == "mask_token":
        return True  # MAE decoder
    if key.startswith("head.") or key.startswith("head_dist."):
        return True  # classifier head of the source model
    return uses_fc_norm and key.startswith("norm.")  # RETFound: fresh fc_norm, encoder norm discarded


def _size_text(hw: tuple[int, int]) -> str:
    return str(hw[0]) if hw[0] == hw[1] else f"{hw[0]}x{hw[1]}"


def _preview(keys: list[str], n: int = 8) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def load_encoder_weights(
    vit: VisionTransformer, state_dict: Mapping[str, torch.Tensor], strict_report: bool = True,
    check_only: bool = False,
) -> dict[str, list[str]]:
    """Load a pretrained encoder into ``vit`` following the RETFound recipe.

    Steps: strip ``module.``/``encoder.``/``backbone.`` prefixes; drop MAE
    decoder keys (``decoder_*``, ``mask_token``) and any ``head.*``; when the
    model pools with ``fc_norm`` (``norm`` is Identity) drop ``norm.*`` (see
    module docstring); bicubically resize ``pos_embed`` if the patch grid
    differs; adapt ``patch_embed.proj.weight`` to a different ``in_chans``
    (timm ``adapt_input_conv``); then load and re-initialise the head
    (trunc-normal std 2e-5, bias 0).

    Any shape mismatch raises :class:`~retflow.checkpoint_file.CheckpointError` (one line: how
    many tensors differ, the first few, what to set in ``vit:``).  Missing keys other than
    ``head.*`` / ``fc_norm.*`` mean a wrong checkpoint: with
    ``strict_report=True`` (default) they raise naming them;
    with ``False`` they are only reported, but a checkpoint that provides no
    transformer-block weight at all still raises. ``check_only`` stops after these checks
    (``vit`` may then live on the ``meta`` device: the pre-flight weights check).

    Returns ``{"missing": [...], "unexpected": [...], "dropped": [...]}``
    (``unexpected``: checkpoint keys with no place in the model, not loaded;
    ``dropped``: keys removed on purpose as described above).
    """
    uses_fc_norm = isinstance(vit.norm, nn.Identity) and not isinstance(vit.fc_norm, nn.Identity)
    target = vit.state_dict()
    sd: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for raw_key, value in state_dict.items():
        key = strip_prefixes(raw_key)
        if _is_dropped(key, uses_fc_norm):
            dropped.append(key)
        else:
            sd[key] = value

    w_key = "patch_embed.proj.weight"
    from retflow.checkpoint_file import CheckpointError

    if w_key in sd and w_key in target and sd[w_key].ndim == 4 \
            and tuple(sd[w_key].shape[-2:]) != tuple(target[w_key].shape[-2:]):
        got, want = tuple(sd[w_key].shape[-2:]), tuple(target[w_key].shape[-2:])
        raise CheckpointError(
            f"has patch size {_size_text(got)} but vit.patch_size is {_size_text(want)}; set vit.patch_size: "
            f"{got[0]} (and a vit.arch of that patch size) to use this checkpoint")

    if "pos_embed" in sd and vit.pos_embed is not None and sd["pos_embed"].shape != vit.pos_embed.shape:
        num_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        try:
            sd["pos_embed"] = interpolate_pos_embed(sd["pos_embed"], tuple(vit.patch_embed.grid_size), num_prefix)
        except ValueError:
            raise CheckpointError(
                f"has a pos_embed of {sd['pos_embed'].shape[1]} positions, which is no square patch grid after the "
                f"configured ViT's {num_prefix} prefix position(s); set vit.arch to the checkpoint's (class token / "
                f"registers: `retflow inspect --checkpoint FILE` shows it)") from None

    if w_key in sd and w_key in target and sd[w_key].ndim == 4:
        old_c, new_c = sd[w_key].shape[1], target[w_key].shape[1]
        if old_c != new_c:
            sd[w_key] = adapt_input_conv(new_c, sd[w_key], base_chans=old_c)

    bad_shapes = [
        f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}"
        for k, v in sd.items()
        if k in target and v.shape != target[k].shape
    ]
    if bad_shapes:
        width = sd.get("cls_token", sd.get("patch_embed.proj.weight"))
        hint = f" (the checkpoint's embedding width is {width.shape[-1] if width.ndim == 3 else width.shape[0]})" \
            if width is not None else ""
        raise CheckpointError(
            f"does not fit the configured ViT: {len(bad_shapes)} tensor(s) differ in shape (checkpoint vs model), "
            f"e.g. {'; '.join(bad_shapes[:3])}{hint}; set vit: (arch, model_kwargs embed_dim/depth/num_heads, "
            f"patch_size) to the checkpoint's architecture (`retflow inspect --checkpoint FILE` shows it)")

    missing = sorted(k for k in target if k not in sd)
    required_missing = [k for k in missing if not (k.startswith("head.") or k.startswith("fc_norm."))]
    if not any(_BLOCK_KEY.match(k) and k in target for k in sd):
        raise CheckpointError(
            "provides no transformer block weights - wrong file? "
            f"Its keys look like: {_preview(sorted(state_dict))}"
        )
    if required_missing and strict_report:
        raise CheckpointError(
            f"is missing {len(required_missing)} encoder weights of the configured ViT: {_preview(required_missing)}"
        )
    if check_only:
        return {"missing": missing, "unexpected": sorted(k for k in sd if k not in target), "dropped": sorted(dropped)}

    result = vit.load_state_dict(sd, strict=False)
    if isinstance(vit.head, nn.Linear):
        trunc_normal_(vit.head.weight, std=2e-5)
        nn.init.zeros_(vit.head.bias)
    return {
        "missing": sorted(result.missing_keys),
        "unexpected": sorted(result.unexpected_keys),
        "dropped": sorted(dropped),
    }


def attach_probe_head(model: VisionTransformer) -> None:
    """MAE linear probe: a BatchNorm without affine parameters before the linear head."""
    model.head = nn.Sequential(nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6), model.head)
