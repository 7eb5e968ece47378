"""Reading OCT volumes of every format users bring, with the field's own readers.

``read_volume(path)`` returns an :class:`OctVolume` whose ``data`` is always a numeric
``(n_bscans, H, W)`` array (B-scan, depth, A-scan) and whose ``meta`` holds only safe technical
fields. Every failure is raised as :class:`~retflow.data.io.UnreadableInput` with a short
quarantine ``reason`` (see :data:`REASONS`); a reader's own traceback never escapes.

Formats (dispatch on the file name, case-insensitive):

=====================  ==========================================================================
``.vol``               Heidelberg Spectralis raw export (eyepy ``HeVolReader``)
``.e2e``               Heidelberg HEYEX E2E (eyepy ``HeE2eReader``): the first series that parses
                       as an OCT volume; ``meta['n_volumes_in_file']`` counts the OCT series
``.xml``               HEYEX XML export (eyepy ``HeXmlReader``; B-scan images next to the XML)
``.fds``               Topcon (oct-converter ``FDS``; optional extra ``retflow[vendor-oct]``)
``.img``               Zeiss Cirrus raw cube (oct-converter ``IMG``; same extra). The file carries
                       no geometry: depth x A-scans is taken from the size of the known Cirrus
                       cubes (:data:`CIRRUS_CUBES`), default *Macular Cube 512x128*
                       (1024 x 512 per B-scan, 128 B-scans)
``.dcm`` / ``.dicom``  DICOM (pydicom): multi-frame -> (frames, H, W), single frame -> 1 B-scan
``.nii`` / ``.nii.gz`` NIfTI (nibabel). retflow convention: array axes (x, y, z) =
                       (A-scan, depth, B-scan), transposed here to (z, y, x)
``.npy`` / ``.npz``    (n, H, W) already; npz: key ``volume`` if present, else the first array
directory              B-scan images (PNG/JPEG/TIFF/BMP) sorted naturally by the numbers in their
                       names; a directory holding exactly one ``.xml`` is read as a HEYEX export
=====================  ==========================================================================

``meta`` never carries patient name, id, birth date or any other DICOM patient tag: it is built
from a whitelist (format, laterality 'R'/'L'/'', scan_pattern, n_bscans, scale_x/y/z in mm where
the file states them, and a few per-format counts), never copied from a reader's metadata.
"""

from __future__ import annotations

import contextlib
import io as _io
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retflow.data.io import UnreadableInput, check_file

VENDOR_OCT_HINT = "pip install 'retflow[vendor-oct]'"

