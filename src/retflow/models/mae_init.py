"""Start MAE pretraining from an existing checkpoint file (ImageNet-MAE, RETFound, our own).

Accepted layouts (all read by :func:`~retflow.models.vit.load_checkpoint_file`, i.e. the one
checkpoint reader :func:`retflow.checkpoint_file.read_file`: ``weights_only=True``, a refused
pickle names the file and the global):

- encoder only, timm ``vit_*_patch16_224`` / MAE ``mae_pretrain_vit_*.pth`` names
  (``patch_embed.*``, ``blocks.*``, ``norm.*``, ``cls_token``, ``pos_embed``): the decoder
  starts fresh;
- the full MAE state of facebookresearch/mae ``models_mae`` (encoder names as above plus
  ``decoder_embed``, ``mask_token``, ``decoder_pos_embed``, ``decoder_blocks.*``,
  ``decoder_norm``, ``decoder_pred``), e.g. ``mae_visualize_vit_large.pth`` or a RETFound
  checkpoint ``{'model': state}`` - domain-adaptive pretraining continues the decoder too;
- retflow's own ``checkpoint.pth`` (encoder under ``encoder.``);
- a ``retflow export`` folder (``config.json`` + ``model.safetensors``) of an encoder: the
  decoder starts fresh.

Position embeddings are interpolated to this model's patch grid (encoder and decoder), the patch
projection is adapted to ``in_chans`` (RGB checkpoint -> 1-channel OCT), and the decoder's pixel
head is left fresh when the patch vector length differs (it predicts ``p*p*in_chans`` values).
"""
from __future__ import annotations

from pathlib import Path

import torch

from retflow.checkpoint_file import CheckpointError

from .pos_embed import interpolate_pos_embed
from .vit import load_checkpoint_file, load_encoder_weights, strip_prefixes

__all__ = ["init_mae_from_checkpoint"]

_DECODER_PREFIXES = ("decoder_", "mask_token")


def init_mae_from_checkpoint(model, path: str | Path) -> dict[str, int | list[str]]:
    """Load ``path`` into ``model`` (a :class:`~retflow.models.mae.MaskedAutoencoderViT`).

    Returns counts ``encoder`` / ``decoder`` (tensors loaded) and ``fresh`` (decoder tensors that
    kept their initialisation: absent from the file or of another shape). A file that holds no
    transformer-block weights raises ``ValueError`` naming the file.
    """
    state = load_checkpoint_file(path)
    stripped = {strip_prefixes(k, ("module.",)): v for k, v in state.items()}
    encoder_sd = {k: v for k, v in stripped.items() if not k.startswith(_DECODER_PREFIXES)}
    try:
        load_encoder_weights(model.encoder, encoder_sd, strict_report=True)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    target = model.state_dict()
    decoder_keys = [k for k in target if k.startswith(_DECODER_PREFIXES)]
    loaded: dict[str, torch.Tensor] = {}
    for key in decoder_keys:
        value = stripped.get(key)
        if value is None:
            continue
        if key == "decoder_pos_embed" and value.shape != target[key].shape and value.shape[-1] == target[key].shape[-1]:
            value = interpolate_pos_embed(value, model.grid_size, num_prefix=1)
        if value.shape == target[key].shape:
            loaded[key] = value
    model.load_state_dict(loaded, strict=False)
    return {"encoder": len(model.encoder.state_dict()), "decoder": len(loaded),
            "fresh": sorted(k for k in decoder_keys if k not in loaded)}
