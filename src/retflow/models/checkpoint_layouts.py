"""Reading ViT checkpoints in every key layout we meet, and rebuilding the model they belong to.

Files are read by :func:`retflow.checkpoint_file.read_file`, the one reader of every stage
(``torch.load(weights_only=True)``, memory-mapped; safetensors; export folders): nothing is ever
unpickled freely (a refused pickle names the file and the global) and nothing is downloaded.

Layouts (detected from the file's structure by :func:`detect_layout`; the name is reported):

``mae_full``
    ``{'model': <full MAE state dict>}`` - encoder keys in timm ViT naming at the top level plus
    the MAE decoder (``decoder_*``, ``mask_token``).  RETFound-MAE releases
    (``RETFound_cfp_weights.pth``, ``RETFound_mae_*``; timm ``vit_large_patch16_224`` names) and
    the ImageNet MAE ``*_full.pth`` / ``mae_visualize_*.pth`` files.  Decoder keys are dropped and
    counted.
``mae_encoder``
    ``{'model': <encoder only>}`` - the ImageNet MAE releases ``mae_pretrain_vit_*.pth`` (and
    MAE / RETFound fine-tuned checkpoints, which also carry ``fc_norm`` / ``head``).
``dinov2_teacher``
    ``{'teacher': {'backbone.*', 'dino_head.*', 'ibot_head.*'}}`` - DINOv2 training checkpoints,
    e.g. RETFound-DINOv2.  Only ``backbone.*`` is kept, then converted as ``dinov2``.
``dinov2``
    A flat DINOv2 backbone state dict (``mask_token``, maybe ``register_tokens``, maybe
    ``mlp.w12`` / ``mlp.w3``), e.g. the facebookresearch/dinov2 hub files.  Conversion to timm:
    ``mask_token`` dropped; FSDP block chunks ``blocks.<chunk>.<i>.`` -> ``blocks.<i>.``;
    SwiGLU ``mlp.w12`` -> ``mlp.fc1`` and ``mlp.w3`` -> ``mlp.fc2``; ``register_tokens`` ->
    ``reg_token`` with the class position folded into ``cls_token`` and the class row removed
    from ``pos_embed`` (timm's ``no_embed_class`` register models).
``timm``
    A flat timm ``VisionTransformer`` state dict (``.pth`` or ``.safetensors``), or a timm
    training checkpoint ``{'state_dict': ..., 'state_dict_ema': ...}`` (EMA preferred, as timm).
``retflow_pretrain``
    Our MAE pretraining ``checkpoint.pth`` (or ``resume/last.pth``): ``{'model': {'encoder.*',
    decoder ...}, 'args': {'vit': <ViTSpec>, ...}}``; the spec is taken from ``args``.
``retflow_finetuned``
    Our fine-tuned / probed ``best.pth``: ``{'model', 'spec', 'classes', 'normalize', 'task',
    'probe_head', ...}``; rebuilt exactly (classifier with its head).
``retflow_export``
    A folder written by :func:`retflow.models.export.export_model` (``config.json`` +
    ``model.safetensors``), or that ``model.safetensors`` itself; rebuilt exactly as exported.

Which timm architecture a foreign checkpoint is built as (:func:`infer_spec`): plain ViTs (MAE,
RETFound-MAE, timm) -> ``vit_{tiny,small,base,large}_patch16_224`` / ``vit_huge_patch14_224``
by width; DINOv2-style ViTs (LayerScale / registers) -> ``vit_{small,base,large}_patch14_dinov2``
(``..._reg4_dinov2`` with registers; RETFound-DINOv2 is ``vit_large_patch14_dinov2``, as in
RETFound's own code); a SwiGLU MLP (``w12``/``w3``) -> ``vit_giant_patch14[_reg4]_dinov2``, the
timm architecture built with ``SwiGLUPacked`` + SiLU, with ``embed_dim`` / ``depth`` /
``num_heads`` / ``mlp_ratio`` overridden to the checkpoint's.  Any width or depth that differs
from the chosen architecture becomes a ``ViTSpec.model_kwargs`` override.  ``num_heads`` cannot
be read from weights: it comes from the usual width -> heads table (192:3, 384:6, 768:12,
1024:16, 1280:16, 1536:24), else ``width // 64``, else the caller must pass it.
"""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Mapping

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from retflow.checkpoint_file import EXPORT_CONFIG, CheckpointError, RefusedCheckpoint, read_file

