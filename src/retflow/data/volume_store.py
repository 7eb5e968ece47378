"""Whole OCT volumes in the store: one resampled uint8 stack per volume, next to its B-scans.

With ``preprocess.oct.volume`` set (``{depth, height, width, shard_size}``; null: off), a volume
dataset (:func:`retflow.data.ingest.is_volume_dataset`) also stores every volume it reads once,
whole, from the same read that gives its central B-scans (:func:`process_volume_record`):

- axes stay (B-scan, depth, A-scan) as :func:`retflow.data.volumes.read_volume` gives them, stored
  as ``(D, H, W)`` = (``depth`` B-scans, ``height`` rows along the A-scan, ``width`` A-scans);
  ``depth`` is the B-scan count (the 3-D model's depth axis), not the axial depth;
- intensity: the robust min/max scaling of a B-scan (:func:`retflow.data.preprocess.scale_uint8`)
  over the whole volume, one lo/hi for all B-scans so they keep their relative brightness;
- resampling (:func:`resample_volume`): torch's antialiased bilinear resize, first each B-scan
  in-plane, then along the B-scan axis -- a separable triangle filter widened by the scale when
  shrinking, so speckle and a 49 -> 16 B-scan reduction do not alias (plain trilinear / scipy
  ``zoom`` point-sample: a 3-px stripe pattern 512 -> 64 keeps a std of 60 grey levels with them,
  1.2 here); pixel centres are aligned (``align_corners=False``), so B-scan ``k`` of ``n`` lands
  at ``(k + 0.5) * D / n - 0.5``;
- store: ``volume_shards/`` (:data:`VOLUME_SHARD_DIR`), uint8 ``(n, D, H, W)`` shards written with
  :class:`~retflow.data.store.ShardWriter` and read with
  :class:`~retflow.data.store.ImageStore` (``folder=VOLUME_SHARD_DIR``), ``shard_size`` volumes
  each;
- manifest: every row of a stored volume (its B-scan rows) gets ``volume_index``, the volume's
  position across ``volume_shards/``; the column exists exactly when the store holds
  ``volume_shards/`` (never for 2-D datasets or with the option off), and then every row has one,
  because a volume that cannot be stored whole is quarantined with all its B-scans (the 2-D and
  3-D models see the same eyes). The volume id -- the record, whose patient is the split unit --
  is what the B-scan rows share.

Quarantine reasons added here: ``single_bscan`` (a file of one B-scan is no volume) and
``resample_failed`` (the resampling raised; the detail names the exception).
"""

from __future__ import annotations

import numpy as np

from retflow.data.io import UnreadableInput
from retflow.data.preprocess import process_volume, scale_uint8
from retflow.data.volumes import read_volume

VOLUME_SHARD_DIR = "volume_shards"
VOLUME_INDEX = "volume_index"  # the manifest column


def resample_volume(data: np.ndarray, depth: int, height: int, width: int) -> np.ndarray:
    """A numeric ``(n_bscans, H, W)`` volume as uint8 ``(depth, height, width)``: robust min/max
    scaling over the whole volume, then antialiased bilinear resampling (see the module doc)."""
    import torch  # here, not at import: the data stage loads torch only where it stores volumes
    import torch.nn.functional as F

    data = np.asarray(data)
    if data.ndim != 3 or min(data.shape) < 1:
        raise ValueError(f"expected a (n_bscans, H, W) volume, got shape {data.shape}")
    t = torch.from_numpy(scale_uint8(data)).float()
    if t.shape[1:] != (height, width):  # each B-scan in-plane: (n, 1, H, W)
        t = F.interpolate(t[:, None], size=(height, width), mode="bilinear", antialias=True,
                          align_corners=False)[:, 0]
    if t.shape[0] != depth:  # along the B-scans: the (B-scan, row) planes of each A-scan column
        planes = t.permute(2, 0, 1)[:, None]  # (W, 1, n, H)
        planes = F.interpolate(planes, size=(depth, height), mode="bilinear", antialias=True, align_corners=False)
        t = planes[:, 0].permute(1, 2, 0)
    return t.round_().clamp_(0, 255).to(torch.uint8).contiguous().numpy()


def volume_stack(source: str, data: np.ndarray, dims: dict) -> np.ndarray:
    """The stored stack of a read volume, ``dims`` the ``preprocess.oct.volume`` section; raises
    :class:`UnreadableInput` (``single_bscan``, ``resample_failed``) for one that cannot be stored."""
    if data.shape[0] < 2:
        raise UnreadableInput(source, "single_bscan",
                              f"{data.shape[0]} B-scan: the volume store (preprocess.oct.volume) needs 2 or more; "
                              f"remove the file from the dataset or set preprocess.oct.volume: null")
    try:
        return resample_volume(data, dims["depth"], dims["height"], dims["width"])
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - a library failing on one odd volume quarantines it
        raise UnreadableInput(source, "resample_failed", f"{type(exc).__name__}: {exc}") from None


def process_volume_record(rec: dict, prep: dict) -> tuple[list[dict], list[np.ndarray], np.ndarray]:
    """One volume record read once: its B-scan rows and images (as
    :func:`retflow.data.preprocess.process_record`) and its whole resampled stack; ``prep`` is
    the validated ``preprocess`` section with ``oct.volume`` set."""
    vol = read_volume(rec["source"])
    rows, images = process_volume(rec, vol, prep)  # the B-scan checks (too_small, blank_image) first
    return rows, images, volume_stack(rec["source"], vol.data, prep["oct"]["volume"])
