"""Masked autoencoder (MAE, He et al. 2022) around a timm ViT encoder.

The encoder *is* a timm ``VisionTransformer`` (``self.encoder``) built by
:func:`~retflow.models.vit.create_vit` with ``num_classes=0`` and token
pooling, so ``self.encoder.state_dict()`` uses plain timm key names and loads
1:1 into a fine-tuning ViT (:func:`~retflow.models.vit.load_encoder_weights`).
Its ``pos_embed`` is the fixed 2-D sin-cos table (``requires_grad=False``).

DINOv2-family encoders work too (e.g. ``vit_small_patch14_reg4_dinov2``, patch 14, LayerScale,
SwiGLU): register tokens are prefix tokens like the class token -- never masked, always
prepended to the visible patches -- and a ``no_embed_class`` position table (positions for the
patches only, as timm's register models) gets a sin-cos table without the class row. The
decoder sees the class token and the patches (registers stay in the encoder).

Training semantics follow MAE: per-sample random masking by argsort of
uniform noise, the encoder sees only the visible patches plus the class
token (and any register tokens), a light decoder reconstructs every patch, and the loss is the MSE on
masked patches only (optionally against per-patch normalised pixels).

Patch vectors are laid out ``(row-in-patch, col-in-patch, channel)``, i.e.
channel fastest, as in MAE's ``patchify``.
"""
from __future__ import annotations

import torch
from torch import nn
from timm.layers import LayerNorm
from timm.models.vision_transformer import Block

from .pos_embed import get_2d_sincos_pos_embed
from .vit import ViTSpec, create_vit

__all__ = ["MAEObjective", "MaskedAutoencoderViT", "init_mae_module", "restore_tokens"]

_NORM_PIX_EPS = 1e-6


def init_mae_module(m: nn.Module) -> None:
    """MAE initialisation of one module: xavier-uniform Linear weights, zero biases, LayerNorm 1/0."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def restore_tokens(visible: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """MAE's unshuffle: the visible decoder tokens followed by mask tokens, put back in patch order."""
    b, n = ids_restore.shape
    fill = mask_token.to(visible.dtype).expand(b, n - visible.shape[1], -1)
    tokens = torch.cat([visible, fill], dim=1)
    return torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, visible.shape[-1]))


