"""Per-record preprocessing: read one source file, check it, and turn it into stored images.

- CFP: detect the circular fundus field (:mod:`retflow.data.fundus`), crop the black border,
  pad to square, optional contrast enhancement, resize; the field bounds (in source pixels),
  a found flag and quality measures go into the manifest.
- OCT B-scan images and volumes: the central ``bscans`` B-scans of a volume (RETFound takes the
  central one), robust min/max intensity scaling to uint8 (:func:`scale_uint8`), resize; stored
  as one channel. Whole volumes (``preprocess.oct.volume``) are resampled from the same read by
  :mod:`retflow.data.volume_store` (:func:`process_volume` gives it the B-scan rows).

:func:`process_record` is what the preparation step maps over records in worker processes;
it returns ``(rows, images)`` or raises :class:`UnreadableInput` with the quarantine reason.

Segmentation masks (2-D datasets with ``mask_column``; :func:`process_record_with_mask`): the
mask (a label map, pixel value = class index; see :func:`read_mask`) must have the source
image's height and width (else ``mask_shape_mismatch``) and gets the image's geometry exactly:
CFP the same field crop (the ``bounds`` in source pixels) and centred zero padding to a square,
then both are resized to the stored size, the mask with NEAREST; OCT a NEAREST resize. A
missing or unreadable mask is ``bad_mask``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from retflow.data.fundus import crop_pad_square, crop_to_field, detect_field, enhance_contrast, quality_flags
from retflow.data.io import UnreadableInput, check_file, read_image, source_digest
from retflow.data.leakage import phash
from retflow.data.volumes import OctVolume, central_bscans, read_volume

BLANK_STD = 2.0  # grey levels: an image flatter than this carries no picture


def resize(img: np.ndarray, size: int) -> np.ndarray:
    mode = "RGB" if img.ndim == 3 else "L"
    out = Image.fromarray(img, mode=mode).resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(out, dtype=np.uint8)


def preprocess_cfp(img: np.ndarray, size: int, crop_border: bool, enhance: str,
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
        cropped = crop_pad_square(img, (0, img.shape[0], 0, img.shape[1]))
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


def scale_uint8(arr: np.ndarray) -> np.ndarray:
    """Robust min/max intensity scaling to uint8: the 0.5th / 99.5th percentiles of ``arr`` (any
    shape: one B-scan, or a whole volume) become 0 / 255, values beyond them are clipped."""
    arr = np.asarray(arr, dtype=np.float32)
    lo, hi = np.percentile(arr, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((arr - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)


def preprocess_oct(bscan: np.ndarray, size: int) -> tuple[np.ndarray, dict]:
    """Scale a B-scan to uint8 by robust min/max and resize it to a square, one channel."""
    arr = np.asarray(bscan, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr.mean(axis=2)
    out = resize(scale_uint8(arr), size)
    return out[..., None], {"bounds": [0, int(arr.shape[0]), 0, int(arr.shape[1])], "field_found": True,
                            "field_fraction": 1.0}


def _check_picture(path: str, arr: np.ndarray, min_side: int, shape_hw) -> None:
    if min(shape_hw) < min_side:
        raise UnreadableInput(path, "too_small", f"{shape_hw[1]}x{shape_hw[0]} < min_side {min_side}")
    if float(np.asarray(arr, dtype=np.float32).std()) < BLANK_STD:
        raise UnreadableInput(path, "blank_image", "no variation in pixel values")


def preprocess_image(source: str | Path, modality: str, size: int, min_side: int, *, crop_border: bool,
                     enhance: str, jpeg_draft: bool = True) -> tuple[np.ndarray, dict, tuple[int, int]]:
    """Read, check and preprocess one 2-D image as the data stage stores it: ``(image, manifest
    fields, source (h, w))``. Also what ``retflow predict`` / ``embed`` run on each input.
    ``crop_border`` and ``enhance`` (``preprocess.cfp``) apply to CFP only. ``jpeg_draft`` is no
    setting: the data stage always decodes JPEGs at a reduced scale (see below); False is the
    full-decoding reference of ``bench/bench_preprocess.py``.

    Raises :class:`UnreadableInput` with the quarantine reason: the file checks of
    :func:`~retflow.data.io.read_image` (``missing_file``, ``not_a_file``, ``zero_bytes``,
    ``not_an_image``, ``truncated``, ``corrupt``, ``multi_frame``, ...), ``too_small`` (a side
    below ``min_side``), ``blank_image`` (near-constant), and for CFP ``wrong_mode`` (grayscale)
    and ``no_fundus_field``.
    """
    # JPEGs decode at a reduced DCT scale that still leaves >= 2x the stored size
    raw, orig = read_image(source, draft_size=2 * size if jpeg_draft else None)
    _check_picture(str(source), raw, min_side, orig)
    if modality == "cfp":
        if raw.ndim == 2:
            raise UnreadableInput(source, "wrong_mode", "grayscale image in a colour-fundus (cfp) dataset")
        img, info = preprocess_cfp(raw, size, crop_border, enhance, scale=orig[0] / raw.shape[0])
        if not info["field_found"]:
            raise UnreadableInput(source, "no_fundus_field", "no illuminated circular field detected")
    else:
        img, info = preprocess_oct(raw, size)
    return img, info, orig


def process_record(rec: dict, modality: str, prep: dict, volume: bool, *,
                   jpeg_draft: bool = True) -> tuple[list[dict], list[np.ndarray]]:
    """Preprocess one record into stored images and their manifest rows; ``prep`` is the validated
    ``preprocess`` section (``jpeg_draft``: see :func:`preprocess_image`)."""
    source = rec["source"]
    if volume:
        return process_volume(rec, read_volume(source), prep)
    img, info, orig = preprocess_image(source, modality, prep[modality]["size"], prep["min_side"],
                                       crop_border=prep["cfp"]["crop_border"], enhance=prep["cfp"]["enhance"],
                                       jpeg_draft=jpeg_draft)
    rows = [{**rec, "frame": -1, "n_frames": 1, "laterality": "", **info}]
    return _identified(rows, [img], source, orig), [img]


def process_volume(rec: dict, vol: OctVolume, prep: dict) -> tuple[list[dict], list[np.ndarray]]:
    """The stored B-scans of an already read volume (the central ``preprocess.oct.bscans``) and
    their manifest rows, as :func:`process_record` gives them for a volume dataset."""
    source = rec["source"]
    data = vol.data
    _check_picture(source, data[data.shape[0] // 2], prep["min_side"], data.shape[1:])
    k = prep["oct"]["bscans"]
    rows, images = [], []
    for index, bscan in central_bscans(data, k):
        img, info = preprocess_oct(bscan, prep["oct"]["size"])
        suffix = f"_b{index:03d}" if k > 1 else ""
        rows.append({**rec, "image_id": rec["image_id"] + suffix, "frame": index, "n_frames": data.shape[0],
                     "laterality": vol.meta.get("laterality", ""), **info})
        images.append(img)
    return _identified(rows, images, source, data.shape), images


def _identified(rows: list[dict], images: list[np.ndarray], source: str, shape) -> list[dict]:
    """The rows with the source's content digest, each stored image's perceptual hash and the source shape."""
    digest = source_digest(source)
    for row, img in zip(rows, images):
        row["sha256"] = digest
        row["phash"] = phash(img)
        row["source_shape"] = "x".join(str(s) for s in shape)
    return rows


# ---------------------------------------------------------------- segmentation masks ----------

_INT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


def read_mask(path: str) -> np.ndarray:
    """A label map as uint8 (H, W): pixel value = class index; raises ``bad_mask``.

    Bilevel PNGs give 0/1, grey / palette images their values (palette: the indices); a mask
    holding only 0 and 255 (the usual binary export) becomes 0/1; colour masks are refused
    unless grey (R = G = B); integer images must stay below 256.
    """
    try:
        check_file(Path(path))
    except UnreadableInput as exc:
        raise UnreadableInput(path, "bad_mask", f"mask {exc.reason}: {path}") from None
    try:
        with Image.open(path) as im:
            if getattr(im, "n_frames", 1) > 1:
                raise UnreadableInput(path, "bad_mask", f"mask has {im.n_frames} frames: {path}")
            im.load()
            if im.mode in ("1", "L", "P") or im.mode in _INT_MODES:
                arr = np.asarray(im)
            elif im.mode in ("RGB", "RGBA", "LA"):
                rgb = np.asarray(im.convert("RGB"))
                if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
                    raise UnreadableInput(path, "bad_mask", f"colour mask (expected class indices): {path}")
                arr = rgb[..., 0]
            else:
                raise UnreadableInput(path, "bad_mask", f"mask PIL mode {im.mode}: {path}")
    except UnreadableInput:
        raise
    except Exception as exc:  # undecodable file
        raise UnreadableInput(path, "bad_mask", f"{type(exc).__name__}: {exc}") from None
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.size and int(arr.max()) > 255:
        raise UnreadableInput(path, "bad_mask", f"mask values up to {int(arr.max())} (> 255): {path}")
    arr = arr.astype(np.uint8)
    if arr.size and int(arr.max()) == 255 and np.isin(arr, (0, 255)).all():
        arr = (arr > 0).astype(np.uint8)  # a 0/255 binary mask
    return arr


def preprocess_mask(mask: np.ndarray, row: dict, modality: str, prep: dict) -> np.ndarray:
    """The stored mask uint8 (size, size, 1) for a stored image's manifest ``row``."""
    source = row["mask_source"]
    h, w = (int(s) for s in str(row["source_shape"]).split("x")[:2])
    if mask.shape != (h, w):
        raise UnreadableInput(source, "mask_shape_mismatch",
                              f"mask {mask.shape[1]}x{mask.shape[0]} vs image {w}x{h}")
    if modality == "cfp":
        crop = prep["cfp"]["crop_border"] and row["field_found"]
        mask = crop_pad_square(mask, row["bounds"] if crop else (0, h, 0, w))
        size = prep["cfp"]["size"]
    else:
        size = prep["oct"]["size"]
    out = Image.fromarray(mask, mode="L").resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(out, dtype=np.uint8)[..., None]


def process_record_with_mask(rec: dict, modality: str, prep: dict, volume: bool, *,
                             jpeg_draft: bool = True) -> tuple[list[dict], list[np.ndarray], list[np.ndarray]]:
    """:func:`process_record` plus the record's mask (``rec["mask_source"]``), geometry-matched."""
    if volume:
        raise UnreadableInput(rec["source"], "bad_mask", "masks are supported for 2-D images only")
    rows, images = process_record(rec, modality, prep, volume, jpeg_draft=jpeg_draft)
    mask = read_mask(rec["mask_source"])
    return rows, images, [preprocess_mask(mask, row, modality, prep) for row in rows]