#: every quarantine reason read_volume can raise
REASONS = (
    "missing_file",               # path does not exist (or a broken symbolic link)
    "not_a_file",                 # a device, FIFO or socket, or a link to one (never opened)
    "unreadable",                 # the path cannot be examined (e.g. permission denied)
    "zero_bytes",                 # empty file
    "unsupported_volume_format",  # extension not handled
    "reader_not_installed",       # .fds/.img without oct-converter
    "unreadable_volume",          # the reader refused or crashed on the file (detail: exception)
    "unsupported_scan_pattern",   # reader refuses the scan pattern (e.g. one circular B-scan)
    "no_pixel_data",              # DICOM without pixel data
    "unsupported_compression",    # DICOM transfer syntax with no decoder installed
    "wrong_shape",                # not 2-D/3-D, or B-scans of different sizes in a folder
    "empty_volume",               # 0 B-scans (or a zero-length axis)
    "non_numeric",                # array of strings/objects/complex numbers
    "non_finite",                 # NaN or inf values
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

#: Zeiss Cirrus raw cubes: (name, depth rows, A-scans per B-scan, B-scans); the first is the
#: default used when the file size matches none of them exactly.
CIRRUS_CUBES = (
    ("Macular Cube 512x128", 1024, 512, 128),
    ("Macular/Optic Disc Cube 200x200", 1024, 200, 200),
)

#: Heidelberg scan pattern codes (VOL header / E2E B-scan meta) -> retflow names
HEYEX_SCAN_PATTERNS = {0: "", 1: "line", 2: "circle", 3: "volume", 4: "volume", 5: "radial"}
#: Topcon IMG_SCAN scan_mode -> retflow names
TOPCON_SCAN_MODES = {2: "volume", 3: "radial", 4: "cross"}

_QUIET_LOGGERS = ("eyepy", "oct_converter", "pydicom", "nibabel", "imageio", "PIL")


@dataclass
class OctVolume:
    """An OCT volume: ``data`` is (n_bscans, H, W), ``meta`` only safe technical fields."""

    data: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# public API


def read_volume(path: Path | str) -> OctVolume:
    """Read an OCT volume of any supported format as (n_bscans, H, W); see the module doc.

    Raises :class:`UnreadableInput` (never anything else) for a file that cannot be used.
    """
    path = Path(path)
    check_file(path, directory_ok=True)  # a device, FIFO or socket (or a link to one) is never opened
    if path.is_dir():
        reader, fmt = _read_directory, "bscan_folder"
    else:
        reader, fmt = _dispatch(path)
    try:
        with _quiet():
            data, meta = reader(path)
    except UnreadableInput:
        raise
    except Exception as exc:  # a reader refusing a file is a quarantine reason, never a crash
        raise _refusal(path, exc) from None
    data = _validated(path, data)
    return OctVolume(data, _safe_meta({"format": fmt, **meta}, data))


def central_bscans(volume: np.ndarray | OctVolume, k: int) -> list[tuple[int, np.ndarray]]:
    """The ``k`` B-scans around the volume's centre (the fovea in macular scans), with indices.

    ``start = (n - k) // 2``; ``k`` is clipped to ``[0, n]``.
    """
    if isinstance(volume, OctVolume):
        volume = volume.data
    n = volume.shape[0]
    k = max(0, min(int(k), n))
    start = (n - k) // 2
    return [(i, volume[i]) for i in range(start, start + k)]


def write_nifti(path: Path | str, data: np.ndarray,
                scale: tuple[float, float, float] | None = None) -> Path:
    """Write an (n_bscans, H, W) volume as NIfTI with retflow's axis convention.

    Stored array axes are (x, y, z) = (A-scan, depth, B-scan); ``scale`` is the optional voxel
    size (x, y, z) in mm, written to the header and the affine.
    """
    import nibabel as nib

    data = np.asarray(data)
    if data.ndim != 3:
        raise ValueError(f"expected (n_bscans, H, W), got shape {data.shape}")
    affine = np.eye(4)
    if scale is not None:
        affine[:3, :3] = np.diag([float(s) for s in scale])
    img = nib.Nifti1Image(np.transpose(data, (2, 1, 0)), affine)
    if scale is not None:
        img.header.set_zooms(tuple(float(s) for s in scale))
        img.header.set_xyzt_units("mm")
    path = Path(path)
    nib.save(img, str(path))
    return path


# --------------------------------------------------------------------------------------------
# dispatch, validation, error mapping


def _dispatch(path: Path):
    name = path.name.lower()
    table = (
        ((".nii.gz", ".nii"), _read_nifti, "nifti"),
        ((".npy",), _read_npy, "npy"),
        ((".npz",), _read_npz, "npz"),
        ((".vol",), _read_heyex_vol, "heyex_vol"),
        ((".e2e",), _read_heyex_e2e, "heyex_e2e"),
        ((".xml",), _read_heyex_xml, "heyex_xml"),
        ((".dcm", ".dicom"), _read_dicom, "dicom"),
        ((".fds",), _read_topcon_fds, "topcon_fds"),
        ((".img",), _read_zeiss_img, "zeiss_img"),
    )
    for suffixes, reader, fmt in table:
        if name.endswith(suffixes):
            return reader, fmt
    raise UnreadableInput(path, "unsupported_volume_format", "".join(path.suffixes) or path.name)


def _refusal(path: Path, exc: Exception) -> UnreadableInput:
    msg = str(exc).strip().replace("\n", " ")
    if len(msg) > 300:
        msg = msg[:297] + "..."
    detail = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    if re.search(r"does not support scan pattern|unsupported scan pattern", msg, re.I):
        return UnreadableInput(path, "unsupported_scan_pattern", msg)
    return UnreadableInput(path, "unreadable_volume", detail)


def _validated(path: Path, data: Any) -> np.ndarray:
    data = np.asarray(data)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    if data.dtype.kind not in "iuf":
        raise UnreadableInput(path, "non_numeric", f"dtype {data.dtype}")
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise UnreadableInput(path, "wrong_shape", f"{data.ndim}-D array {data.shape}, expected 2-D/3-D")
    if data.shape[0] == 0 or data.size == 0:
        raise UnreadableInput(path, "empty_volume", f"shape {data.shape}")
    if data.dtype.kind == "f":
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if bad:
            raise UnreadableInput(path, "non_finite", f"{bad} NaN/inf values")
    return np.ascontiguousarray(data)


_META_KEYS = ("format", "laterality", "scan_pattern", "n_bscans", "scale_x", "scale_y", "scale_z",
              "n_volumes_in_file", "volume_index", "cirrus_protocol")


def _safe_meta(meta: dict, data: np.ndarray) -> dict:
    """Whitelist of technical fields; anything else a reader produced is dropped."""
    out: dict[str, Any] = {
        "format": str(meta.get("format", "")),
        "laterality": _laterality(meta.get("laterality")),
        "scan_pattern": str(meta.get("scan_pattern") or ""),
        "n_bscans": int(data.shape[0]),
    }
    for key in ("scale_x", "scale_y", "scale_z"):
        value = meta.get(key)
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue
        if np.isfinite(value) and value > 0:
            out[key] = value
    for key in ("n_volumes_in_file", "volume_index"):
        if meta.get(key) is not None:
            out[key] = int(meta[key])
    if meta.get("cirrus_protocol"):
        out["cirrus_protocol"] = str(meta["cirrus_protocol"])
    assert set(out) <= set(_META_KEYS)
    return out


def _laterality(value: Any) -> str:
    if value is None:
        return ""
    text = str(value).strip().upper().rsplit(".", 1)[-1]
    if text in ("R", "OD", "RIGHT"):
        return "R"
    if text in ("L", "OS", "LEFT"):
        return "L"
    return ""


@contextlib.contextmanager
def _quiet():
    """Silence the readers' warnings and logging (and stray prints) for one read."""
    saved = []
    for name in _QUIET_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level))
        logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with np.errstate(all="ignore"), contextlib.redirect_stdout(_io.StringIO()):
                yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def _eyepy_meta(ev, **extra) -> dict:
    """Safe fields of an eyepy EyeVolume's meta (scales only when given in mm)."""
    meta = ev.meta
    out = {"laterality": meta.get("laterality"), **extra}
    if str(meta.get("scale_unit", "")).lower() == "mm":
        for key in ("scale_x", "scale_y", "scale_z"):
            out[key] = meta.get(key)
    return out