from .export import META_SECTION
from .pos_embed import interpolate_pos_embed
from .vit import ViTSpec, attach_probe_head, create_vit, load_encoder_weights, strip_prefixes

__all__ = [
    "LAYOUTS",
    "CheckpointError",
    "RefusedCheckpoint",
    "Checkpoint",
    "LoadReport",
    "LoadedModel",
    "read_checkpoint",
    "read_torch_file",
    "detect_layout",
    "convert_dinov2",
    "infer_spec",
    "load_encoder",
    "load_model",
]

#: layout name -> what produces it
LAYOUTS: dict[str, str] = {
    "mae_full": "MAE encoder + decoder under 'model' (RETFound-MAE; ImageNet MAE *_full / visualize)",
    "mae_encoder": "MAE encoder only under 'model' (ImageNet MAE mae_pretrain_vit_*; MAE/RETFound fine-tuned)",
    "dinov2_teacher": "DINOv2 training checkpoint, 'teacher' with 'backbone.' prefix (RETFound-DINOv2)",
    "dinov2": "flat DINOv2 backbone state dict (facebookresearch/dinov2 hub weights)",
    "timm": "flat timm VisionTransformer state dict / timm training checkpoint",
    "retflow_pretrain": "retflow MAE pretraining checkpoint ('model' with 'encoder.' keys, 'args' with 'vit')",
    "retflow_finetuned": "retflow fine-tuned best.pth ('model', 'spec', 'classes', 'normalize')",
    "retflow_export": "retflow export folder (config.json + model.safetensors)",
}

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")
_CHUNK_RE = re.compile(r"^blocks\.\d+\.(\d+)\.")

_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1536: 24}
# (embed_dim, depth, num_heads, mlp_ratio) registered by timm for these names
_PLAIN_SIZES = {
    192: ("tiny", 12, 3), 384: ("small", 12, 6), 768: ("base", 12, 12), 1024: ("large", 24, 16),
    1280: ("huge", 32, 16),
}
_DINO_SIZES = {384: ("small", 12, 6), 768: ("base", 12, 12), 1024: ("large", 24, 16), 1536: ("giant", 40, 24)}
_GIANT_MLP_RATIO = 2.66667 * 2
#: DINOv2 files keep the 37x37 position table (518 px at patch 14) of DINOv2's release whatever they
#: were trained at; DINOv2 and RETFound-DINOv2 train / fine-tune at 224 px, the size :func:`load_model`
#: builds such a file at unless given ``img_size`` (the workflow builds at the configured ``vit.img_size``).
DINOV2_TABLE_SIZE, DINOV2_INPUT_SIZE = 518, 224


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What loading a checkpoint did.

    ``loaded``: model tensors filled from the file; ``missing``: model tensors the file did not
    provide (for a pretrained encoder in a classifier: ``head.*`` and ``fc_norm.*``);
    ``unexpected``: file tensors with no place in the model; ``dropped``: file tensors left out
    on purpose (MAE decoder, ``mask_token``, DINO heads, the source classifier, ``norm`` under
    fc_norm pooling).  ``pos_embed_resized``: ``(old_grid, new_grid)`` when interpolated.
    """

    path: str
    layout: str
    loaded: int
    missing: int
    unexpected: int
    dropped: int
    missing_keys: tuple[str, ...] = ()
    unexpected_keys: tuple[str, ...] = ()
    dropped_keys: tuple[str, ...] = ()
    pos_embed_resized: tuple[tuple[int, int], tuple[int, int]] | None = None
    notes: tuple[str, ...] = ()

    def summary(self) -> str:
        text = (f"{self.path}: layout {self.layout}; loaded {self.loaded}, missing {self.missing}, "
                f"unexpected {self.unexpected}, dropped {self.dropped}")
        if self.pos_embed_resized:
            (a, b), (c, d) = self.pos_embed_resized
            text += f"; pos_embed resized {a}x{b} -> {c}x{d}"
        if self.notes:
            text += "; " + "; ".join(self.notes)
        return text

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint converted to timm ``VisionTransformer`` key names.

    ``state_dict`` holds the tensors to load, ``dropped`` the keys removed during conversion;
    ``spec`` / ``classes`` / ``normalize`` / ``task`` / ``probe_head`` / ``global_pool`` come from
    retflow metadata when the file has it (else ``None``); ``meta`` holds everything else a
    fine-tuned checkpoint or export records (``task_spec``, ``target_scale``, ``epoch`` ...).
    """

    path: str
    layout: str
    state_dict: dict[str, torch.Tensor]
    dropped: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    spec: ViTSpec | None = None
    classes: list[str] | None = None
    normalize: dict | None = None
    task: str | None = None
    probe_head: bool = False
    global_pool: str | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def is_classifier(self) -> bool:
        """A fine-tuned model whose head belongs to the file (retflow metadata says so)."""
        return bool(self.classes) and any(k.startswith("head.") for k in self.state_dict)


