"""Reading 2-D images, with every failure classified into a quarantine reason.

OCT volumes are read by :mod:`retflow.data.volumes`; both raise :class:`UnreadableInput`.

Only regular files are read. A symbolic link is followed (symlink farms are how clusters share
datasets): a link to a regular file is read like the file, and its ``sha256`` is the target's
content; a device (``/dev/zero``), FIFO, socket or directory -- or a link to one -- is refused as
``not_a_file`` before anything opens it (:func:`check_file`), and every open re-checks the opened
descriptor (:func:`open_regular`), so such a file is never read (it would hang or fill memory).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# PIL modes and how they become uint8 (H, W) or (H, W, 3)
GRAY_MODES = {"L", "1", "LA", "La"}
COLOUR_MODES = {"RGB", "RGBA", "RGBa", "RGBX", "P", "PA", "CMYK", "YCbCr"}
HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


class UnreadableInput(Exception):
    """An input file that cannot be used; ``reason`` is a short quarantine code."""

    def __init__(self, path: Path | str, reason: str, detail: str = ""):
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{path}: {reason}{' (' + detail + ')' if detail else ''}")


def _kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, words in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                        (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return words
    return "a special file"


def _not_regular(path: Path | str, mode: int) -> UnreadableInput:
    link = f"symbolic link to {os.readlink(path)}, " if os.path.islink(path) else ""
    return UnreadableInput(path, "not_a_file", f"{link}{_kind(mode)}, not a regular file")


def _regular_opener(path: str, flags: int) -> int:
    """``open()``'s opener: never blocks on a FIFO, refuses anything but a regular file."""
    fd = os.open(path, flags | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular(path: Path | str):
    """``open(path, "rb")`` for a regular file (links followed); :class:`UnreadableInput`
    ``not_a_file`` for anything else, decided on the opened descriptor."""
    return open(path, "rb", opener=_regular_opener)


def sha256_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open_regular(path) as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_digest(path: Path | str) -> str:
    """sha256 of a file, or of a folder's files (names and bytes, sorted) for B-scan folders."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f.relative_to(path).as_posix().encode())
        digest.update(bytes.fromhex(sha256_file(f)))
    return digest.hexdigest()


def check_file(path: Path | str, directory_ok: bool = False) -> None:
    """Raise the quarantine reason for a path that is not a non-empty regular file (links are
    followed; ``directory_ok``: a folder is fine too, e.g. a folder of B-scans). Nothing is opened."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        broken = f"broken symbolic link to {os.readlink(path)}" if os.path.islink(path) else ""
        raise UnreadableInput(path, "missing_file", broken) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnreadableInput(path, "not_a_file", "a loop of symbolic links") from None
        raise UnreadableInput(path, "unreadable", f"{type(exc).__name__}: {exc.strerror}") from None
    if directory_ok and stat.S_ISDIR(st.st_mode):
        return
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st.st_mode)
    if st.st_size == 0:
        raise UnreadableInput(path, "zero_bytes")


def _to_array(im: Image.Image, path: Path) -> np.ndarray:
    mode = im.mode
    if mode in HIGH_DEPTH_MODES:
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        return np.clip((arr - lo) * scale, 0, 255).astype(np.uint8)
    if mode in GRAY_MODES:
        return np.asarray(im.convert("L"), dtype=np.uint8)
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if mode in COLOUR_MODES or im.mode in COLOUR_MODES:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    raise UnreadableInput(path, "wrong_mode", f"PIL mode {mode}")


def read_image(path: Path | str, draft_size: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Read an image as uint8 (H, W) or (H, W, 3); returns ``(array, (orig_h, orig_w))``.

    16-bit and 32-bit integer images are min/max-scaled to 8 bits, alpha is dropped, palette
    and CMYK are converted to RGB, bilevel masks become 0/255. ``draft_size`` lets JPEG decode at
    a reduced scale that is still at least that many pixels on the short side (much faster for
    large fundus photos that are resized anyway). Multi-frame files (animated GIF, multi-page
    TIFF) are refused: a stack of frames is a volume, not an image.
    """
    path = Path(path)
    check_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open_regular(path) as fh, Image.open(fh) as im:
                orig = (im.height, im.width)
                n_frames = getattr(im, "n_frames", 1)
                if n_frames > 1:
                    raise UnreadableInput(path, "multi_frame", f"{n_frames} frames; declare it as a volume")
                if draft_size and im.format == "JPEG" and min(orig) > draft_size:
                    factor = draft_size / min(orig)  # PIL keeps the decoded size >= the request
                    im.draft(im.mode, (int(np.ceil(orig[1] * factor)), int(np.ceil(orig[0] * factor))))
                im.load()
                return _to_array(im, path), orig
    except UnreadableInput:
        raise
    except UnidentifiedImageError as exc:
        raise UnreadableInput(path, "not_an_image", str(exc)) from None
    except PermissionError as exc:
        raise UnreadableInput(path, "unreadable", f"PermissionError: {exc.strerror}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnreadableInput(path, "too_large", str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        reason = "truncated" if "truncated" in str(exc).lower() else "corrupt"
        raise UnreadableInput(path, reason, f"{type(exc).__name__}: {exc}") from None
