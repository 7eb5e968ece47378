"""Reading images and OCT volumes, with failures classified into quarantine reasons."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


class UnreadableInput(Exception):
    """An input file that cannot be used; ``reason`` is a short quarantine code."""

    def __init__(self, path: Path | str, reason: str, detail: str = ""):
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{path}: {reason}{' (' + detail + ')' if detail else ''}")


def sha256_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_image(path: Path | str) -> np.ndarray:
    """Read an image as uint8 (H, W) or (H, W, 3); 16-bit is rescaled, alpha dropped."""
    path = Path(path)
    if not path.exists():
        raise UnreadableInput(path, "missing_file")
    if path.stat().st_size == 0:
        raise UnreadableInput(path, "zero_bytes")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                hi = arr.max() if arr.max() > 0 else 1.0
                return np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
            if im.mode not in ("L", "RGB"):
                im = im.convert("RGB")
            return np.asarray(im, dtype=np.uint8)
    except UnidentifiedImageError as exc:
        raise UnreadableInput(path, "not_an_image", str(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise UnreadableInput(path, "truncated_or_corrupt", str(exc)) from None


def read_volume(path: Path | str) -> np.ndarray:
    """Read an OCT volume as (n_bscans, H, W) float array.

    NIfTI files follow retflow's convention: array axes (x, y, z) = (A-scan, depth, B-scan);
    ``.npy``/``.npz`` stacks are (n_bscans, H, W) already (first array of an npz).
    """
    path = Path(path)
    if not path.exists():
        raise UnreadableInput(path, "missing_file")
    if path.stat().st_size == 0:
        raise UnreadableInput(path, "zero_bytes")
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            data = np.asarray(nib.load(str(path)).dataobj)
            if data.ndim == 2:
                data = data[:, :, None]
            if data.ndim != 3:
                raise UnreadableInput(path, "wrong_shape", f"NIfTI with {data.ndim} dims")
            return np.transpose(data, (2, 1, 0))
        if name.endswith(".npy"):
            data = np.load(path, allow_pickle=False)
        elif name.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                data = z[z.files[0]]
        else:
            raise UnreadableInput(path, "unsupported_volume_format", path.suffix)
    except UnreadableInput:
        raise
    except Exception as exc:  # a reader refusing a file is a quarantine reason, never a crash
        raise UnreadableInput(path, "unreadable_volume", f"{type(exc).__name__}: {exc}") from None
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise UnreadableInput(path, "wrong_shape", f"array with {data.ndim} dims")
    return data


def central_bscans(volume: np.ndarray, k: int) -> list[tuple[int, np.ndarray]]:
    """The ``k`` B-scans around the volume's centre (the fovea in macular scans), with indices."""
    n = volume.shape[0]
    k = min(k, n)
    start = (n - k) // 2
    return [(i, volume[i]) for i in range(start, start + k)]