# --------------------------------------------------------------------------------------------
# readers: each returns (array, meta) and may raise anything; read_volume maps the errors


def _read_nifti(path: Path):
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
    while data.ndim > 3 and data.shape[-1] == 1:  # (x, y, z, 1): singleton time/channel axis
        data = data[..., 0]
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise UnreadableInput(path, "wrong_shape", f"NIfTI with {data.ndim} dims {data.shape}")
    meta: dict[str, Any] = {}
    try:
        unit = img.header.get_xyzt_units()[0]
        factor = {"mm": 1.0, "micron": 1e-3, "meter": 1e3}.get(unit)
        if factor is not None:
            zooms = img.header.get_zooms()[:3]
            meta.update(scale_x=zooms[0] * factor, scale_y=zooms[1] * factor,
                        scale_z=zooms[2] * factor)
    except Exception:  # the header's spacing is optional information
        pass
    return np.transpose(data, (2, 1, 0)), meta


def _read_npy(path: Path):
    return np.load(path, allow_pickle=False), {}


def _read_npz(path: Path):
    with np.load(path, allow_pickle=False) as z:
        if not z.files:
            raise UnreadableInput(path, "empty_volume", "npz holds no arrays")
        return z["volume" if "volume" in z.files else z.files[0]], {}


def _read_heyex_vol(path: Path):
    from eyepy.io import HeVolReader  # what eyepy.import_heyex_vol wraps; gives the scan pattern

    reader = HeVolReader(path)
    pattern = HEYEX_SCAN_PATTERNS.get(int(reader.parsed_file.scan_pattern), "")
    ev = reader.volume
    return ev.data, _eyepy_meta(ev, scan_pattern=pattern)