class MAEObjective:
    """MAE's loss for a model with ``patchify``, ``norm_pix_loss``, ``forward_encoder`` and
    ``forward_decoder`` (the 2-D MAE here, the 3-D one in :mod:`retflow.models.mae3d`)."""

    def _target(self, x: torch.Tensor):
        """Patchified float32 target, plus per-patch (mean, std) when ``norm_pix_loss``."""
        target = self.patchify(x).float()
        if not self.norm_pix_loss:
            return target, None, None
        mean = target.mean(dim=-1, keepdim=True)
        std = (target.var(dim=-1, keepdim=True) + _NORM_PIX_EPS) ** 0.5
        return (target - mean) / std, mean, std

    def forward_loss(self, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over masked patches only (computed in float32)."""
        target, _, _ = self._target(x)
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)

    def forward(self, x: torch.Tensor, mask_ratio: float):
        """Returns ``(loss, pred, mask)`` as in MAE."""
        latent, mask, ids_restore = self.forward_encoder(x, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(x, pred, mask), pred, mask


class MaskedAutoencoderViT(MAEObjective, nn.Module):
    """MAE with a timm ViT encoder and a small transformer decoder.

    ``forward(imgs, mask_ratio)`` returns ``(loss, pred, mask)``: ``pred`` is
    ``(B, L, patch_size**2 * in_chans)`` (normalised-pixel space when
    ``norm_pix_loss``), ``mask`` is ``(B, L)`` with 1 for masked patches.
    The decoder's size and ``norm_pix_loss`` are settings (``pretrain.decoder``,
    ``pretrain.norm_pix_loss``; the MAE paper's 512 wide, 8 deep, 16 heads are the schema's defaults).
    """

    def __init__(
        self,
        spec: ViTSpec,
        decoder_embed_dim: int,
        decoder_depth: int,
        decoder_num_heads: int,
        norm_pix_loss: bool,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.norm_pix_loss = norm_pix_loss
        self.encoder = create_vit(spec, num_classes=0, global_pool="token")
        enc = self.encoder
        if enc.cls_token is None or enc.pos_embed is None:
            raise ValueError("MAE needs a ViT with a class token and a position embedding")
        if getattr(enc, "dynamic_img_size", False):
            raise ValueError("MAE does not support dynamic_img_size encoders")
        self.patch_size = spec.patch_size
        self.in_chans = spec.in_chans
        self.grid_size = spec.img_size // spec.patch_size
        self.num_patches = self.grid_size**2
        self.num_prefix = enc.num_prefix_tokens  # class token + registers
        self.pos_prefix = 0 if enc.no_embed_class else self.num_prefix  # prefix rows of pos_embed
        embed_dim = enc.embed_dim
        mlp_ratio = enc.blocks[0].mlp.fc2.in_features / embed_dim  # hidden width (a SwiGLU fc1 is 2x it)

        enc.pos_embed = nn.Parameter(torch.zeros(1, self.pos_prefix + self.num_patches, embed_dim),
                                     requires_grad=False)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, self.num_patches + 1, decoder_embed_dim), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, spec.patch_size**2 * spec.in_chans)
        self.initialize_weights()

    # ------------------------------------------------------------------ init
    def initialize_weights(self) -> None:
        """MAE initialisation: sin-cos tables, xavier Linear/patch conv, LN 1/0, tokens N(0, .02)."""
        enc = self.encoder
        with torch.no_grad():
            table = torch.from_numpy(get_2d_sincos_pos_embed(enc.embed_dim, self.grid_size))
            enc.pos_embed.zero_()  # prefix rows (class, registers) stay zero, as MAE's class row
            enc.pos_embed[0, self.pos_prefix:].copy_(table)
            self.decoder_pos_embed.copy_(
                torch.from_numpy(
                    get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], self.grid_size, cls_token=True)
                )[None]
            )
        w = enc.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.normal_(enc.cls_token, std=0.02)
        if enc.reg_token is not None:
            nn.init.normal_(enc.reg_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_mae_module)

    # --------------------------------------------------------------- helpers
    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """Encoder weights in plain timm ViT naming (``encoder.`` prefix stripped), detached CPU copies."""
        return {k: v.detach().cpu().clone() for k, v in self.encoder.state_dict().items()}

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, L, p*p*C)``."""
        b, c, h, w = imgs.shape
        p = self.patch_size
        if c != self.in_chans or h % p or w % p:
            raise ValueError(f"cannot patchify {tuple(imgs.shape)} with patch {p}, in_chans {self.in_chans}")
        x = imgs.reshape(b, c, h // p, p, w // p, p)
        x = x.permute(0, 2, 4, 3, 5, 1)  # b, gh, gw, p, p, c
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, p*p*C)`` -> ``(B, C, H, W)`` for a square grid."""
        b, n, _ = x.shape
        p, c = self.patch_size, self.in_chans
        g = int(round(n**0.5))
        if g * g != n:
            raise ValueError(f"{n} patches do not form a square grid")
        x = x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)  # b, c, gh, p, gw, p
        return x.reshape(b, c, g * p, g * p)

    @staticmethod
    def random_masking(x: torch.Tensor, mask_ratio: float):
        """Keep a random ``1 - mask_ratio`` share of tokens per sample.

        Returns ``(x_visible (B, K, D), mask (B, L) 1=masked, ids_restore (B, L))``.
        ``K = int(L * (1 - mask_ratio))`` (with a 1e-6 guard against float
        round-off such as ``1 - 0.8 = 0.19999...``).
        """
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        b, n, d = x.shape
        keep = int(n * (1.0 - mask_ratio) + 1e-6)
        noise = torch.rand(b, n, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        mask = torch.ones(b, n, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_visible, mask, ids_restore

    # --------------------------------------------------------------- forward
    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float):
        """Embed, mask, and run ``encoder.blocks`` + ``encoder.norm`` on the prefix tokens (class,
        registers: never masked) + the visible patches; returns ``(latent (B, prefix + K, D), mask,
        ids_restore)``."""
        enc = self.encoder
        x = enc.patch_embed(imgs) + enc.pos_embed[:, self.pos_prefix:]
        x, mask, ids_restore = self.random_masking(x, mask_ratio)
        prefix = torch.cat([enc.cls_token] + ([enc.reg_token] if enc.reg_token is not None else []), dim=1)
        if self.pos_prefix:
            prefix = prefix + enc.pos_embed[:, :self.pos_prefix]
        x = torch.cat([prefix.expand(x.shape[0], -1, -1), x], dim=1)
        x = enc.norm(enc.blocks(enc.norm_pre(x)))
        return x, mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Insert mask tokens, unshuffle, decode; returns ``(B, L, p*p*C)`` without the cls token
        (register tokens are not decoded)."""
        x = self.decoder_embed(latent)
        tokens = restore_tokens(x[:, self.num_prefix:], self.mask_token, ids_restore)
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, mask_ratio: float):
        """For figures: ``(masked_input, reconstruction)`` images shaped like ``imgs``.

        ``masked_input`` has masked patches zeroed; ``reconstruction`` shows
        the prediction on masked patches (mapped back to pixel space with each
        target patch's mean/std when ``norm_pix_loss``) and the original
        pixels on visible patches.  Runs in eval mode, restoring the mode after.
        """
        was_training = self.training
        self.eval()
        try:
            _, pred, mask = self.forward(imgs, mask_ratio)
        finally:
            self.train(was_training)
        patches = self.patchify(imgs).float()
        _, mean, std = self._target(imgs)
        pred = pred.float()
        if self.norm_pix_loss:
            pred = pred * std + mean
        m = mask.unsqueeze(-1)
        masked_input = self.unpatchify(patches * (1 - m)).to(imgs.dtype)
        recon = self.unpatchify(patches * (1 - m) + pred * m).to(imgs.dtype)
        return masked_input, recon
