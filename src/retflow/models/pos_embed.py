"""Position embeddings for ViT / MAE.

* :func:`get_2d_sincos_pos_embed` builds the fixed 2-D sine-cosine table used
  by MAE (and therefore RETFound) for both the encoder and the decoder.
* :func:`interpolate_pos_embed` resizes a learned / fixed table to a new patch
  grid (e.g. a checkpoint pretrained at 224 px fine-tuned at 384 px).
* :func:`get_3d_sincos_pos_embed` / :func:`interpolate_pos_embed_3d`: the same for a
  (depth, rows, cols) tubelet grid (the 3-D MAE, :mod:`retflow.models.mae3d`).

Channel layout of the sin-cos table (identical to MAE): the first half of the
channels encodes the patch *column* index, the second half the *row* index;
within each half the first quarter is ``sin`` and the second quarter ``cos``
of ``pos * 10000 ** (-k / (D/4))``.  Rows are in raster order (row-major),
matching ``PatchEmbed``'s flattening.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["get_1d_sincos_pos_embed", "get_2d_sincos_pos_embed", "get_3d_sincos_pos_embed", "interpolate_pos_embed",
           "interpolate_pos_embed_3d"]


def get_1d_sincos_pos_embed(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """Sin-cos embedding of 1-D ``positions``: returns ``(positions.size, embed_dim)``.

    The first ``embed_dim // 2`` columns are sines, the rest cosines.
    """
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    half = embed_dim // 2
    omega = 1.0 / 10000 ** (np.arange(half, dtype=np.float64) / half)
    angles = np.outer(np.asarray(positions, dtype=np.float64).reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
    """Fixed 2-D sin-cos table of shape ``(grid_size**2 [+1], embed_dim)`` (float32).

    With ``cls_token=True`` an all-zero row is prepended for the class token.
    ``embed_dim`` must be divisible by 4.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for 2-D sin-cos, got {embed_dim}")
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    emb = np.concatenate(
        [get_1d_sincos_pos_embed(embed_dim // 2, cols), get_1d_sincos_pos_embed(embed_dim // 2, rows)],
        axis=1,
    )
    if cls_token:
        emb = np.concatenate([np.zeros((1, embed_dim)), emb], axis=0)
    return emb.astype(np.float32)


def interpolate_pos_embed(
    pos_embed: torch.Tensor, new_grid: int | tuple[int, int], num_prefix: int = 1
) -> torch.Tensor:
    """Bicubically resize the patch part of ``pos_embed`` to ``new_grid``.

    ``pos_embed`` is ``(1, num_prefix + old_grid**2, D)`` with a square old
    grid; the ``num_prefix`` leading rows (class / register tokens) are kept
    unchanged.  ``new_grid`` is an int (square) or ``(rows, cols)``.  Returns
    ``(1, num_prefix + rows*cols, D)`` in the input dtype; the input is returned
    as-is when the grid already matches.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be (1, N, D), got {tuple(pos_embed.shape)}")
    rows, cols = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
    n_patch = pos_embed.shape[1] - num_prefix
    old = int(round(n_patch**0.5))
    if old * old != n_patch:
        raise ValueError(f"pos_embed patch part ({n_patch} tokens) is not a square grid")
    if (old, old) == (rows, cols):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    dim = pos_embed.shape[-1]
    grid = grid.float().reshape(1, old, old, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def get_3d_sincos_pos_embed(embed_dim: int, grid: tuple[int, int, int], cls_token: bool = False) -> np.ndarray:
    """Fixed 3-D sin-cos table ``(d*h*w [+1], embed_dim)`` (float32) for a ``(d, h, w)`` grid.

    Channels: ``2 * (embed_dim // 6)`` encode the column, as many the row, the rest (also even)
    the depth index; so any even ``embed_dim`` works (96 -> 32/32/32, 64 -> 20/20/24). Rows are in
    raster order (depth slowest, column fastest), matching a ``Conv3d`` patch embedding's
    ``flatten(2)``. ``cls_token=True`` prepends an all-zero row.
    """
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even for 3-D sin-cos, got {embed_dim}")
    d, h, w = (int(g) for g in grid)
    spatial = 2 * (embed_dim // 6)
    depth_idx, rows, cols = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    emb = np.concatenate(
        [get_1d_sincos_pos_embed(spatial, cols), get_1d_sincos_pos_embed(spatial, rows),
         get_1d_sincos_pos_embed(embed_dim - 2 * spatial, depth_idx)],
        axis=1,
    )
    if cls_token:
        emb = np.concatenate([np.zeros((1, embed_dim)), emb], axis=0)
    return emb.astype(np.float32)


def interpolate_pos_embed_3d(
    pos_embed: torch.Tensor, old_grid: tuple[int, int, int], new_grid: tuple[int, int, int], num_prefix: int = 1
) -> torch.Tensor:
    """Trilinearly resize the patch part of ``pos_embed`` ``(1, num_prefix + d*h*w, D)`` from the
    ``old_grid`` ``(d, h, w)`` to ``new_grid``; prefix rows are kept; returned as-is when equal."""
    old_grid, new_grid = tuple(int(g) for g in old_grid), tuple(int(g) for g in new_grid)
    n_patch = pos_embed.shape[1] - num_prefix
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1 or n_patch != int(np.prod(old_grid)):
        raise ValueError(f"pos_embed {tuple(pos_embed.shape)} does not hold {num_prefix} prefix + "
                         f"{'x'.join(map(str, old_grid))} grid positions")
    if old_grid == new_grid:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    dim = pos_embed.shape[-1]
    grid = grid.float().reshape(1, *old_grid, dim).permute(0, 4, 1, 2, 3)
    grid = F.interpolate(grid, size=new_grid, mode="trilinear", align_corners=False)
    grid = grid.permute(0, 2, 3, 4, 1).reshape(1, int(np.prod(new_grid)), dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
