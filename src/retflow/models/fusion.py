"""Late fusion of a CFP and an OCT ViT encoder: pooled embeddings concatenated -> BatchNorm + Linear.

Each encoder is a timm ViT built by :func:`retflow.models.vit.create_vit` with ``num_classes=0``
(its pooled embedding: the mean patch token + ``fc_norm`` for ``pool: avg``, the class token
after the final norm for ``pool: token``), loaded from its modality's pretraining checkpoint
(:func:`retflow.models.checkpoint_layouts.load_encoder`, any layout) or left random.
``encoders: frozen`` trains the head only (encoders in eval mode, no gradients; RETFound's
linear-probe idea on both modalities); ``finetune`` trains all of it, each encoder with
layer-wise lr decay (:func:`retflow.models.lr_decay.param_groups_lrd`) and drop path.

The head standardises the concatenated embedding per feature with a BatchNorm without affine
parameters, as MAE's and RETFound's linear probe do: MAE features differ in scale by orders of
magnitude, and the two encoders' by more. A LayerNorm there (per eye, across features) left the
fusion at AUROC 0.61-0.65 on the showcase's refer task while each modality alone fine-tuned to
0.75 (CFP) and 0.85 (OCT); with the BatchNorm the same fusion fine-tune reached 0.84 on validation
by its fifth epoch (frozen encoders: 0.81 on test vs 0.69).
"""

from __future__ import annotations

import torch
from torch import nn

from retflow.models.checkpoint_layouts import load_encoder
from retflow.models.lr_decay import param_groups_lrd
from retflow.models.vit import ViTSpec, create_vit

__all__ = ["ENCODER_MODES", "FusionModel", "build_fusion", "fusion_param_groups"]

ENCODER_MODES = ("frozen", "finetune")
MODALITIES = ("cfp", "oct")


class FusionModel(nn.Module):
    """``forward(x)`` -> logits, ``x`` one eye's CFP and OCT inputs stacked along the channels
    (``cfp.in_chans`` first; both at the ViT's ``img_size``), so the single-input training engine
    (:func:`retflow.train.engine_finetune.train_one_epoch`) drives it unchanged; ``pair(cfp, oct)``
    the same on two tensors; ``embed(cfp, oct)`` the concatenated embedding."""

    def __init__(self, cfp: nn.Module, oct: nn.Module, n_out: int, frozen: bool):
        super().__init__()
        self.cfp, self.oct = cfp, oct
        self.cfp_chans = cfp.patch_embed.proj.in_channels
        dim = cfp.num_features + oct.num_features
        self.head_norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)  # MAE's linear-probe head norm
        self.head = nn.Linear(dim, n_out)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # as timm / RETFound initialise a fine-tuning head
        nn.init.zeros_(self.head.bias)
        self.frozen = frozen
        if frozen:
            for p in [*cfp.parameters(), *oct.parameters()]:
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:  # frozen encoders stay in eval mode (no dropout / drop path)
            self.cfp.eval()
            self.oct.eval()
        return self

    def embed(self, cfp: torch.Tensor, oct: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return torch.cat([self.cfp(cfp), self.oct(oct)], dim=1)

    def pair(self, cfp: torch.Tensor, oct: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_norm(self.embed(cfp, oct)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pair(x[:, : self.cfp_chans], x[:, self.cfp_chans :])


def build_fusion(specs: dict[str, ViTSpec], n_out: int, encoders: str, pool: str = "avg",
                 drop_path: float = 0.0, init: dict[str, str | None] | None = None) -> FusionModel:
    """The fusion model: one encoder per modality (``specs``), each loaded from ``init[modality]``
    (a checkpoint path; None or absent: random), drop path only when fine-tuned."""
    if encoders not in ENCODER_MODES:
        raise ValueError(f"encoders must be one of {ENCODER_MODES}, got {encoders!r}")
    if specs["cfp"].img_size != specs["oct"].img_size:
        raise ValueError(f"the two encoders take one input size, got cfp {specs['cfp'].img_size} "
                         f"and oct {specs['oct'].img_size}")
    init = init or {}
    nets = {}
    for m in MODALITIES:
        net = create_vit(specs[m], num_classes=0, drop_path_rate=drop_path if encoders == "finetune" else 0.0,
                         global_pool=pool)
        if init.get(m):
            report = load_encoder(net, init[m])
            print(f"{m} encoder from {init[m]}: {report.summary()}", flush=True)
        nets[m] = net
    return FusionModel(nets["cfp"], nets["oct"], n_out, frozen=encoders == "frozen")


def fusion_param_groups(model: FusionModel, weight_decay: float, layer_decay: float) -> list[dict]:
    """Optimizer groups: the head (Linear, lr scale 1, no decay on its bias) and,
    when the encoders train, each encoder's layer-wise lr-decay groups (its last layer at scale 1)."""
    groups = [{"params": [model.head.bias], "weight_decay": 0.0, "lr_scale": 1.0},
              {"params": [model.head.weight], "weight_decay": weight_decay, "lr_scale": 1.0}]
    if not model.frozen:
        for net in (model.cfp, model.oct):
            groups += param_groups_lrd(net, weight_decay, net.no_weight_decay(), layer_decay)
    return groups
