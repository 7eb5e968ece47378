"""Model construction: timm ViT encoders/classifiers, the MAE pretraining model, lr-decay groups."""
from .lr_decay import param_groups_lrd, param_groups_weight_decay
from .mae import MaskedAutoencoderViT
from .pos_embed import get_2d_sincos_pos_embed, interpolate_pos_embed
from .vit import ViTSpec, create_vit, load_checkpoint_file, load_encoder_weights

__all__ = [
    "ViTSpec",
    "create_vit",
    "load_encoder_weights",
    "load_checkpoint_file",
    "MaskedAutoencoderViT",
    "get_2d_sincos_pos_embed",
    "interpolate_pos_embed",
    "param_groups_lrd",
    "param_groups_weight_decay",
]
