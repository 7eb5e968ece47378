"""Image preprocessing: fundus field detection + border crop for CFP, B-scan scaling for OCT."""

from __future__ import annotations

import numpy as np
from PIL import Image


def fundus_bounds(img: np.ndarray, threshold: float | None = None) -> tuple[int, int, int, int]:
    """Bounding box (top, bottom, left, right) of the illuminated fundus field.

    The field is where the red channel rises above the dark border: a threshold at a fraction
    of the robust maximum, then the rows/columns where enough pixels are lit.
    """
    red = img[..., 0] if img.ndim == 3 else img
    red = red.astype(np.float32)
    if threshold is None:
        threshold = max(10.0, 0.12 * float(np.percentile(red, 99)))
    lit = red > threshold
    rows = np.flatnonzero(lit.mean(axis=1) > 0.02)
    cols = np.flatnonzero(lit.mean(axis=0) > 0.02)
    if rows.size == 0 or cols.size == 0:
        return 0, img.shape[0], 0, img.shape[1]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def pad_to_square(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    side = max(h, w)
    pad = [((side - h) // 2, side - h - (side - h) // 2), ((side - w) // 2, side - w - (side - w) // 2)]
    if img.ndim == 3:
        pad.append((0, 0))
    return np.pad(img, pad, mode="constant")


def resize(img: np.ndarray, size: int) -> np.ndarray:
    mode = "RGB" if img.ndim == 3 else "L"
    out = Image.fromarray(img, mode=mode).resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(out, dtype=np.uint8)


def preprocess_cfp(img: np.ndarray, size: int, crop_border: bool = True) -> tuple[np.ndarray, dict]:
    """Crop the black border around the fundus, pad to square, resize; returns (image, info)."""
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    bounds = fundus_bounds(img) if crop_border else (0, img.shape[0], 0, img.shape[1])
    top, bottom, left, right = bounds
    field = img[top:bottom, left:right]
    field_fraction = field.shape[0] * field.shape[1] / float(img.shape[0] * img.shape[1])
    out = resize(pad_to_square(field), size)
    return out, {"bounds": list(bounds), "field_fraction": round(field_fraction, 4)}


def preprocess_oct(bscan: np.ndarray, size: int) -> tuple[np.ndarray, dict]:
    """Scale a B-scan to uint8 by robust min/max and resize it to a square, one channel."""
    arr = bscan.astype(np.float32)
    if arr.ndim == 3:
        arr = arr.mean(axis=2)
    lo, hi = np.percentile(arr, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    scaled = np.clip((arr - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)
    out = resize(scaled, size)
    return out[..., None], {"bounds": [0, bscan.shape[0], 0, bscan.shape[1]], "field_fraction": 1.0}