@dataclasses.dataclass
class LoadedModel:
    """A model rebuilt from a checkpoint, with what is known about its use."""

    model: VisionTransformer
    spec: ViTSpec
    report: LoadReport
    kind: str  # "classifier" or "encoder"
    global_pool: str
    classes: list[str] | None = None
    normalize: dict | None = None
    task: str | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------------------ reading files
def read_torch_file(path: str | Path) -> Any:
    """The object stored in a checkpoint file or export folder: :func:`retflow.checkpoint_file.read_file`."""
    return read_file(path)


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and any(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_wrappers(sd: Mapping[str, Any]) -> dict[str, Any]:
    return {strip_prefixes(k, _WRAPPER_PREFIXES): v for k, v in sd.items()}


def _has_decoder(keys) -> bool:
    return any(k.startswith(("decoder_", "decoder.")) for k in keys)


def _is_dinov2_flat(keys) -> bool:
    keys = set(keys)
    return ("register_tokens" in keys or any(".mlp.w12." in k for k in keys)
            or ("mask_token" in keys and not _has_decoder(keys))
            or any(_CHUNK_RE.match(k) for k in keys))


def detect_layout(obj: Any) -> str:
    """Name of the key layout of a loaded checkpoint object (see module docstring)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"a {type(obj).__name__}, not a checkpoint dict")
    if isinstance(obj.get("export_config"), Mapping) and _is_tensor_dict(obj.get("model")):
        return "retflow_export"
    if isinstance(obj.get("teacher"), Mapping):
        return "dinov2_teacher"
    if isinstance(obj.get("model"), Mapping) and "spec" in obj and "classes" in obj:
        return "retflow_finetuned"
    for key in ("state_dict_ema", "model_ema", "state_dict"):
        if _is_tensor_dict(obj.get(key)):
            inner = _strip_wrappers(obj[key])
            return "dinov2" if _is_dinov2_flat(inner) else "timm"
    if _is_tensor_dict(obj.get("model")):
        inner = _strip_wrappers(obj["model"])
        if any(k.startswith("encoder.") for k in inner):
            return "retflow_pretrain"
        if _is_dinov2_flat(inner) and not _has_decoder(inner):
            return "dinov2"
        return "mae_full" if _has_decoder(inner) else "mae_encoder"
    if _is_tensor_dict(obj):
        flat = _strip_wrappers(obj)
        if any(k.startswith("encoder.") for k in flat):
            return "retflow_pretrain"
        if _has_decoder(flat):
            return "mae_full"
        return "dinov2" if _is_dinov2_flat(flat) else "timm"
    raise CheckpointError(f"no state dict found (top-level keys: {sorted(map(str, obj))[:10]})")


def convert_dinov2(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """DINOv2 backbone keys -> timm ``VisionTransformer`` keys; returns ``(state_dict, dropped)``."""
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for k, v in sd.items():
        if k == "mask_token":
            dropped.append(k)
            continue
        k = _CHUNK_RE.sub(r"blocks.\1.", k)  # FSDP block chunks: blocks.<chunk>.<global index>.
        k = re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", k)
        k = re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", k)
        out[k] = v
    if "register_tokens" in out:
        # DINOv2 adds pos_embed[0] to the class token and inserts registers after it without a
        # position; timm's register models (no_embed_class) keep positions for patches only.
        reg = out.pop("register_tokens")
        out["reg_token"] = reg
        if "pos_embed" in out and "cls_token" in out:
            pos = out["pos_embed"]
            out["cls_token"] = out["cls_token"] + pos[:, :1]
            out["pos_embed"] = pos[:, 1:]
    return out, dropped


def _split_prefix(sd: Mapping[str, Any], prefix: str) -> tuple[dict[str, Any], list[str]]:
    kept, dropped = {}, []
    for k, v in sd.items():
        if k.startswith(prefix):
            kept[k[len(prefix):]] = v
        else:
            dropped.append(k)
    return kept, dropped


def _drop_mae_decoder(sd: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    kept, dropped = {}, []
    for k, v in sd.items():
        if k.startswith(("decoder_", "decoder.")) or k == "mask_token":
            dropped.append(k)
        else:
            kept[k] = v
    return kept, dropped


def _tensors_only(sd: Mapping[str, Any], path: str) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not out:
        raise CheckpointError(f"{path}: the state dict holds no tensors")
    return out


def _from_export(path: Path, obj: Mapping[str, Any]) -> Checkpoint:
    cfg = obj["export_config"]
    folder = path if path.is_dir() else path.parent
    cfg_path = folder / EXPORT_CONFIG
    meta = cfg.get("retflow") or {}
    try:
        spec = ViTSpec.from_dict(meta["spec"]) if meta.get("spec") else None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{cfg_path}: retflow.spec is not a ViT spec ({exc})") from None
    if spec is None:
        args = dict(cfg.get("model_args") or {})
        try:
            spec = ViTSpec(cfg["architecture"], int(args.pop("img_size")), int(args.pop("patch_size")),
                           int(args.pop("in_chans", 3)),
                           {k: v for k, v in args.items() if k not in ("num_classes", "global_pool")})
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{cfg_path}: no retflow spec and incomplete model_args ({exc})") from None
    labels = cfg.get("label_names") or (cfg.get("pretrained_cfg") or {}).get("label_names")
    n_cls = int(cfg.get("num_classes") or 0)
    if n_cls and not labels:
        labels = [str(i) for i in range(n_cls)]
    classes = [str(c) for c in labels] if n_cls else None
    ck = Checkpoint(
        path=str(folder), layout="retflow_export", state_dict=_tensors_only(obj["model"], str(folder)), spec=spec,
        classes=classes, normalize=meta.get("normalize"), task=meta.get("task"),
        global_pool=cfg.get("global_pool") or (cfg.get("model_args") or {}).get("global_pool"),
    )
    ck.meta = {**dict(meta.get(META_SECTION) or {}), "spec": spec.to_dict(), "classes": classes,
               "normalize": ck.normalize, "task": ck.task}
    return ck


def _refuse_3d(path: Path, obj: Any) -> None:
    """3-D checkpoints (:mod:`retflow.models.mae3d`: an mae3d run's, a volume model's best.pth) are not 2-D ViTs."""
    if not isinstance(obj, Mapping):
        return
    if obj.get("input") == "volume":
        raise CheckpointError(f"{path}: a 3-D (volume) model; embed, export, inspect and saliency read 2-D ViTs "
                              f"only (predict reads it: retflow.train.predict)")
    if obj.get("method") == "mae3d":
        raise CheckpointError(f"{path}: a 3-D MAE (mae3d) checkpoint; only a volume model (models.<name>.input: "
                              f"volume, init: pretrained, method: mae3d) loads it")


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read any supported checkpoint (file or export folder) and convert it to timm key names."""
    path = Path(path)
    obj = read_file(path)
    _refuse_3d(path, obj)
    try:
        layout = detect_layout(obj)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: not a ViT checkpoint - {exc}") from None
    if layout == "retflow_export":
        return _from_export(path, obj)
    ck = Checkpoint(path=str(path), layout=layout, state_dict={})
    dropped: list[str] = []
    if layout == "dinov2_teacher":
        teacher = _strip_wrappers(obj["teacher"])
        sd, dropped = _split_prefix(teacher, "backbone.")
        if not sd:  # a teacher saved without the backbone wrapper
            sd, dropped = dict(teacher), []
        sd, more = convert_dinov2(sd)
        dropped += more
        ck.notes.append("DINOv2 teacher backbone")
    elif layout == "retflow_finetuned":
        sd = _strip_wrappers(obj["model"])
        ck.spec = ViTSpec.from_dict(obj["spec"])
        ck.classes = [str(c) for c in obj["classes"]]
        ck.normalize = obj.get("normalize")
        ck.task = obj.get("task")
        ck.probe_head = bool(obj.get("probe_head"))
        ck.global_pool = obj.get("pool") or "avg"  # files written before models.<name>.pool pooled avg
        ck.meta = {k: v for k, v in obj.items() if k != "model"}
    else:
        inner: Mapping[str, Any] = obj
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if _is_tensor_dict(obj.get(key)):
                inner = obj[key]
                if key != "model":
                    ck.notes.append(f"weights from '{key}'")
                break
        sd = _strip_wrappers(inner)
        if layout == "retflow_pretrain":
            sd, dropped = _split_prefix(sd, "encoder.")
            args = obj.get("args")
            if isinstance(args, Mapping) and isinstance(args.get("vit"), Mapping):
                ck.spec = ViTSpec.from_dict(args["vit"])
                ck.normalize = args.get("normalize")
        elif layout == "dinov2":
            sd, dropped = convert_dinov2(sd)
        else:
            sd, dropped = _drop_mae_decoder(sd)
    ck.state_dict = _tensors_only(sd, str(path))
    ck.dropped = dropped
    if not any(_BLOCK_RE.match(k) for k in ck.state_dict):
        raise CheckpointError(
            f"{path}: no ViT transformer-block weights (layout {layout}); keys look like "
            f"{sorted(ck.state_dict)[:6]}"
        )
    if ck.global_pool is None and "fc_norm.weight" in ck.state_dict and "norm.weight" not in ck.state_dict:
        ck.global_pool = "avg"
    return ck


# ------------------------------------------------------------------------------ architecture
def _square(n: int) -> int | None:
    r = int(round(math.sqrt(n)))
    return r if r * r == n and r > 0 else None


def _heads_for(dim: int, num_heads: int | None) -> int:
    if num_heads:
        return int(num_heads)
    if dim in _HEADS:
        return _HEADS[dim]
    if dim % 64 == 0:
        return dim // 64
    raise CheckpointError(f"cannot infer num_heads for embed_dim {dim}; pass num_heads (--num-heads)")


def _registered(name: str) -> bool:
    return timm.is_model(name)


def infer_spec(sd: Mapping[str, torch.Tensor], *, num_heads: int | None = None, path: str = "checkpoint") -> ViTSpec:
    """The :class:`ViTSpec` of a timm-named ViT state dict (see the module docstring for the mapping)."""
    w = sd.get("patch_embed.proj.weight")
    if w is None or w.ndim != 4:
        raise CheckpointError(f"{path}: no 4-D patch_embed.proj.weight, cannot infer the ViT architecture")
    dim, in_chans, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[-1])
    if w.shape[-1] != w.shape[-2]:
        raise CheckpointError(f"{path}: non-square patches {tuple(w.shape[-2:])} are not supported")
    depth = 1 + max(int(m.group(1)) for k in sd if (m := _BLOCK_RE.match(k)))
    has_cls = "cls_token" in sd
    reg = int(sd["reg_token"].shape[1]) if "reg_token" in sd else 0
    prefix = int(has_cls) + reg
    pos = sd.get("pos_embed")
    if pos is None:
        raise CheckpointError(f"{path}: no pos_embed, cannot infer the image size")
    n = int(pos.shape[1])
    no_embed_class = False
    if reg and _square(n):
        grid, no_embed_class = _square(n), True
    elif prefix and _square(n - prefix):
        grid = _square(n - prefix)
    elif _square(n):
        grid, no_embed_class = _square(n), bool(prefix)
    else:
        raise CheckpointError(f"{path}: pos_embed with {n} tokens is not a square patch grid")
    if "blocks.0.mlp.fc1.weight" not in sd or "blocks.0.mlp.fc2.weight" not in sd:
        raise CheckpointError(f"{path}: no blocks.0.mlp.fc1/fc2 weights, cannot infer the MLP")
    fc1 = int(sd["blocks.0.mlp.fc1.weight"].shape[0])
    fc2_in = int(sd["blocks.0.mlp.fc2.weight"].shape[1])
    swiglu = fc1 == 2 * fc2_in
    mlp_ratio = fc1 / dim
    layer_scale = "blocks.0.ls1.gamma" in sd
    qkv_bias = "blocks.0.attn.qkv.bias" in sd
    heads = _heads_for(dim, num_heads)
    if dim % heads:
        raise CheckpointError(f"{path}: embed_dim {dim} is not divisible by num_heads {heads}")

    kwargs: dict[str, Any] = {}
    if swiglu or reg or layer_scale:  # DINOv2-style
        size = "giant" if swiglu else (_DINO_SIZES[dim][0] if dim in _DINO_SIZES and dim != 1536 else "large")
        arch = f"vit_{size}_patch14_{'reg4_' if reg else ''}dinov2"
        d_dim, d_depth, d_heads = {s: (d, dep, h) for d, (s, dep, h) in _DINO_SIZES.items()}[size]
        d_ratio = _GIANT_MLP_RATIO if size == "giant" else 4.0
        if not layer_scale:
            kwargs["init_values"] = None
        if reg and reg != 4:
            kwargs["reg_tokens"] = reg
        if bool(reg) != no_embed_class:
            kwargs["no_embed_class"] = no_embed_class
    else:
        size, d_depth, d_heads = _PLAIN_SIZES.get(dim, ("base", 12, 12))
        d_dim = {s: d for d, (s, _, _) in _PLAIN_SIZES.items()}[size]
        d_ratio = 4.0
        candidates = (["vit_huge_patch14_224"] if size == "huge" else []) + [
            f"vit_{size}_patch{patch}_224", f"vit_{size}_patch16_224"]
        arch = next(a for a in candidates if _registered(a))
        if no_embed_class:
            kwargs["no_embed_class"] = True
        if reg:
            kwargs["reg_tokens"] = reg
    if dim != d_dim:
        kwargs["embed_dim"] = dim
    if depth != d_depth:
        kwargs["depth"] = depth
    if heads != d_heads:
        kwargs["num_heads"] = heads
    if int(dim * d_ratio) != fc1:
        kwargs["mlp_ratio"] = mlp_ratio
    if not qkv_bias:
        kwargs["qkv_bias"] = False
    if not has_cls:
        kwargs["class_token"] = False
    return ViTSpec(arch, img_size=grid * patch, patch_size=patch, in_chans=in_chans, model_kwargs=kwargs)


