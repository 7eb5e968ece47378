"""3-D masked autoencoder over tubelets (OCT volumes) and the 3-D ViT encoder it trains.

Written like :mod:`retflow.models.mae` (facebookresearch/mae): a tubelet embedding with a
``Conv3d``'s parameters (kernel = stride = ``tubelet`` ``(t, p, p)``, computed as a matmul), timm ``Block`` s (fused SDPA attention), a fixed 3-D
sin-cos position table (:func:`~retflow.models.pos_embed.get_3d_sincos_pos_embed`), per-sample
random masking by argsort of uniform noise, a light decoder and the MSE on masked tubelets only
(optionally against per-tubelet normalised voxels, ``norm_pix_loss``). Input volumes are
``(B, C, D, H, W)``; tubelet vectors are laid out ``(t, p, p, C)`` (channel fastest), tubelets in
raster order (depth slowest), as the ``Conv3d`` embedding flattens them.

:class:`MaskedAutoencoderViT3D` has the 2-D MAE's interface (``forward(vols, mask_ratio) -> (loss,
pred, mask)``, ``forward_encoder`` / ``forward_decoder`` / ``forward_loss``, ``patchify`` /
``unpatchify``, ``random_masking``, ``reconstruct``, ``encoder_state_dict``) so the pretraining loop
drives it unchanged. Its encoder ``self.encoder`` is a :class:`VisionTransformer3D` (timm's names:
``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.i``, ``norm``, ``fc_norm``, ``head``),
so ``state_dict()`` keys are ``encoder.*`` + ``decoder_*`` + ``mask_token`` like RETFound's layout,
and :func:`vit3d` builds the fine-tuning model that :meth:`VisionTransformer3D.load_encoder_from_mae`
fills from them (RETFound recipe: decoder dropped, ``norm`` dropped when pooling with ``fc_norm``,
head re-initialised; ``pos_embed`` trilinearly resized when the fine-tune grid differs).

Why not MONAI's ``MaskedAutoEncoderViT`` (measured, see ``bench/bench_mae3d_step.py``): it has no
loss, no ``norm_pix_loss``, no encoder/decoder split and no patchify; it masks with
``torch.multinomial`` on a CPU tensor (a host round trip per step on a GPU) and without
``ids_restore``; its attention is explicit (no SDPA); its 3-D sin-cos needs widths divisible by 6
(the demo decoder's 64, MAE's 512-wide decoder and ViT-L's 1024 are refused); and its keys (``patch_embedding.*``, ``blocks.N`` = the final
norm) fit neither timm nor MONAI's own ``ViT``.

The settings checks (:func:`~retflow.settings.checks.vit3d_errors`, ``width_errors``,
``mask_ratio_errors``) live in :mod:`retflow.settings.checks` (plain Python, run at startup too)
and name the config keys (``vit3d.*``, ``pretrain.mae3d.mask_ratio``); they are re-exported here.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import LayerNorm, trunc_normal_
from timm.models.vision_transformer import Block

from retflow.settings.checks import mask_ratio_errors, vit3d_errors, width_errors

from .mae import MAEObjective, init_mae_module, restore_tokens
from .pos_embed import get_3d_sincos_pos_embed, interpolate_pos_embed_3d

__all__ = ["ViT3DSpec", "VisionTransformer3D", "MaskedAutoencoderViT3D", "PatchEmbed3D", "vit3d",
           "vit3d_errors", "width_errors", "mask_ratio_errors",
           "patchify_3d", "unpatchify_3d"]

_STRIP_PREFIXES = ("module.", "encoder.", "backbone.")


def _x(size: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in size)


# ------------------------------------------------------------------ checks (torch-free, retflow.settings.checks)
def _raise(errors: list[str]) -> None:
    if errors:
        from retflow.settings.load import ConfigError

        raise ConfigError(errors)


# ------------------------------------------------------------------ spec
@dataclasses.dataclass
class ViT3DSpec:
    """Architecture of a 3-D ViT: volume ``img_size`` and ``tubelet`` as ``(depth, height, width)``."""

    img_size: tuple[int, int, int]
    tubelet: tuple[int, int, int]
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float

    def __post_init__(self) -> None:
        _raise(vit3d_errors(tuple(self.img_size), tuple(self.tubelet), self.embed_dim, self.num_heads))
        self.img_size = tuple(int(s) for s in self.img_size)
        self.tubelet = tuple(int(s) for s in self.tubelet)

    @property
    def grid_size(self) -> tuple[int, int, int]:
        return tuple(s // t for s, t in zip(self.img_size, self.tubelet))

    @property
    def num_patches(self) -> int:
        return math.prod(self.grid_size)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ViT3DSpec:
        """From a config mapping (e.g. the ``vit3d`` section); unknown keys raise ``ValueError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ViT3DSpec keys {unknown}; allowed: {sorted(names)}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


