"""Write phantom datasets to disk (PNG images / NIfTI volumes + ``labels.csv``).

Layouts (``out_dir`` is e.g. ``results/raw/<dataset>``):

* ``cfp``: ``images/{patient}_{eye}.png`` (RGB, H = size, W = round(1.25 size)); every
  patient has a right and a left eye (with odd ``n`` the last patient has only "R").
  Columns ``image,patient_id,eye,dr_grade,glaucoma,cdr``.
* ``oct``: ``images/{patient}_{eye}_{k}.png`` single grey B-scans of size x size (square so
  that they feed the same square model input as fundus photos), 1-3 per patient, all from the
  same eye, at positions ~ N(0, 0.15) (clipped to +-0.35) around the fovea.  Columns
  ``image,patient_id,eye,diagnosis,drusen,irf,srf,ped``.
* ``oct_volume``: ``volumes/{patient}_{eye}.nii.gz`` uint8 NIfTI, identity affine, array
  axes ``(x, y, z) = (W, H, n_slices)``: ``x`` lateral, ``y`` depth (row 0 = top of the
  B-scan), ``z`` the B-scan index with the fovea at ``z = n_slices // 2``; so
  ``nii.get_fdata()[:, :, k].T`` is B-scan ``k`` as an (H, W) image.  1-2 eyes per patient.
  Columns ``volume,patient_id,eye,diagnosis,drusen,irf,srf,ped`` (key signs: union over slices).
* ``oct_offcentre``: volumes as ``oct_volume`` (needs ``n_slices >= 3``) whose label needs the
  off-centre B-scans (:mod:`retflow.phantoms.offcentre`): ``extrafoveal_irf`` (0/1, about half
  the eyes) = intraretinal cysts over a focal thickening at ``|z| >= 0.4`` only, never in the
  central B-scans; ``foveal_drusen`` (0/1, independent of it) = drusen at ``|z| <= 0.35``, the
  central content both classes share.  Columns ``volume,patient_id,eye,extrafoveal_irf,
  foveal_drusen,irf_slices`` (``irf_slices``: the B-scan indices ``k`` showing a cyst,
  ``;``-separated, empty when none).  1-2 eyes per patient.

With ``labelled=False`` only the id, ``patient_id`` and ``eye`` columns are written (a pool
for self-supervised pretraining).

With ``masks=True`` (``cfp`` and ``oct`` only) every image also gets a segmentation mask
``masks/<same name>.png`` (uint8 grey PNG, pixel value = class index) and a ``mask`` column
``masks/<name>.png`` relative to ``out_dir`` (the labels CSV's folder, as ``mask_column`` paths
are read): ``cfp`` a binary vessel mask (0 background, 1 vessel), ``oct`` a layer label map
(:data:`retflow.phantoms.oct.LAYER_CLASSES`: 0 background, 1 inner retina ILM-OPL, 2 outer
retina ONL-photoreceptor outer segments, 3 RPE).  The masks cost no random numbers, so the
images are identical with and without them.  Everything is reproducible from ``seed``; the style does
not enter the seed, so the same seed under styles A and B gives the same patients imaged by
two devices.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from PIL import Image

from .. import config as rfc
from ..errors import UserError
from .cfp import make_cfp
from .oct import DIAGNOSES, KEY_SIGNS, LAYER_CLASSES, render_bscan, sample_oct_eye
from .offcentre import FOVEAL_DRUSEN_P, POSITIVE_P, sample_offcentre_eye

__all__ = ["generate_dataset", "save_volume", "load_volume", "main", "KINDS", "VOLUME_KINDS", "DR_GRADE_P",
           "GLAUCOMA_P", "MASK_CLASSES"]

# paired_*: retflow.phantoms.paired; the index of a kind enters its seed, so new kinds go last
KINDS = ("cfp", "oct", "oct_volume", "paired_cfp", "paired_oct", "oct_offcentre")
VOLUME_KINDS = rfc.VOLUME_KINDS
DR_GRADE_P = (0.40, 0.15, 0.20, 0.15, 0.10)  # ICDR grade prevalence (per patient)
GLAUCOMA_P = 0.30
CDR_HEALTHY = (0.2, 0.5)
CDR_GLAUCOMA = (0.55, 0.85)
_ID_COLS = {"cfp": "image", "oct": "image", "oct_volume": "volume", "oct_offcentre": "volume"}
MASK_CLASSES = {"cfp": ("background", "vessel"), "oct": LAYER_CLASSES}  # mask value -> class


def _pid(i: int, n: int) -> str:
    return f"P{i:0{max(4, len(str(max(n - 1, 0))))}d}"


def _save_png(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr).save(path, compress_level=1)


def save_volume(vol: np.ndarray, path: Path) -> None:
    """Write a B-scan stack uint8 (n_slices, H, W) as NIfTI with axes (x, y, z) = (W, H, n_slices)."""
    data = np.ascontiguousarray(np.asarray(vol, np.uint8).transpose(2, 1, 0))
    nii = nib.Nifti1Image(data, np.eye(4))
    nii.header.set_data_dtype(np.uint8)
    nib.save(nii, path)


def load_volume(path: Path) -> np.ndarray:
    """Inverse of :func:`save_volume`: uint8 (n_slices, H, W)."""
    data = np.asanyarray(nib.load(path).dataobj)
    return np.ascontiguousarray(data.astype(np.uint8).transpose(2, 1, 0))


def _cfp(out: Path, n: int, ss: np.random.SeedSequence, style: str, size: int, masks: bool = False) -> list[dict]:
    n_pat = (n + 1) // 2
    pop = np.random.default_rng(ss.spawn(1)[0])
    rows = []
    for i, child in enumerate(ss.spawn(n_pat)):
        pid = _pid(i, n_pat)
        grade = int(pop.choice(5, p=DR_GRADE_P))
        glaucoma = int(pop.random() < GLAUCOMA_P)
        eyes = ("R", "L") if 2 * i + 1 < n else ("R",)
        other = int(np.clip(grade + pop.choice([-1, 0, 1], p=[0.2, 0.6, 0.2]), 0, 4))
        for eye, g, rng in zip(eyes, (grade, other), (np.random.default_rng(c) for c in child.spawn(2))):
            cdr = float(pop.uniform(*(CDR_GLAUCOMA if glaucoma else CDR_HEALTHY)))
            name = f"{pid}_{eye}.png"
            img = make_cfp(rng, size, g, cdr, eye, style, vessel_mask=masks)
            if masks:
                img, mask = img
                _save_png(mask, out / "masks" / name)
            _save_png(img, out / "images" / name)
            rows.append(dict(image=name, patient_id=pid, eye=eye, dr_grade=g, glaucoma=glaucoma,
                             cdr=round(cdr, 3), **({"mask": f"masks/{name}"} if masks else {})))
    return rows


def _oct(out: Path, n: int, ss: np.random.SeedSequence, style: str, size: int, masks: bool = False) -> list[dict]:
    pop = np.random.default_rng(ss.spawn(1)[0])
    rows, i = [], 0
    while len(rows) < n:
        pid, rng = _pid(i, n), np.random.default_rng(ss.spawn(1)[0])
        diagnosis, eye = str(pop.choice(DIAGNOSES)), str(pop.choice(["R", "L"]))
        e = sample_oct_eye(rng, diagnosis)
        for k in range(min(int(pop.integers(1, 4)), n - len(rows))):
            pos = float(np.clip(pop.normal(0.0, 0.15), -0.35, 0.35))
            img, signs, *layers = render_bscan(e, rng, (size, size), pos, style, layers=masks)
            name = f"{pid}_{eye}_{k}.png"
            _save_png(img, out / "images" / name)
            extra = {}
            if masks:
                _save_png(layers[0], out / "masks" / name)
                extra = {"mask": f"masks/{name}"}
            rows.append(dict(image=name, patient_id=pid, eye=eye, diagnosis=diagnosis, **signs, **extra))
        i += 1
    return rows


def _volumes(out: Path, n: int, ss: np.random.SeedSequence, style: str, size: int, pos: np.ndarray,
             draw) -> list[dict]:
    """The volume kinds' loop: patients of one or two eyes (the population RNG), each eye with its own RNG,
    ``draw(pop, rng) -> (OctEye, describe)``, its B-scans rendered at ``pos`` and saved as one NIfTI volume,
    its row ``describe(per-B-scan signs)`` (the draws interleave as they always did: phantoms stay bit-identical)."""
    pop = np.random.default_rng(ss.spawn(1)[0])
    rows, i = [], 0
    while len(rows) < n:
        pid = _pid(i, n)
        eyes = ["R", "L"] if pop.random() < 0.5 and n - len(rows) >= 2 else [str(pop.choice(["R", "L"]))]
        for eye in eyes:
            rng = np.random.default_rng(ss.spawn(1)[0])
            e, describe = draw(pop, rng)
            vol = np.empty((len(pos), size, size), np.uint8)
            per_slice = []
            for z, p in enumerate(pos.tolist()):
                vol[z], signs = render_bscan(e, rng, (size, size), p, style)
                per_slice.append(signs)
            name = f"{pid}_{eye}.nii.gz"
            save_volume(vol, out / "volumes" / name)
            rows.append(dict(volume=name, patient_id=pid, eye=eye, **describe(per_slice)))
        i += 1
    return rows


def _oct_volume(out: Path, n: int, ss: np.random.SeedSequence, style: str, size: int,
                n_slices: int) -> list[dict]:
    def draw(pop, rng):
        diagnosis = str(pop.choice(DIAGNOSES))
        return sample_oct_eye(rng, diagnosis), lambda per_slice: dict(
            diagnosis=diagnosis, **{k: max([0, *(s[k] for s in per_slice)]) for k in KEY_SIGNS})

    pos = np.linspace(-1.0, 1.0, n_slices) if n_slices > 1 else np.zeros(1)
    return _volumes(out, n, ss, style, size, pos, draw)


def _oct_offcentre(out: Path, n: int, ss: np.random.SeedSequence, style: str, size: int,
                   n_slices: int) -> list[dict]:
    pos = np.linspace(-1.0, 1.0, n_slices)

    def draw(pop, rng):
        lesion, drusen = bool(pop.random() < POSITIVE_P), bool(pop.random() < FOVEAL_DRUSEN_P)
        return sample_offcentre_eye(rng, pos, lesion, drusen), lambda per_slice: dict(
            extrafoveal_irf=int(lesion), foveal_drusen=int(drusen),
            irf_slices=";".join(str(z) for z, s in enumerate(per_slice) if s["irf"]))

    return _volumes(out, n, ss, style, size, pos, draw)


def generate_dataset(
    kind: str, out_dir: Path, n: int, seed: int, style: str = "A", size: int = 128,
    n_slices: int = 9, labelled: bool = True, masks: bool = False,
) -> pd.DataFrame:
    """Generate ``n`` images (``cfp``, ``oct``) or volumes (``oct_volume``, ``oct_offcentre``) under ``out_dir``.

    Writes the files and ``out_dir/labels.csv`` (layout in the module docstring) and returns
    the labels table as written.  ``masks``: also write segmentation masks (``cfp``, ``oct`` only).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if masks and kind not in MASK_CLASSES:
        raise ValueError(f"masks are generated for kinds {sorted(MASK_CLASSES)}, not {kind!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if kind == "oct_offcentre" and n_slices < 3:
        raise UserError(f"n_slices: phantom kind oct_offcentre needs >= 3 B-scans per volume (a central one "
                        f"and off-centre ones), got {n_slices}; set phantom.n_slices to 3 or more")
    if kind.startswith("paired_"):  # the same eyes for both kinds: one seed, no kind in it
        from .paired import generate_paired

        return generate_paired(kind, Path(out_dir), n, seed, style, size)
    out = Path(out_dir)
    (out / ("volumes" if kind in VOLUME_KINDS else "images")).mkdir(parents=True, exist_ok=True)
    if masks:
        (out / "masks").mkdir(parents=True, exist_ok=True)
    ss = np.random.SeedSequence([int(seed), KINDS.index(kind)])
    if kind == "cfp":
        rows = _cfp(out, n, ss, style, size, masks)
    elif kind == "oct":
        rows = _oct(out, n, ss, style, size, masks)
    elif kind == "oct_volume":
        rows = _oct_volume(out, n, ss, style, size, n_slices)
    else:
        rows = _oct_offcentre(out, n, ss, style, size, n_slices)
    table = pd.DataFrame(rows)
    if not labelled:
        table = table[[_ID_COLS[kind], "patient_id", "eye", *(["mask"] if masks else [])]]
    table.to_csv(out / "labels.csv", index=False)
    return table


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m retflow.phantoms.generate --kind cfp --n 300 --seed 1 --out DIR``."""
    ap = argparse.ArgumentParser(prog="python -m retflow.phantoms.generate",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--kind", choices=KINDS, required=True)
    ap.add_argument("--n", type=int, required=True, help="number of images (cfp, oct) or volumes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--style", choices=("A", "B"), default="A", help="imaging device")
    ap.add_argument("--size", type=int, default=128, help="image height in pixels")
    ap.add_argument("--n-slices", type=int, default=9, help="B-scans per volume (oct_volume, oct_offcentre)")
    ap.add_argument("--unlabelled", action="store_true", help="write only id/patient/eye columns")
    ap.add_argument("--masks", action="store_true", help="also write segmentation masks (cfp, oct)")
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    table = generate_dataset(a.kind, a.out, a.n, a.seed, a.style, a.size, a.n_slices, not a.unlabelled, a.masks)
    dt = time.perf_counter() - t0
    what = "volumes" if a.kind in VOLUME_KINDS else "images"
    print(f"phantoms: {len(table)} {a.kind} {what} of {table['patient_id'].nunique()} patients "
          f"(style {a.style}, size {a.size}) -> {a.out} in {dt:.1f}s ({len(table) / dt:.0f}/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
