"""Fundus-field bounds from retinalysis-fundusprep, one JSON line per image (optional benchmark).

Runs ONLY in the separate venv ``.venv-fundusprep`` (see bench/README.md): fundusprep is
AGPL-3.0 and pins pandas<3 / Pillow<13, so it is never imported by retflow or its tests.
``bench/bench_fundus_bounds.py`` calls this script as a subprocess and compares the output
with :func:`retflow.data.fundus.detect_field`.

Usage::

    .venv-fundusprep/bin/python bench/fundusprep_bounds.py IMAGE_DIR [--out FILE.jsonl]

Each line: image name, shape (h, w), circle centre (cy, cx) and radius, the crop box
(min_y, max_y, min_x, max_x; end-exclusive), whether fundusprep fell back to the full frame,
and the seconds spent in its bounds detection (JPEG decoding excluded).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

EXTS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("images", type=Path, help="folder of fundus photographs")
    ap.add_argument("--out", type=Path, help="JSON-lines output (default: stdout)")
    ap.add_argument("--threads", type=int, default=1, help="OpenCV threads (default 1)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N images")
    args = ap.parse_args(argv)

    import cv2
    from rtnls_fundusprep.cfi_bounds import full_frame_center_and_radius
    from rtnls_fundusprep.mask_extraction import get_cfi_bounds

    cv2.setNumThreads(args.threads)
    files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in EXTS)
    if args.limit:
        files = files[: args.limit]
    out = open(args.out, "w") if args.out else sys.stdout
    try:
        for path in files:
            img = np.array(Image.open(path).convert("RGB"))
            t0 = time.perf_counter()
            b = get_cfi_bounds(img)  # returns the full-frame bounds when detection fails
            seconds = time.perf_counter() - t0
            h, w = img.shape[:2]
            (fcx, fcy), fr = full_frame_center_and_radius(h, w)
            rec = {
                "image": path.name,
                "shape": [h, w],
                "center": [float(b.cy), float(b.cx)],
                "radius": float(b.radius),
                "bounds": [int(b.min_y), int(b.max_y), int(b.min_x), int(b.max_x)],
                "full_frame_fallback": bool(
                    np.isclose(b.cx, fcx) and np.isclose(b.cy, fcy) and np.isclose(b.radius, fr)
                ),
                "seconds": seconds,
            }
            out.write(json.dumps(rec) + "\n")
            out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