def _read_heyex_xml(path: Path):
    from eyepy.io import HeXmlReader  # what eyepy.import_heyex_xml wraps

    reader = HeXmlReader(path)
    series_type = reader.xml_root[0].find("./Patient/Study/Series/Type")
    pattern = (series_type.text or "").strip().lower() if series_type is not None else ""
    ev = reader.volume
    return ev.data, _eyepy_meta(ev, scan_pattern=pattern)


def _read_heyex_e2e(path: Path):
    from eyepy.io import HeE2eReader
    from eyepy.io.he.e2e_format import TypesEnum

    reader = HeE2eReader(path)
    series = reader.series
    oct_series = [s for s in series
                  if any(TypesEnum.bscanmeta in sl.folders for sl in s.slices.values())]
    if not oct_series:
        raise UnreadableInput(path, "empty_volume", f"E2E file holds no OCT series ({len(series)} series)")
    errors: list[Exception] = []
    with reader:
        for index, s in enumerate(oct_series):
            try:
                ev = s.get_volume()
            except Exception as exc:  # try the next series, report the first refusal if none parse
                errors.append(exc)
                continue
            try:
                pattern = HEYEX_SCAN_PATTERNS.get(int(ev.meta["bscan_meta"][0]["scan_pattern"]), "")
            except Exception:
                pattern = ""
            return ev.data, _eyepy_meta(ev, scan_pattern=pattern,
                                        n_volumes_in_file=len(oct_series), volume_index=index)
    raise errors[0]


def _read_dicom(path: Path):
    import pydicom
    from pydicom.pixels import get_decoder

    ds = pydicom.dcmread(str(path))
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise UnreadableInput(path, "no_pixel_data", str(getattr(ds, "SOPClassUID", "")))
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is not None and tsyntax.is_compressed:
        try:
            decoder = get_decoder(tsyntax)
        except NotImplementedError:
            raise UnreadableInput(path, "unsupported_compression",
                                  f"{tsyntax.name}: pydicom has no decoder") from None
        if not decoder.is_available:
            raise UnreadableInput(path, "unsupported_compression",
                                  f"{tsyntax.name}: install one of "
                                  + "; ".join(decoder.missing_dependencies))
    data = ds.pixel_array
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if samples > 1 and data.shape[-1] == samples:  # colour frames -> grey
        data = data.mean(axis=-1)
    meta: dict[str, Any] = {
        "laterality": getattr(ds, "ImageLaterality", None) or getattr(ds, "Laterality", None),
    }
    spacing, thickness = _dicom_spacing(ds)
    if spacing is not None:  # PixelSpacing = (row spacing, column spacing) = (depth, A-scan)
        meta.update(scale_y=spacing[0], scale_x=spacing[1])
    if thickness is not None:
        meta["scale_z"] = thickness
    return data, meta


def _dicom_spacing(ds):
    """(PixelSpacing, SliceThickness) from the shared functional groups or the top level."""
    spacing = thickness = None
    try:
        measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        spacing = [float(v) for v in measures.PixelSpacing]
        thickness = float(measures.SliceThickness) if "SliceThickness" in measures else None
    except Exception:
        pass
    try:
        if spacing is None and "PixelSpacing" in ds:
            spacing = [float(v) for v in ds.PixelSpacing]
        if thickness is None and "SliceThickness" in ds:
            thickness = float(ds.SliceThickness)
    except Exception:
        pass
    return spacing, thickness