# ------------------------------------------------------------------------------ loading
def _pos_grid(pe: torch.Tensor, num_prefix: int) -> tuple[int, int]:
    g = _square(pe.shape[1] - num_prefix) or 0
    return (g, g)


def _as_checkpoint(source: str | Path | Checkpoint) -> Checkpoint:
    return source if isinstance(source, Checkpoint) else read_checkpoint(source)


def load_encoder(model: VisionTransformer, source: str | Path | Checkpoint, *, strict: bool = True,
                 check_only: bool = False) -> LoadReport:
    """Load a pretrained encoder (any layout) into ``model`` with the RETFound recipe.

    Delegates to :func:`~retflow.models.vit.load_encoder_weights` (drops decoder / source head,
    drops ``norm`` when the model pools with ``fc_norm``, interpolates ``pos_embed``, adapts
    ``in_chans``, re-initialises the head).  ``strict`` raises on missing encoder weights.
    """
    ck = _as_checkpoint(source)
    num_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    before = ck.state_dict.get("pos_embed")
    try:
        result = load_encoder_weights(model, ck.state_dict, strict_report=strict, check_only=check_only)
    except CheckpointError as exc:
        raise CheckpointError(f"{ck.path}: {exc}") from None
    resized = None
    if before is not None and model.pos_embed is not None and before.shape != model.pos_embed.shape:
        resized = (_pos_grid(before, num_prefix), tuple(model.patch_embed.grid_size))
    n_model = len(model.state_dict())
    dropped = list(ck.dropped) + list(result["dropped"])
    return LoadReport(
        path=ck.path, layout=ck.layout, loaded=n_model - len(result["missing"]),
        missing=len(result["missing"]), unexpected=len(result["unexpected"]), dropped=len(dropped),
        missing_keys=tuple(result["missing"]), unexpected_keys=tuple(result["unexpected"]),
        dropped_keys=tuple(dropped), pos_embed_resized=resized, notes=tuple(ck.notes),
    )


