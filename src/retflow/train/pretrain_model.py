"""The model a pretraining run trains, and what its final checkpoint keeps.

``s.method == "mae"`` builds :class:`~retflow.models.mae.MaskedAutoencoderViT`, ``"mae3d"``
:class:`~retflow.models.mae3d.MaskedAutoencoderViT3D` (whole OCT volumes; random initial weights); the
other methods come from :mod:`retflow.models.ssl`. ``init`` (a local file) starts MAE from ImageNet-MAE / RETFound /
our own weights (encoder, and decoder when the file has one; see :mod:`retflow.models.mae_init`)
and the other methods' student encoder from any layout ``load_encoder`` reads.
"""
from __future__ import annotations

from retflow.models.mae import MaskedAutoencoderViT
from retflow.models.mae3d import MaskedAutoencoderViT3D
from retflow.models.mae_init import init_mae_from_checkpoint
from retflow.models.checkpoint_layouts import load_encoder
from retflow.settings.stages import PretrainSettings


def build_model(s: PretrainSettings, log=None):
    if s.method == "mae3d":  # whole volumes: the 3-D ViT (vit3d), from random weights
        d = s.mae3d.decoder
        return MaskedAutoencoderViT3D(s.vit3d.spec(), decoder_embed_dim=d.embed_dim, decoder_depth=d.depth,
                                      decoder_num_heads=d.num_heads, norm_pix_loss=s.mae3d.norm_pix_loss)
    spec = s.vit.spec()
    if s.method == "mae":
        model = MaskedAutoencoderViT(spec, decoder_embed_dim=s.decoder.embed_dim, decoder_depth=s.decoder.depth,
                                     decoder_num_heads=s.decoder.num_heads, norm_pix_loss=s.norm_pix_loss)
        if s.init:
            report = init_mae_from_checkpoint(model, s.init)
            if log:
                log(f"initialised from {s.init}: {report['encoder']} encoder + {report['decoder']} decoder "
                    f"tensors; fresh: {', '.join(report['fresh']) or 'none'}")
        return model
    from retflow.models.ssl import build_ssl

    # token_recon: its teacher_checkpoint is a file (retflow.settings.build resolves a method name)
    model = build_ssl(s.method, spec, s.method_settings)
    if s.init:
        load_encoder(model.encoder, s.init)  # any layout; a problem names the file
        for name in ("teacher_encoder", "momentum_encoder"):  # EMA teachers start as the student
            if hasattr(model, name):
                getattr(model, name).load_state_dict(model.encoder.state_dict())
        if log:
            log(f"initialised the {s.method} encoder from {s.init}")
    return model


def export_state(model) -> dict:
    """What ``checkpoint.pth['model']`` holds: MAE's (and the 3-D MAE's) full state (RETFound layout); for the other
    methods the encoder used downstream, under ``encoder.``."""
    if isinstance(model, (MaskedAutoencoderViT, MaskedAutoencoderViT3D)):
        return model.state_dict()
    # DINO is evaluated with its teacher backbone (Caron et al. 2021); the others with the student
    state = model.teacher_encoder_state_dict() if hasattr(model, "teacher_encoder_state_dict") else \
        model.encoder_state_dict()
    return {f"encoder.{k}": v.detach().cpu().clone() for k, v in state.items()}
