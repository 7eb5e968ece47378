"""Per-record preprocessing: read one source file, check it, and turn it into stored images.

- CFP: detect the circular fundus field (:mod:`retflow.data.fundus`), crop the black border,
  pad to square, optional contrast enhancement, resize; the field bounds (in source pixels),
  a found flag and quality measures go into the manifest.
- OCT B-scan images and volumes: the central ``bscans`` B-scans of a volume (RETFound takes the
  central one), robust min/max intensity scaling to uint8, resize; stored as one channel.

:func:`process_record` is what the preparation step maps over records in worker processes;
it returns ``(rows, images)`` or raises :class:`UnreadableInput` with the quarantine reason.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from retflow.data.fundus import crop_to_field, detect_field, enhance_contrast, quality_flags
from retflow.data.io import UnreadableInput, read_image, source_digest
from retflow.data.leakage import phash
from retflow.data.volumes import central_bscans, read_volume

BLANK_STD = 2.0  # grey levels: an image flatter than this carries no picture


def resize(img: np.ndarray, size: int) -> np.ndarray:
    mode = "RGB" if img.ndim == 3 else "L"
    out = Image.fromarray(img, mode=mode).resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(out, dtype=np.uint8)


def preprocess_cfp(img: np.ndarray, size: int, crop_border: bool = True, enhance: str = "none",
                   scale: float = 1.0) -> tuple[np.ndarray, dict]:
    """Crop the fundus field, pad to square, enhance, resize; returns (image, manifest fields).

    ``scale`` converts bounds from the decoded image back to source pixels (JPEG draft decoding).
    """
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    field = detect_field(img)
    if crop_border and field.found:
        cropped = crop_to_field(img, field)
    else:
        h, w = img.shape[:2]
        side = max(h, w)
        cropped = np.zeros((side, side, 3), np.uint8)
        cropped[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = img
    out = resize(cropped, size)
    if enhance != "none":  # on the stored size: cheap, and the field is re-detected there
        out = enhance_contrast(out, enhance)
    quality = quality_flags(img, field)
    info = {
        "bounds": [int(round(b * scale)) for b in field.bounds],
        "field_found": bool(field.found),
        "field_fraction": round(float(field.mask_fraction), 4),
        **{f"q_{k}": (bool(v) if isinstance(v, (bool, np.bool_)) else round(float(v), 4))
           for k, v in quality.items()},
    }
    return out, info


def preprocess_oct(bscan: np.ndarray, size: int) -> tuple[np.ndarray, dict]:
    """Scale a B-scan to uint8 by robust min/max and resize it to a square, one channel."""
    arr = np.asarray(bscan, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr.mean(axis=2)
    lo, hi = np.percentile(arr, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    scaled = np.clip((arr - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)
    out = resize(scaled, size)
    return out[..., None], {"bounds": [0, int(arr.shape[0]), 0, int(arr.shape[1])], "field_found": True,
                            "field_fraction": 1.0}


def _check_picture(path: str, arr: np.ndarray, min_side: int, shape_hw) -> None:
    if min(shape_hw) < min_side:
        raise UnreadableInput(path, "too_small", f"{shape_hw[1]}x{shape_hw[0]} < min_side {min_side}")
    if float(np.asarray(arr, dtype=np.float32).std()) < BLANK_STD:
        raise UnreadableInput(path, "blank_image", "no variation in pixel values")


def process_record(rec: dict, modality: str, prep: dict, volume: bool) -> tuple[list[dict], list[np.ndarray]]:
    """Preprocess one record into stored images and their manifest rows."""
    source = rec["source"]
    min_side = prep.get("min_side", 32)
    rows, images = [], []
    if volume:
        vol = read_volume(source)
        data = vol.data
        _check_picture(source, data[data.shape[0] // 2], min_side, data.shape[1:])
        k = prep["oct"].get("bscans", 1)
        for index, bscan in central_bscans(data, k):
            img, info = preprocess_oct(bscan, prep["oct"]["size"])
            suffix = f"_b{index:03d}" if k > 1 else ""
            rows.append({**rec, "image_id": rec["image_id"] + suffix, "frame": index, "n_frames": data.shape[0],
                         "laterality": vol.meta.get("laterality", ""), **info})
            images.append(img)
    else:
        size = prep["cfp"]["size"] if modality == "cfp" else prep["oct"]["size"]
        # JPEGs decode at a reduced DCT scale that still leaves >= 2x the stored size
        raw, orig = read_image(source, draft_size=2 * size if prep.get("jpeg_draft", True) else None)
        _check_picture(source, raw, min_side, orig)
        if modality == "cfp":
            if raw.ndim == 2:
                raise UnreadableInput(source, "wrong_mode", "grayscale image in a colour-fundus (cfp) dataset")
            cfp = prep["cfp"]
            img, info = preprocess_cfp(raw, size, cfp.get("crop_border", True), cfp.get("enhance", "none"),
                                       scale=orig[0] / raw.shape[0])
            if not info["field_found"]:
                raise UnreadableInput(source, "no_fundus_field", "no illuminated circular field detected")
        else:
            img, info = preprocess_oct(raw, size)
        rows.append({**rec, "frame": -1, "n_frames": 1, "laterality": "", **info})
        images.append(img)
    digest = source_digest(source)
    for row, img in zip(rows, images):
        row["sha256"] = digest
        row["phash"] = phash(img)
        row["source_shape"] = "x".join(str(s) for s in (orig if not volume else data.shape))
    return rows, images
