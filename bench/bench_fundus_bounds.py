"""Compare retflow's fundus-field detection with retinalysis-fundusprep on a folder of CFPs.

Example (from the repo root, HRF images next to the checkout)::

    .venv/bin/python bench/bench_fundus_bounds.py                    # needs .venv-fundusprep
    .venv/bin/python bench/bench_fundus_bounds.py --create-venv      # creates it first

fundusprep (AGPL-3.0) runs in its own venv through ``bench/fundusprep_bounds.py`` as a
subprocess; it is never imported here. For every image both field masks are drawn as
circle ∩ crop box (∩ image) and compared by IoU; the seconds per image (bounds detection
only, decoding excluded, one thread each, same session) are reported as a ratio.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # single-threaded timings on both sides

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from retflow.data.fundus import FundusField, detect_field, mask_from_field  # noqa: E402

EXTS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "real" / "hrf" / "images"
DEFAULT_VENV = ROOT / ".venv-fundusprep"
REQUIREMENTS = ROOT / "bench" / "requirements-fundusprep.txt"


def create_venv(venv: Path) -> None:
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-r", str(REQUIREMENTS)], check=True)


def their_field(rec: dict) -> FundusField:
    """fundusprep's circle + crop box as a FundusField (same mask semantics: circle ∩ box)."""
    h, w = rec["shape"]
    t, b, l, r = rec["bounds"]
    t, b, l, r = max(t, 0), min(b, h), max(l, 0), min(r, w)
    return FundusField(bounds=(t, b, l, r), center=tuple(rec["center"]), radius=rec["radius"],
                       mask_fraction=float("nan"), found=not rec["full_frame_fallback"], shape=(h, w))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="fundusprep venv")
    ap.add_argument("--create-venv", action="store_true", help="create the venv if missing")
    ap.add_argument("--limit", type=int, default=0, help="only the first N images")
    ap.add_argument("--json", type=Path, help="also write per-image figures here (JSON)")
    args = ap.parse_args(argv)

    if not args.images.is_dir():
        print(f"no images at {args.images}", file=sys.stderr)
        return 1
    py = args.venv / "bin" / "python"
    if not py.exists():
        if not args.create_venv:
            print(f"fundusprep venv not found at {args.venv}; create it with\n"
                  f"  python3 -m venv {args.venv} && {args.venv}/bin/pip install -r {REQUIREMENTS}\n"
                  "or pass --create-venv", file=sys.stderr)
            return 1
        create_venv(args.venv)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fundusprep.jsonl"
        cmd = [str(py), str(ROOT / "bench" / "fundusprep_bounds.py"), str(args.images),
               "--out", str(out), "--threads", "1"]
        if args.limit:
            cmd += ["--limit", str(args.limit)]
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": ""})
        theirs = {rec["image"]: rec for rec in map(json.loads, out.read_text().splitlines())}

    files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in EXTS)
    if args.limit:
        files = files[: args.limit]
    detect_field(np.zeros((64, 64, 3), np.uint8))  # warm imports
    rows = []
    print(f"{'image':<14} {'IoU':>7} {'r ours':>8} {'r theirs':>8} {'dcentre':>7} "
          f"{'s ours':>7} {'s theirs':>8}")
    for path in files:
        rec = theirs.get(path.name)
        if rec is None:
            continue
        img = np.asarray(Image.open(path).convert("RGB"))
        t0 = time.perf_counter()
        ours = detect_field(img)
        sec = time.perf_counter() - t0
        th = their_field(rec)
        a, b = mask_from_field(img.shape, ours), mask_from_field(img.shape, th)
        iou = np.count_nonzero(a & b) / max(np.count_nonzero(a | b), 1)
        dc = float(np.hypot(ours.center[0] - th.center[0], ours.center[1] - th.center[1]))
        rows.append({"image": path.name, "iou": iou, "ours_found": ours.found,
                     "theirs_found": th.found, "ours_radius": ours.radius,
                     "theirs_radius": th.radius, "centre_distance": dc,
                     "ours_bounds": list(ours.bounds), "theirs_bounds": list(th.bounds),
                     "ours_s": sec, "theirs_s": rec["seconds"]})
        print(f"{path.name:<14} {iou:7.4f} {ours.radius:8.1f} {th.radius:8.1f} {dc:7.1f} "
              f"{sec:7.3f} {rec['seconds']:8.3f}")
    if not rows:
        print("no images compared", file=sys.stderr)
        return 1
    ious = np.array([r["iou"] for r in rows])
    s_ours = np.array([r["ours_s"] for r in rows])
    s_theirs = np.array([r["theirs_s"] for r in rows])
    print(f"\n{len(rows)} images; IoU mean {ious.mean():.4f} min {ious.min():.4f} "
          f"({rows[int(ious.argmin())]['image']}); found ours {sum(r['ours_found'] for r in rows)}"
          f" theirs {sum(r['theirs_found'] for r in rows)}")
    print(f"seconds/image (median, mean): ours {np.median(s_ours):.3f}, {s_ours.mean():.3f}; "
          f"fundusprep {np.median(s_theirs):.3f}, {s_theirs.mean():.3f}; "
          f"ratio fundusprep/ours (median) {np.median(s_theirs) / np.median(s_ours):.1f}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
