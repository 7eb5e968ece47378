"""Images embedded in the report as ``data:`` URIs, compressed for a small single-file report.

Two kinds, chosen by the caller from what the picture is:

* ``"figure"``: line art from :mod:`retflow.report.figures` (plots, matrices): lossless PNG with
  the alpha channel flattened onto white and the colours reduced to a 256-colour palette (the
  anti-aliased edges of a plot use far fewer; the palette keeps text sharp), optimised deflate.
  The original PNG is kept when that is not smaller.
* ``"photo"``: pictures of images (saliency grids, segmentation overlays, MAE reconstructions,
  synthetic samples, quarantine examples): JPEG at :data:`JPEG_QUALITY`, downscaled to at most
  :data:`MAX_PHOTO_WIDTH` px wide (the report's column; the browser would shrink it anyway, so
  the text in it keeps its displayed size).

Images are shown at their natural size: :func:`embed` gives the URI with the ``width``/``height``
for the ``<img>`` tag (figures are drawn for 1:1 display, see :mod:`retflow.report.figures`).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
from PIL import Image

KINDS = ("figure", "photo")
JPEG_QUALITY = 80
MAX_PHOTO_WIDTH = 1150  # px: figures.MAX_WIDTH_PX, the report's content column


def _open(image) -> Image.Image:
    """A PIL image of PNG/JPEG bytes, a file path, a uint8 array (H, W[, C]) or a PIL image."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            raise ValueError(f"image array must be uint8, got {arr.dtype}")
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
            raise ValueError(f"image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {arr.shape}")
        return Image.fromarray(arr)
    data = Path(image).read_bytes() if isinstance(image, (str, Path)) else bytes(image)
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except Exception as exc:  # noqa: BLE001 - any decoder error means the same to the caller
        raise ValueError(f"image data ({len(data)} bytes) is not a readable PNG/JPEG image: "
                         f"{type(exc).__name__}: {exc}") from None
    return im


def _rgb(im: Image.Image) -> Image.Image:
    """RGB (or L) with any transparency flattened onto white."""
    if im.mode in ("RGB", "L"):
        return im
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA"):
        white = Image.new("RGB", im.size, "white")
        white.paste(im.convert("RGBA"), mask=im.convert("RGBA").getchannel("A"))
        return white
    return im.convert("RGB")


def encode(image, kind: str) -> tuple[str, bytes, tuple[int, int]]:
    """(MIME type, compressed bytes, (width, height)) of ``image`` (PNG/JPEG bytes, a path, a uint8 array or a PIL
    image) as a ``kind`` image (module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"image kind {kind!r}: use one of {KINDS}")
    im = _rgb(_open(image))
    buf = io.BytesIO()
    if kind == "photo":
        if im.width > MAX_PHOTO_WIDTH:
            im = im.resize((MAX_PHOTO_WIDTH, max(1, round(im.height * MAX_PHOTO_WIDTH / im.width))),
                           Image.Resampling.LANCZOS)
        im.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=True, progressive=True)
        return "image/jpeg", buf.getvalue(), im.size
    pal = im if im.mode == "L" else im.quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                                                dither=Image.Dither.NONE)
    pal.save(buf, format="PNG", optimize=True)
    out = buf.getvalue()
    if isinstance(image, (bytes, bytearray)) and bytes(image[:8]) == b"\x89PNG\r\n\x1a\n" and len(image) <= len(out):
        return "image/png", bytes(image), im.size
    return "image/png", out, im.size


def embed(image, kind: str = "figure") -> tuple[str, int, int]:
    """(``data:`` URI, width, height) of ``image`` compressed as a ``kind`` image: the ``src``,
    ``width`` and ``height`` of its ``<img>`` tag (shown 1:1; CSS ``max-width:100%`` shrinks it
    only on a narrow screen)."""
    mime, data, (width, height) = encode(image, kind)
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}", width, height


def data_uri(image, kind: str = "figure") -> str:
    """``data:<mime>;base64,...`` of ``image`` compressed as a ``kind`` image (:func:`encode`)."""
    return embed(image, kind)[0]


def pixel_size(image) -> tuple[int, int]:
    """(width, height) in pixels of ``image`` as given (before any downscaling by :func:`encode`)."""
    return _open(image).size