def _load_exact(model: VisionTransformer, ck: Checkpoint) -> LoadReport:
    sd = dict(ck.state_dict)
    resized = None
    pe = sd.get("pos_embed")
    if pe is not None and model.pos_embed is not None and pe.shape != model.pos_embed.shape:
        num_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        sd["pos_embed"] = interpolate_pos_embed(pe, tuple(model.patch_embed.grid_size), num_prefix)
        resized = (_pos_grid(pe, num_prefix), tuple(model.patch_embed.grid_size))
    target = model.state_dict()
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(target[k].shape)}"
           for k, v in sd.items() if k in target and v.shape != target[k].shape]
    if bad:
        raise CheckpointError(f"{ck.path}: weights do not fit the model ({'; '.join(bad[:5])})")
    result = model.load_state_dict(sd, strict=False)
    if result.missing_keys:
        raise CheckpointError(f"{ck.path}: missing {len(result.missing_keys)} weights: {result.missing_keys[:8]}")
    return LoadReport(
        path=ck.path, layout=ck.layout, loaded=len(target), missing=0,
        unexpected=len(result.unexpected_keys), dropped=len(ck.dropped),
        unexpected_keys=tuple(result.unexpected_keys), dropped_keys=tuple(ck.dropped),
        pos_embed_resized=resized, notes=tuple(ck.notes),
    )


