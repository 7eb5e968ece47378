"""Segmentation model: a timm ViT encoder + a UNETR-style convolutional decoder (MONAI blocks).

UNETR (Hatamizadeh et al., 2022) taps the transformer's hidden states at several depths,
reshapes the patch tokens to feature maps on the patch grid, upsamples each by transposed
convolutions to its own resolution and merges them into a U-Net decoder, together with a
convolutional stem on the input image at full resolution. This module builds that decoder from
MONAI's blocks for *any* timm ``VisionTransformer`` (depth, width, patch size, image size):

* ``n = ceil(log2(patch_size))`` decoder levels separate the token grid (``img_size / patch``)
  from full resolution (16 px patches: 4 levels, as UNETR; 8 px patches: 3).
* Level ``L = 1 .. n - 1`` (``1/2^L`` of the input resolution) gets a skip connection from the
  hidden state of block ``round(L * depth / n)`` (1-based; :func:`skip_blocks`), upsampled by
  ``2^(n - L)`` with ``UnetrPrUpBlock`` to ``feature_size * 2^L`` channels; so with 16 px patches
  and depth 12 the blocks are 3, 6 and 9 -- UNETR's choice. Level ``n`` (the bottleneck) is the
  last block's output after the encoder's final norm; level 0 is ``UnetrBasicBlock`` on the image.
* Going up, ``UnetrUpBlock`` doubles the resolution and fuses each skip; ``UnetOutBlock`` (1x1
  conv) gives ``n_classes`` logits at the input resolution.
* A patch size that is not a power of two (e.g. 14) decodes to ``grid * 2^n`` pixels: the image
  stem's features are resized to that grid and the logits back to the input size (bilinear).

Encoder weights load with :func:`retflow.models.checkpoint_layouts.load_encoder` (our MAE
pretraining checkpoint, RETFound / timm / DINOv2 files) into :attr:`SegViT.encoder`, a timm
ViT built with ``global_pool="token"`` and no head, so its final ``norm`` is loaded too.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from torch import nn

from .vit import ViTSpec, create_vit

__all__ = ["UNETRDecoder", "SegViT", "decoder_levels", "skip_blocks"]


def decoder_levels(patch_size: int) -> int:
    """Number of x2 upsampling levels from the token grid to full resolution (at least 1)."""
    return max(1, math.ceil(math.log2(patch_size)))


def skip_blocks(depth: int, levels: int) -> list[int]:
    """0-based indices of the blocks whose hidden states feed levels ``1 .. levels - 1``."""
    return [min(depth - 1, max(0, round(level * depth / levels) - 1)) for level in range(1, levels)]


class UNETRDecoder(nn.Module):
    """UNETR decoder for 2-D images from ViT hidden states (see the module docstring).

    ``forward(image, skips, bottleneck)``: ``image`` (B, in_chans, S, S) the encoder's input;
    ``skips`` the hidden states for levels 1 .. n-1 and ``bottleneck`` the final one, each
    (B, embed_dim, g, g) on the token grid ``g = img_size // patch_size``. Returns logits
    (B, n_classes, S, S).
    """

    def __init__(self, embed_dim: int, patch_size: int, img_size: int, in_chans: int, n_classes: int,
                 feature_size: int = 16, norm_name: str = "instance", res_block: bool = True):
        super().__init__()
        n = decoder_levels(patch_size)
        self.levels = n
        self.img_size = int(img_size)
        self.grid = int(img_size) // int(patch_size)
        self.out_size = self.grid * 2**n  # == img_size when the patch size is a power of two
        fs = int(feature_size)
        self.stem = UnetrBasicBlock(2, in_chans, fs, kernel_size=3, stride=1, norm_name=norm_name,
                                    res_block=res_block)
        self.skips = nn.ModuleList(
            UnetrPrUpBlock(2, embed_dim, fs * 2**level, num_layer=n - level - 1, kernel_size=3, stride=1,
                           upsample_kernel_size=2, norm_name=norm_name, conv_block=True, res_block=res_block)
            for level in range(1, n)
        )
        # ups[level] takes level + 1 to level (full resolution at level 0)
        self.ups = nn.ModuleList(
            UnetrUpBlock(2, embed_dim if level == n - 1 else fs * 2 ** (level + 1), fs * 2**level,
                         kernel_size=3, upsample_kernel_size=2, norm_name=norm_name, res_block=res_block)
            for level in range(n)
        )
        self.head = UnetOutBlock(2, fs, n_classes)

    def forward(self, image: torch.Tensor, skips: list[torch.Tensor], bottleneck: torch.Tensor) -> torch.Tensor:
        if len(skips) != self.levels - 1:
            raise ValueError(f"expected {self.levels - 1} skip feature maps, got {len(skips)}")
        stem = self.stem(image)
        if stem.shape[-1] != self.out_size:
            stem = F.interpolate(stem, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False)
        features = [stem] + [block(h) for block, h in zip(self.skips, skips)]
        x = bottleneck
        for level in range(self.levels - 1, -1, -1):
            x = self.ups[level](x, features[level])
        logits = self.head(x)
        if logits.shape[-1] != image.shape[-1]:
            logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return logits


class SegViT(nn.Module):
    """A timm ViT encoder (``self.encoder``) + :class:`UNETRDecoder` (``self.decoder``)."""

    def __init__(self, spec: ViTSpec, n_classes: int, feature_size: int = 16, drop_path_rate: float = 0.0):
        super().__init__()
        self.spec = spec
        self.encoder = create_vit(spec, num_classes=0, drop_path_rate=drop_path_rate, global_pool="token")
        depth = len(self.encoder.blocks)
        embed_dim = self.encoder.embed_dim
        self.decoder = UNETRDecoder(embed_dim, spec.patch_size, spec.img_size, spec.in_chans, n_classes,
                                    feature_size=feature_size)
        self.skip_indices = skip_blocks(depth, self.decoder.levels)

    def _tokens_to_map(self, tokens: torch.Tensor) -> torch.Tensor:
        b, _, d = tokens.shape
        g = self.decoder.grid
        return tokens[:, self.encoder.num_prefix_tokens:].reshape(b, g, g, d).permute(0, 3, 1, 2).contiguous()

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(skip feature maps for levels 1..n-1, bottleneck map), each (B, D, g, g)."""
        if not self.skip_indices:
            return [], self._tokens_to_map(self.encoder.forward_features(x))
        unique = sorted(set(self.skip_indices))
        final, maps = self.encoder.forward_intermediates(x, indices=unique, output_fmt="NCHW", norm=False)
        by_block = dict(zip(unique, maps))
        return [by_block[i] for i in self.skip_indices], self._tokens_to_map(final)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips, bottleneck = self.encode(x)
        return self.decoder(x, skips, bottleneck)