def _oct_converter(path: Path, name: str):
    try:
        import oct_converter.readers as readers
    except Exception as exc:  # ImportError, or a broken optional dependency (cv2, ffmpeg...)
        raise UnreadableInput(path, "reader_not_installed",
                              f"oct-converter is needed for {path.suffix} files: {VENDOR_OCT_HINT}"
                              f" ({type(exc).__name__}: {exc})") from None
    return getattr(readers, name)


class _NumpyFromstringCompat:
    """numpy proxy restoring binary ``np.fromstring`` (removed in NumPy 2.3), which
    oct-converter 0.7.0's FDS reader still calls; everything else is numpy itself."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def fromstring(string, dtype=float, count=-1, *, sep="", **kwargs):
        if sep == "":
            return np.frombuffer(string, dtype=dtype, count=count).copy()
        return np.fromstring(string, dtype=dtype, count=count, sep=sep, **kwargs)


@contextlib.contextmanager
def _fromstring_compat(module):
    try:
        np.fromstring(b"\0", dtype=np.uint8)
        needed = False
    except Exception:
        needed = True
    if not needed or getattr(module, "np", None) is not np:
        yield
        return
    module.np = _NumpyFromstringCompat()
    try:
        yield
    finally:
        module.np = np


def _read_topcon_fds(path: Path):
    FDS = _oct_converter(path, "FDS")
    import sys

    with _fromstring_compat(sys.modules[FDS.__module__]):
        oct_volume = FDS(path).read_oct_volume()
    data = np.stack([np.asarray(b) for b in oct_volume.volume], axis=0)
    meta: dict[str, Any] = {"laterality": oct_volume.laterality}
    header = getattr(oct_volume, "oct_header", None) or {}
    meta["scan_pattern"] = TOPCON_SCAN_MODES.get(header.get("scan_mode"), "")
    spacing = oct_volume.pixel_spacing  # (A-scan width, B-scan spacing, depth) in mm
    if spacing is not None and len(spacing) == 3:
        meta.update(scale_x=spacing[0], scale_z=spacing[1], scale_y=spacing[2])
    return data, meta


def _read_zeiss_img(path: Path):
    IMG = _oct_converter(path, "IMG")
    size = path.stat().st_size
    name, rows, cols, n = next(((c[0], c[1], c[2], c[3]) for c in CIRRUS_CUBES
                                if c[1] * c[2] * c[3] == size), CIRRUS_CUBES[0])
    if size % (rows * cols):
        raise UnreadableInput(path, "unreadable_volume",
                              f"{size} bytes is not a whole number of {rows}x{cols} B-scans "
                              f"(assumed {name}; known cubes: "
                              + ", ".join(c[0] for c in CIRRUS_CUBES) + ")")
    oct_volume = IMG(path).read_oct_volume(rows=rows, cols=cols)
    data = np.stack([np.asarray(b) for b in oct_volume.volume], axis=0)
    return data, {"laterality": oct_volume.laterality, "scan_pattern": "volume",
                  "cirrus_protocol": name}


def _natural_key(p: Path):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", p.name)]


def _read_directory(path: Path):
    xmls = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".xml"]
    if len(xmls) == 1:  # a HEYEX XML export folder (B-scans + localizer next to the XML)
        data, meta = _read_heyex_xml(xmls[0])
        return data, {"format": "heyex_xml", **meta}
    files = sorted((p for p in path.iterdir()
                    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                    and not p.name.startswith(".")), key=_natural_key)
    if not files:
        raise UnreadableInput(path, "empty_volume", "folder holds no B-scan images")
    from PIL import Image

    bscans = []
    for p in files:
        try:
            with Image.open(p) as im:
                im.load()
                if im.mode not in ("L", "I;16", "I;16L", "I;16B", "I", "F"):
                    im = im.convert("L")
                bscans.append(np.asarray(im))
        except Exception as exc:
            raise UnreadableInput(path, "unreadable_volume",
                                  f"{p.name}: {type(exc).__name__}: {exc}") from None
    shapes = sorted({b.shape for b in bscans})
    if len(shapes) > 1:
        raise UnreadableInput(path, "wrong_shape", f"B-scans differ in size: {shapes[:4]}")
    return np.stack(bscans, axis=0), {}