def load_model(
    source: str | Path | Checkpoint,
    *,
    global_pool: str | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
    num_heads: int | None = None,
    spec: ViTSpec | None = None,
    strict: bool = True,
) -> LoadedModel:
    """Rebuild the model a checkpoint belongs to, in eval mode on CPU.

    * A fine-tuned retflow checkpoint (``best.pth`` or its export) -> the classifier, exactly
      (probe head included); ``global_pool``/``num_classes`` may not change it.
    * Anything else -> the encoder (``num_classes=0`` unless given: then a fresh head, RETFound
      recipe) with ``global_pool``: default the source's own pooling when known (a file with
      ``fc_norm`` and no ``norm`` pools ``"avg"``), else ``"token"`` (keeps the encoder's final
      norm, lossless); ``"avg"`` on a ``norm`` encoder is RETFound's mean pooling + fresh
      ``fc_norm`` (the final norm is dropped).

    The architecture comes from retflow metadata when present, else ``spec``, else
    :func:`infer_spec`.  ``img_size`` rebuilds at another size (``pos_embed`` interpolated); a
    DINOv2 file with DINOv2's 37x37 table is built at :data:`DINOV2_INPUT_SIZE` without it, never 518 px.
    """
    ck = _as_checkpoint(source)
    use_spec = spec or ck.spec or infer_spec(ck.state_dict, num_heads=num_heads, path=ck.path)
    if not (img_size or spec or ck.spec) and ck.layout in ("dinov2", "dinov2_teacher") \
            and use_spec.img_size == DINOV2_TABLE_SIZE:
        img_size = DINOV2_INPUT_SIZE  # never the 518 px its position table implies
        ck.notes.append(f"built at {img_size} px (DINOv2's training size; pass img_size for another)")
    if img_size and img_size != use_spec.img_size:
        use_spec = dataclasses.replace(use_spec, img_size=int(img_size))
    if ck.is_classifier:
        pool = ck.global_pool or "avg"
        if global_pool not in (None, pool):
            raise CheckpointError(f"{ck.path}: a fine-tuned classifier pools with '{pool}', not '{global_pool}'")
        n_cls = len(ck.classes)
        if num_classes not in (None, n_cls):
            raise CheckpointError(f"{ck.path}: a fine-tuned classifier with {n_cls} classes, not {num_classes}")
        model = create_vit(use_spec, num_classes=n_cls, global_pool=pool)
        if ck.probe_head:  # recorded by the checkpoint (an export holds the folded Linear head)
            attach_probe_head(model)
        report = _load_exact(model, ck)
        kind, classes = "classifier", ck.classes
    else:
        pool = global_pool or ck.global_pool or "token"
        model = create_vit(use_spec, num_classes=num_classes or 0, global_pool=pool)
        if ck.layout == "retflow_export" and not num_classes and pool == (ck.global_pool or "token"):
            report = _load_exact(model, ck)
        else:
            report = load_encoder(model, ck, strict=strict)
        kind, classes = "encoder", None
    model.eval()
    return LoadedModel(model=model, spec=use_spec, report=report, kind=kind, global_pool=pool,
                       classes=classes, normalize=ck.normalize, task=ck.task, meta=dict(ck.meta))