# ------------------------------------------------------------------ encoder
def patchify_3d(vols: torch.Tensor, tubelet: Sequence[int]) -> torch.Tensor:
    """``(B, C, D, H, W)`` -> ``(B, L, t*p*p*C)``: tubelets in raster order, voxels ``(t, p, p, C)``."""
    b, c, d, h, w = vols.shape
    t, ph, pw = tubelet
    x = vols.reshape(b, c, d // t, t, h // ph, ph, w // pw, pw).permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(b, (d // t) * (h // ph) * (w // pw), t * ph * pw * c)


def unpatchify_3d(x: torch.Tensor, tubelet: Sequence[int], grid: Sequence[int], in_chans: int) -> torch.Tensor:
    """``(B, L, t*p*p*C)`` -> ``(B, C, D, H, W)`` for a ``(d, h, w)`` tubelet ``grid``."""
    (t, ph, pw), (gd, gh, gw), c = tubelet, grid, in_chans
    b, n, k = x.shape
    if n != gd * gh * gw or k != t * ph * pw * c:
        raise ValueError(f"cannot unpatchify {tuple(x.shape)}: expected (B, {gd * gh * gw}, {t * ph * pw * c})")
    x = x.reshape(b, gd, gh, gw, t, ph, pw, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, c, gd * t, gh * ph, gw * pw)


class PatchEmbed3D(nn.Module):
    """``(B, C, D, H, W)`` -> ``(B, L, embed_dim)``: a ``Conv3d`` with kernel = stride = tubelet.

    The parameters are the ``Conv3d``'s (``proj.weight`` ``(E, C, t, p, p)``, the layout of
    timm-style / VideoMAE tubelet checkpoints), but the product is computed as a matrix multiply
    of the tubelet vectors (:meth:`embed`): the same numbers, 5x faster than ``Conv3d``'s CPU
    backward at the demo size, and the MAE can embed its visible tubelets only.
    """

    def __init__(self, img_size: tuple[int, int, int], tubelet: tuple[int, int, int], in_chans: int,
                 embed_dim: int) -> None:
        super().__init__()
        self.img_size, self.tubelet = tuple(img_size), tuple(tubelet)
        self.in_chans = in_chans
        self.grid_size = tuple(s // t for s, t in zip(img_size, tubelet))
        self.num_patches = math.prod(self.grid_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=tubelet, stride=tubelet)

    def check(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_chans or tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"expected volumes (B, {self.in_chans}, {', '.join(map(str, self.img_size))}) for "
                             f"this 3-D ViT, got {tuple(x.shape)}; resample them to vit3d.img_size {_x(self.img_size)}")

    def embed(self, patches: torch.Tensor) -> torch.Tensor:
        """``(B, N, t*p*p*C)`` tubelet vectors (:func:`patchify_3d`) -> ``(B, N, embed_dim)``."""
        w = self.proj.weight
        # one channel: (t, p, p, C) order is the weight's own, and a plain flatten keeps its gradient's
        # strides standard (a permuted view's are not, which DDP's gradient buckets warn about)
        w = w.flatten(1) if w.shape[1] == 1 else w.permute(0, 2, 3, 4, 1).reshape(w.shape[0], -1)
        return F.linear(patches, w, self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        return self.embed(patchify_3d(x, self.tubelet))


def _gather(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` (B, K) of ``x`` (B, L, D) per sample."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class VisionTransformer3D(nn.Module):
    """A ViT over tubelets with timm's parameter names and feature API.

    ``forward_features(x)`` -> ``(B, 1 + L, embed_dim)`` tokens (class token first, after ``norm``);
    ``forward_head(tokens, pre_logits)`` pools: ``global_pool="avg"`` = mean of the patch tokens +
    ``fc_norm`` (``norm`` is then Identity, RETFound), ``"token"`` = the class token after ``norm``.
    """

    def __init__(self, spec: ViT3DSpec, num_classes: int, global_pool: str, drop_path_rate: float) -> None:
        super().__init__()
        if global_pool not in ("avg", "token"):
            raise ValueError(f"global_pool must be 'avg' or 'token', got {global_pool!r}")
        self.spec = spec
        self.global_pool = global_pool
        self.num_prefix_tokens = 1
        self.embed_dim = self.num_features = spec.embed_dim
        e = spec.embed_dim
        self.patch_embed = PatchEmbed3D(spec.img_size, spec.tubelet, spec.in_chans, e)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, e))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + spec.num_patches, e))
        # stochastic depth rising linearly over the blocks (plain floats: the model builds on the meta device)
        dpr = [drop_path_rate * i / max(spec.depth - 1, 1) for i in range(spec.depth)]
        self.blocks = nn.Sequential(*(
            Block(e, spec.num_heads, mlp_ratio=spec.mlp_ratio, qkv_bias=True, drop_path=dpr[i], norm_layer=LayerNorm)
            for i in range(spec.depth)))
        use_fc_norm = global_pool == "avg"
        self.norm = nn.Identity() if use_fc_norm else LayerNorm(e)
        self.fc_norm = LayerNorm(e) if use_fc_norm else nn.Identity()
        self.head = nn.Linear(e, num_classes) if num_classes else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        with torch.no_grad():
            self.pos_embed.copy_(torch.from_numpy(
                get_3d_sincos_pos_embed(self.embed_dim, self.patch_embed.grid_size, cls_token=True))[None])
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        self.apply(init_mae_module)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=2e-5)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return self.norm(self.blocks(torch.cat([cls, x], dim=1)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 1:].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # ------------------------------------------------------------ loading
    def load_encoder_from_mae(self, state_dict: Mapping[str, torch.Tensor],
                              src_grid: Sequence[int] | None = None) -> dict[str, list[str]]:
        """Load a 3-D MAE's encoder (``MaskedAutoencoderViT3D.state_dict()``, its
        ``encoder_state_dict()`` or either with ``module.`` / ``encoder.`` / ``backbone.`` prefixes).

        RETFound recipe: decoder keys and any ``head.*`` dropped, ``norm.*`` dropped when pooling
        with ``fc_norm``, the head re-initialised (trunc-normal std 2e-5, bias 0). A ``pos_embed``
        of another grid is trilinearly resized: from ``src_grid`` when given, else from the grid
        with this model's height x width and the depth the token count implies. Problems raise
        :class:`~retflow.checkpoint_file.CheckpointError` in one line (the caller adds the file).
        Returns ``{"missing", "unexpected", "dropped"}`` key lists.
        """
        from retflow.checkpoint_file import CheckpointError

        from .vit import strip_prefixes

        uses_fc_norm = isinstance(self.norm, nn.Identity)
        target = self.state_dict()
        sd, dropped = {}, []
        for raw, value in state_dict.items():
            k = strip_prefixes(raw, _STRIP_PREFIXES)
            if k.startswith(("decoder_", "decoder.", "head.")) or k == "mask_token" or \
                    (uses_fc_norm and k.startswith("norm.")):
                dropped.append(k)
            else:
                sd[k] = value
        w = sd.get("patch_embed.proj.weight")
        want = target["patch_embed.proj.weight"]
        if w is not None and w.shape[1:] != want.shape[1:]:
            raise CheckpointError(
                f"has {w.shape[1]} input channel(s) and tubelet {_x(w.shape[2:])} but the configured 3-D ViT has "
                f"{want.shape[1]} and {_x(want.shape[2:])}; set vit3d.in_chans / vit3d.tubelet to the checkpoint's")
        pe = sd.get("pos_embed")
        if pe is not None and pe.ndim == 3 and pe.shape[-1] == self.embed_dim and pe.shape != self.pos_embed.shape:
            new, n_old = self.patch_embed.grid_size, pe.shape[1] - 1
            plane = new[1] * new[2]
            if src_grid is not None and math.prod(src_grid) != n_old:
                raise CheckpointError(f"has {n_old} tubelet positions, not the {math.prod(src_grid)} of the given "
                                      f"pretraining grid {_x(src_grid)}; pass the grid it was pretrained with")
            if src_grid is None and n_old % plane:
                raise CheckpointError(
                    f"has {n_old} tubelet positions, which no depth of the configured {new[1]}x{new[2]} in-plane "
                    f"tubelet grid gives (configured grid {_x(new)} = {math.prod(new)}); set vit3d.img_size height "
                    f"and width to the pretraining's (only the depth may differ)")
            old = tuple(src_grid) if src_grid is not None else (n_old // plane, new[1], new[2])
            sd["pos_embed"] = interpolate_pos_embed_3d(pe, old, new, num_prefix=1)
        bad = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in sd.items()
               if k in target and v.shape != target[k].shape]
        if bad:
            raise CheckpointError(
                f"does not fit the configured 3-D ViT: {len(bad)} tensor(s) differ in shape (checkpoint vs model), "
                f"e.g. {'; '.join(bad[:3])}; set vit3d embed_dim/depth/num_heads to the checkpoint's")
        missing = [k for k in target if k not in sd and not k.startswith(("head.", "fc_norm."))]
        if missing:
            shown = ", ".join(missing[:6]) + (f", ... (+{len(missing) - 6} more)" if len(missing) > 6 else "")
            raise CheckpointError(f"is missing {len(missing)} encoder weight(s) of the configured 3-D ViT: {shown}")
        result = self.load_state_dict(sd, strict=False)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=2e-5)
            nn.init.zeros_(self.head.bias)
        return {"missing": sorted(result.missing_keys), "unexpected": sorted(result.unexpected_keys),
                "dropped": sorted(dropped)}


def vit3d(spec: ViT3DSpec, num_classes: int, global_pool: str = "avg", drop_path_rate: float = 0.0
          ) -> VisionTransformer3D:
    """The fine-tuning / probing 3-D ViT (``num_classes=0``: ``head`` is Identity), as
    :func:`~retflow.models.vit.create_vit` is for 2-D; fill it with ``load_encoder_from_mae``."""
    return VisionTransformer3D(spec, num_classes, global_pool, drop_path_rate)


# ------------------------------------------------------------------ MAE
class MaskedAutoencoderViT3D(MAEObjective, nn.Module):
    """MAE over tubelets with a :class:`VisionTransformer3D` encoder and a small decoder.

    ``forward(vols, mask_ratio)`` returns ``(loss, pred, mask)``: ``pred`` is
    ``(B, L, t*p*p*C)`` (normalised-voxel space when ``norm_pix_loss``), ``mask`` ``(B, L)`` with 1
    for masked tubelets.
    """

    def __init__(self, spec: ViT3DSpec, decoder_embed_dim: int, decoder_depth: int, decoder_num_heads: int,
                 norm_pix_loss: bool) -> None:
        super().__init__()
        _raise(width_errors(decoder_embed_dim, decoder_num_heads, "pretrain.mae3d.decoder"))
        self.spec = spec
        self.norm_pix_loss = norm_pix_loss
        self.encoder = VisionTransformer3D(spec, num_classes=0, global_pool="token", drop_path_rate=0.0)
        self.encoder.pos_embed.requires_grad_(False)
        self.tubelet = spec.tubelet
        self.in_chans = spec.in_chans
        self.grid_size = spec.grid_size
        self.num_patches = spec.num_patches
        self.decoder_embed = nn.Linear(spec.embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio=spec.mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
            for _ in range(decoder_depth))
        self.decoder_norm = LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, math.prod(spec.tubelet) * spec.in_chans)
        with torch.no_grad():
            self.decoder_pos_embed.copy_(torch.from_numpy(
                get_3d_sincos_pos_embed(decoder_embed_dim, self.grid_size, cls_token=True))[None])
        nn.init.normal_(self.mask_token, std=0.02)
        for m in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            m.apply(init_mae_module)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """Encoder weights under the fine-tune model's names (``encoder.`` stripped), detached CPU copies."""
        return {k: v.detach().cpu().clone() for k, v in self.encoder.state_dict().items()}

    # ------------------------------------------------------------ tubelets
    def patchify(self, vols: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W)`` -> ``(B, L, t*p*p*C)``."""
        self.encoder.patch_embed.check(vols)
        return patchify_3d(vols, self.tubelet)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, t*p*p*C)`` -> ``(B, C, D, H, W)``."""
        return unpatchify_3d(x, self.tubelet, self.grid_size, self.in_chans)

    @staticmethod
    def masking_ids(b: int, n: int, mask_ratio: float, device):
        """MAE's per-sample random masking as indices: ``(ids_keep (B, K), mask (B, L) 1=masked,
        ids_restore (B, L))``, ``K = int(L * (1 - mask_ratio))`` (argsort of uniform noise)."""
        _raise(mask_ratio_errors(mask_ratio, n))
        keep = int(n * (1.0 - mask_ratio) + 1e-6)
        ids_shuffle = torch.argsort(torch.rand(b, n, device=device), dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        mask = torch.ones(b, n, device=device)
        mask[:, :keep] = 0
        return ids_shuffle[:, :keep], torch.gather(mask, 1, ids_restore), ids_restore

    @classmethod
    def random_masking(cls, x: torch.Tensor, mask_ratio: float):
        """Keep ``int(L * (1 - mask_ratio))`` random tokens of ``x`` ``(B, L, D)`` per sample (MAE):
        ``(x_visible (B, K, D), mask (B, L) 1=masked, ids_restore (B, L))``."""
        ids_keep, mask, ids_restore = cls.masking_ids(x.shape[0], x.shape[1], mask_ratio, x.device)
        return _gather(x, ids_keep), mask, ids_restore

    # ------------------------------------------------------------ forward
    def forward_encoder(self, vols: torch.Tensor, mask_ratio: float):
        """Mask, embed the visible tubelets only (the embedding is per tubelet, so this equals
        MAE's embed-then-mask), run the encoder on the class token + them:
        ``(latent (B, 1 + K, E), mask, ids_restore)``."""
        enc = self.encoder
        patches = self.patchify(vols)
        ids_keep, mask, ids_restore = self.masking_ids(patches.shape[0], patches.shape[1], mask_ratio, vols.device)
        pos = enc.pos_embed[:, 1:].expand(patches.shape[0], -1, -1)
        x = enc.patch_embed.embed(_gather(patches, ids_keep)) + _gather(pos, ids_keep)
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return enc.norm(enc.blocks(torch.cat([cls, x], dim=1))), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Insert mask tokens, unshuffle, decode: ``(B, L, t*p*p*C)`` (class token removed)."""
        x = self.decoder_embed(latent)
        tokens = restore_tokens(x[:, 1:], self.mask_token, ids_restore)
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    @torch.no_grad()
    def reconstruct(self, vols: torch.Tensor, mask_ratio: float):
        """For figures: ``(masked_input, reconstruction)`` shaped like ``vols`` (masked tubelets
        zeroed / predicted, in voxel space); runs in eval mode and restores the mode."""
        was_training = self.training
        self.eval()
        try:
            _, pred, mask = self.forward(vols, mask_ratio)
        finally:
            self.train(was_training)
        patches = self.patchify(vols).float()
        _, mean, std = self._target(vols)
        pred = pred.float() * std + mean if self.norm_pix_loss else pred.float()
        m = mask.unsqueeze(-1)
        return (self.unpatchify(patches * (1 - m)).to(vols.dtype),
                self.unpatchify(patches * (1 - m) + pred * m).to(vols.dtype))
