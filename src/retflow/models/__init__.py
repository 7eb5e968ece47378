"""Model construction: timm ViT encoders/classifiers, the MAE pretraining model, lr-decay groups,
checkpoint layouts (RETFound, MAE, DINOv2, timm, retflow) and export to safetensors + timm config."""
from .checkpoint_layouts import (
    LAYOUTS,
    CheckpointError,
    LoadedModel,
    LoadReport,
    detect_layout,
    infer_spec,
    load_encoder,
    load_model,
    read_checkpoint,
)
from .export import export_checkpoint, export_model, timm_create_kwargs
from .lr_decay import param_groups_lrd, param_groups_weight_decay
from .mae import MaskedAutoencoderViT
from .pos_embed import get_2d_sincos_pos_embed, interpolate_pos_embed
from .vit import ViTSpec, attach_probe_head, create_vit, load_checkpoint_file, load_encoder_weights

__all__ = [
    "ViTSpec",
    "create_vit",
    "attach_probe_head",
    "load_encoder_weights",
    "load_checkpoint_file",
    "MaskedAutoencoderViT",
    "get_2d_sincos_pos_embed",
    "interpolate_pos_embed",
    "param_groups_lrd",
    "param_groups_weight_decay",
    "LAYOUTS",
    "CheckpointError",
    "LoadReport",
    "LoadedModel",
    "detect_layout",
    "infer_spec",
    "read_checkpoint",
    "load_encoder",
    "load_model",
    "export_model",
    "export_checkpoint",
    "timm_create_kwargs",
]
