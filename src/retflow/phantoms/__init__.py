"""Procedural retinal phantoms: colour fundus photos, OCT B-scans and volumes, device styles.

Public API::

    make_cfp(rng, size, dr_grade, cdr, eye="R", style="A") -> uint8 (H, W, 3)
    make_oct_bscan(rng, shape=(H, W), diagnosis="normal", style="A", position=0.0) -> (uint8 (H, W), signs)
    make_oct_volume(rng, n_slices, shape, diagnosis="normal", style="A") -> (uint8 (N, H, W), signs)
    sample_offcentre_eye(rng, positions, lesion, foveal_drusen) -> OctEye  (kind oct_offcentre)
    apply_style(img, style, rng, modality=None) -> uint8
    generate_dataset(kind, out_dir, n, seed, style="A", size=128, n_slices=9, labelled=True) -> DataFrame

``generate_dataset`` is loaded lazily so that ``python -m retflow.phantoms.generate`` does not
import its own module twice.
"""

from .cfp import cfp_shape, make_cfp
from .oct import DIAGNOSES, KEY_SIGNS, OctEye, make_oct_bscan, make_oct_volume, render_bscan, sample_oct_eye
from .offcentre import sample_offcentre_eye
from .style import STYLES, DeviceStyle, apply_style, get_style

__all__ = [
    "make_cfp", "cfp_shape", "make_oct_bscan", "make_oct_volume", "sample_oct_eye", "render_bscan",
    "OctEye", "DIAGNOSES", "KEY_SIGNS", "sample_offcentre_eye", "apply_style", "get_style", "DeviceStyle", "STYLES",
    "generate_dataset",
]


def __getattr__(name: str):
    if name == "generate_dataset":
        from .generate import generate_dataset

        return generate_dataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
