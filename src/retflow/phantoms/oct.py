"""OCT B-scan and volume phantoms.

A B-scan is a depth (rows) x lateral (columns) image: dark speckled vitreous, a gently curved
retina of ten bands with different reflectivity (bright NFL, dark nuclear layers, bright
ellipsoid zone, very bright RPE), a textured choroid below, and a foveal pit.  Diagnoses:

* ``normal``;
* ``drusen``: dome-shaped RPE elevations over sub-RPE material (large ones: drusenoid PED);
* ``dme``: intraretinal cysts (dark round/oval spaces in INL/ONL) + retinal thickening,
  hyperreflective foci, sometimes subretinal fluid;
* ``cnv``: irregular fibrovascular PED with heterogeneous material, usually a dark lens of
  subretinal fluid with hyperreflective material, sometimes intraretinal cysts or drusen.

Geometry is drawn once per eye (:func:`sample_oct_eye`) in normalised units -- lateral
``u`` in [-1, 1] across the scan, depth as a fraction of the image height, and ``z`` the
B-scan position in [-1, 1] (0 = through the fovea) -- and each B-scan is a cross-section
(:func:`render_bscan`), so slices of one volume agree.  A lesion centred at ``z0`` with
half-extent ``rz`` is seen in slice ``z`` scaled by ``sqrt(1 - ((z - z0) / rz)^2)``.
The key-sign dict of a B-scan reports what is visible in *that* slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter1d

from .style import DeviceStyle, finish_oct, get_style, quantile_noise, smooth_noise

__all__ = ["DIAGNOSES", "KEY_SIGNS", "LAYER_CLASSES", "OctEye", "sample_oct_eye", "render_bscan",
           "make_oct_bscan", "make_oct_volume"]

DIAGNOSES = ("normal", "drusen", "dme", "cnv")
KEY_SIGNS = ("drusen", "irf", "srf", "ped")

# bands from the top: vitreous, NFL, GCL, IPL, INL, OPL, ONL, IS, ellipsoid, OS, SRF, RPE,
# sub-RPE space, choroid (handled separately)
_REFL = np.array([0.04, 0.8, 0.32, 0.48, 0.16, 0.5, 0.1, 0.22, 0.85, 0.3, 0.03, 1.0, 0.45, 0.0],
                 np.float32)
# base thicknesses (fraction of H) of NFL, GCL, IPL, INL, OPL, ONL, IS, ellipsoid, OS, RPE
_THICK = np.array([0.028, 0.036, 0.03, 0.032, 0.022, 0.07, 0.014, 0.01, 0.016, 0.02])
_MIN_PX = 1.0  # a lesion counts as visible when it is at least this many pixels high
# layer segmentation ground truth: few classes; band index (as in _REFL) -> class. Fluid (SRF)
# and sub-RPE material (drusen / PED) are background; intraretinal cysts stay in their layer.
LAYER_CLASSES = ("background", "inner_retina", "outer_retina", "rpe")
_BAND_CLASS = np.array([0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 3, 0, 0], np.uint8)


@dataclass
class OctEye:
    """Per-eye anatomy and lesions in normalised units (see module docstring).

    Lesion tables have one row per lesion; columns are documented next to each field.
    """

    diagnosis: str
    bm: float  # Bruch's membrane depth at the scan centre (fraction of H)
    curvature: float
    tilt: float
    fovea_u: float
    pit_width: float
    nasal: int  # +1: the optic nerve (thicker NFL) lies towards +u
    thick: np.ndarray  # per-band thickness scale
    vessels: np.ndarray  # (k, 3): u, du/dz drift, width
    drusen: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))  # u, z, ru, rz, height
    ped: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))  # u, z, ru, rz, height
    srf: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))  # u, z, ru, rz, height
    shrm: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))  # u, z, ru, rz, height
    cysts: np.ndarray = field(default_factory=lambda: np.zeros((0, 6)))  # u, z, ru, rz, ry, depth
    foci: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))  # u, z, rz, depth
    thickening: np.ndarray = field(default_factory=lambda: np.zeros(4))  # u, ru, rz, amplitude
    # focal thickening (oedema) anywhere in the cube, zero outside |z - z0| < rz (unlike the
    # foveal ``thickening``, whose Gaussian reaches every slice)
    oedema: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))  # u, z, ru, rz, amplitude


def _rows(rows: list) -> np.ndarray:
    return np.asarray(rows, np.float64).reshape(len(rows), -1) if rows else np.zeros((0, 5))


def _blobs(rng, n, u0, su, zc_sd, ru, rz, h, primary: bool) -> list:
    """``n`` lesions [u, z, ru, rz, h]; with ``primary`` the first is centred on the fovea and
    spans |z| <= 0.45, so a B-scan near the fovea always shows it."""
    out = []
    for i in range(n):
        if primary and i == 0:
            out.append([u0 + rng.normal(0, 0.12), rng.uniform(-0.05, 0.05), rng.uniform(*ru),
                        rng.uniform(0.5, 0.75), rng.uniform(0.5 * (h[0] + h[1]), h[1])])
        else:
            out.append([u0 + rng.normal(0, su), rng.normal(0, zc_sd), rng.uniform(*ru),
                        rng.uniform(*rz), rng.uniform(*h)])
    return out


def _cysts(rng, n, e: OctEye, big: bool) -> np.ndarray:
    rows = []
    for i in range(n):
        first = big and i == 0
        rows.append([e.fovea_u + rng.normal(0, 0.08 if first else 0.25),
                     rng.uniform(-0.05, 0.05) if first else rng.normal(0, 0.25),
                     rng.uniform(0.08, 0.14) if first else rng.uniform(0.035, 0.1),
                     rng.uniform(0.5, 0.75) if first else rng.uniform(0.12, 0.35),
                     rng.uniform(0.035, 0.06) if first else rng.uniform(0.015, 0.04),
                     rng.uniform(0.3, 0.8)])
    return np.asarray(rows, np.float64).reshape(n, 6)


def sample_oct_eye(rng: np.random.Generator, diagnosis: str) -> OctEye:
    """Draw the anatomy and lesions of one eye with ``diagnosis`` (one of :data:`DIAGNOSES`)."""
    if diagnosis not in DIAGNOSES:
        raise ValueError(f"diagnosis must be one of {DIAGNOSES}, got {diagnosis!r}")
    nv = int(rng.integers(2, 5))
    e = OctEye(
        diagnosis=diagnosis, bm=rng.uniform(0.58, 0.66), curvature=rng.uniform(0.02, 0.08),
        tilt=rng.normal(0, 0.03), fovea_u=rng.normal(0, 0.06), pit_width=rng.uniform(0.22, 0.32),
        nasal=int(rng.choice([-1, 1])), thick=rng.uniform(0.85, 1.15, len(_THICK)),
        vessels=np.stack([rng.uniform(-0.9, 0.9, nv), rng.normal(0, 0.3, nv),
                          rng.uniform(0.015, 0.03, nv)], 1),
    )
    uf = e.fovea_u
    if diagnosis == "drusen" or (diagnosis == "cnv" and rng.random() < 0.3):
        primary = diagnosis == "drusen"
        rows = _blobs(rng, 2 + rng.poisson(4), uf, 0.3, 0.3, (0.06, 0.14), (0.1, 0.35),
                      (0.015, 0.04), primary)
        if diagnosis == "drusen" and rng.random() < 0.25:  # one drusenoid PED
            e.ped = _rows(_blobs(rng, 1, uf, 0.1, 0.05, (0.15, 0.25), (0.4, 0.6), (0.05, 0.08), True))
        e.drusen = _rows(rows)
    if diagnosis == "cnv":
        main = _blobs(rng, 1, uf, 0.1, 0.05, (0.22, 0.38), (0.4, 0.6), (0.04, 0.08), True)[0]
        subs = [[main[0] + rng.uniform(-0.7, 0.7) * main[2], main[1], main[2] * rng.uniform(0.3, 0.6),
                 main[3] * rng.uniform(0.6, 1.0), main[4] * rng.uniform(0.2, 0.5)]
                for _ in range(int(rng.integers(2, 5)))]
        e.ped = _rows([main] + subs)
        if rng.random() < 0.85:
            side = rng.choice([-1, 1])
            e.srf = _rows([[main[0] + side * rng.uniform(0.3, 1.0) * main[2], main[1],
                            rng.uniform(0.3, 0.5), main[3] * rng.uniform(1.0, 1.3),
                            rng.uniform(0.035, 0.07)]])
            e.shrm = _rows([[main[0], main[1], main[2] * rng.uniform(0.3, 0.6), main[3] * 0.7,
                             rng.uniform(0.015, 0.03)]])
        if rng.random() < 0.35:
            e.cysts = _cysts(rng, int(rng.integers(2, 6)), e, big=False)
            e.cysts[:, 1] = rng.uniform(-0.1, 0.1, len(e.cysts))
            e.cysts[:, 3] = np.maximum(e.cysts[:, 3], 0.35)
    if diagnosis == "dme":
        e.thickening = np.array([uf + rng.normal(0, 0.05), rng.uniform(0.3, 0.5),
                                 rng.uniform(0.5, 0.8), rng.uniform(0.05, 0.11)])
        e.cysts = _cysts(rng, int(rng.integers(4, 13)), e, big=True)
        k = int(rng.integers(3, 11))
        e.foci = np.stack([uf + rng.normal(0, 0.35, k), rng.normal(0, 0.3, k),
                           rng.uniform(0.1, 0.3, k), rng.uniform(0.0, 1.0, k)], 1)
        if rng.random() < 0.3:
            e.srf = _rows(_blobs(rng, 1, uf, 0.1, 0.05, (0.15, 0.3), (0.4, 0.6), (0.02, 0.04), True))
    return e


def _vis(z0, rz, z: float) -> np.ndarray:
    """Cross-section scale of lesions centred at ``z0`` with half-extent ``rz`` in slice ``z``."""
    return np.sqrt(np.clip(1.0 - ((z - z0) / rz) ** 2, 0.0, None))


def _profile(tab: np.ndarray, u: np.ndarray, z: float, power: float = 0.7) -> np.ndarray:
    """Sum of dome profiles (height in fraction of H) of lesion table rows at slice ``z``."""
    out = np.zeros_like(u)
    if len(tab) == 0:
        return out
    v = _vis(tab[:, 1], tab[:, 3], z)
    for (uc, _, ru, _, h), vi in zip(tab.tolist(), v.tolist()):
        if vi <= 0:
            continue
        x = (u - uc) / (ru * vi)
        out += h * vi * np.clip(1.0 - x * x, 0.0, None) ** power
    return out


def _ellipses(refl, cx, cy, rx, ry, value, edge=0.7) -> None:
    """Paint soft ellipses (pixel units) of reflectivity ``value`` into ``refl`` in place."""
    h, w = refl.shape
    for x0, y0, ax, ay in zip(cx, cy, rx, ry):
        if ax < 0.3 or ay < 0.3:
            continue
        xa, xb = max(0, int(x0 - ax - 2)), min(w, int(x0 + ax + 3))
        ya, yb = max(0, int(y0 - ay - 2)), min(h, int(y0 + ay + 3))
        if xa >= xb or ya >= yb:
            continue
        yy, xx = np.ogrid[ya:yb, xa:xb]
        d = np.sqrt(((xx - x0) / ax) ** 2 + ((yy - y0) / ay) ** 2)
        m = np.clip((1.0 - d) * (min(ax, ay) / edge) + 0.5, 0.0, 1.0)
        refl[ya:yb, xa:xb] += m * (value - refl[ya:yb, xa:xb])


def render_bscan(
    e: OctEye, rng: np.random.Generator, shape: tuple[int, int], position: float = 0.0,
    style: str | DeviceStyle = "A", layers: bool = False,
) -> tuple[np.ndarray, dict] | tuple[np.ndarray, dict, np.ndarray]:
    """Cross-section of eye ``e`` at B-scan ``position``: uint8 (H, W) and its key signs.

    With ``layers=True`` also a layer label map uint8 (H, W), values index :data:`LAYER_CLASSES`
    (each pixel labelled by the band its centre lies in; see :data:`_BAND_CLASS`).  Computing it
    draws no random numbers, so the B-scan is the same either way.
    """
    st = get_style(style)
    h, w = int(shape[0]), int(shape[1])
    s = h / 128.0
    z = float(np.clip(position, -1.0, 1.0))
    # random fields first, so that eyes differing only in pathology share speckle and texture
    speckle = quantile_noise(rng, (h, w), "gamma", st.speckle_shape)
    chor_tex = smooth_noise(rng, h, w, 3.0 * s, 7.0 * s)
    u = (np.arange(w, dtype=np.float64) - (w - 1) / 2) / (w / 2)
    du = u - e.fovea_u
    pit = np.exp(-(du**2 + z**2) / e.pit_width**2)
    ring = np.exp(-((np.sqrt(du**2 + z**2) - 1.6 * e.pit_width) / e.pit_width) ** 2)
    nfl_gain = 1.0 + 1.2 * np.clip(e.nasal * u, 0.0, None) * (1.0 - pit)
    th = _THICK[:, None] * e.thick[:, None] * np.ones((1, w))
    th[0] *= nfl_gain * (1.0 - 0.97 * pit)
    th[1:5] *= (1.0 + 0.35 * ring) * (1.0 - 0.93 * pit)
    th[5] *= 1.0 + 0.45 * pit
    th[8] *= 1.0 + 0.4 * pit
    tu, tru, trz, tamp = e.thickening
    if tamp > 0:
        thick = tamp * np.exp(-((u - tu) / tru) ** 2 / 2) * np.exp(-(z / trz) ** 2 / 2)
        th[3] += 0.35 * thick
        th[5] += 0.65 * thick
    if len(e.oedema):
        v = _vis(e.oedema[:, 1], e.oedema[:, 3], z)
        thick = sum(a * vi**2 * np.exp(-((u - uc) / ru) ** 2 / 2)
                    for (uc, _, ru, _, a), vi in zip(e.oedema.tolist(), v.tolist()) if vi > 0)
        th[3] += 0.35 * thick
        th[5] += 0.65 * thick
    drusen_h, ped_h = _profile(e.drusen, u, z), _profile(e.ped, u, z, 0.6)
    srf_h = _profile(e.srf, u, z, 1.0)
    if len(e.ped) and e.diagnosis == "cnv":  # irregular fibrovascular PED outline
        ped_h *= 1.0 + 0.25 * gaussian_filter1d(rng.standard_normal(w), 1.5 * w / 128)
        ped_h = np.clip(ped_h, 0.0, None)
    sub = drusen_h + ped_h
    # the outer nuclear layer absorbs most of a drusen bump (inner retina stays flat); a CNV
    # PED or fluid lifts the whole retina more
    lift = 0.8 * drusen_h + 0.6 * ped_h + 0.4 * srf_h
    th[5] = np.maximum(th[5] - lift, 0.25 * th[5])
    bm = e.bm + e.curvature * u**2 + e.tilt * u
    # boundaries from the bottom up (fractions of H), then to pixels, top-down
    b_rpe = bm - sub
    stack = [bm, b_rpe, b_rpe - th[9], b_rpe - th[9] - srf_h]
    for k in (8, 7, 6, 5, 4, 3, 2, 1, 0):
        stack.append(stack[-1] - th[k])
    bounds = (np.stack(stack[::-1]) * h).astype(np.float32)  # (13, W): ILM ... BM
    yy = np.arange(h, dtype=np.float32)[None, :, None]
    cov = np.subtract(yy + 0.5, bounds[:, None, :])  # (13, H, W): pixel fraction below each
    np.clip(cov, 0.0, 1.0, out=cov)
    refl = _REFL[0] + np.tensordot(np.diff(_REFL), cov, 1)
    # choroid: textured, fading with depth; sub-RPE material of CNV is heterogeneous
    depth = np.clip(yy[0] - bounds[-1][None, :], 0.0, None) / (0.11 * h)
    chor = 0.42 * (1.0 + 0.6 * chor_tex) * np.exp(-depth**2)
    refl += np.clip(chor, 0.0, None) * cov[-1]
    if e.diagnosis == "cnv" and len(e.ped):
        tex = smooth_noise(rng, h, w, 1.6 * s, 3.0 * s)
        refl += (0.2 * tex + 0.1) * (cov[-2] - cov[-1])
    # intraretinal features, in pixel units
    signs = {"drusen": int(drusen_h.max() * h >= _MIN_PX), "irf": 0,
             "srf": int(srf_h.max() * h >= _MIN_PX), "ped": int(ped_h.max() * h >= 1.5 * _MIN_PX)}

    def col(uc):  # lateral position u -> pixel column
        return np.clip((uc + 1.0) * w / 2 - 0.5, 0, w - 1)

    if len(e.cysts):
        v = _vis(e.cysts[:, 1], e.cysts[:, 3], z)
        cx = col(e.cysts[:, 0])
        ci = np.round(cx).astype(int)
        top, bot = bounds[3, ci], bounds[6, ci]  # IPL/INL .. ONL/IS
        ry = np.minimum(e.cysts[:, 4] * h * v, 0.45 * (bot - top))
        cy = top + e.cysts[:, 5] * (bot - top)
        cy = np.clip(cy, top + ry, bot - ry)
        rx = e.cysts[:, 2] * (w / 2) * v
        vis = (v > 0) & (ry >= 0.6 * _MIN_PX) & (rx >= 0.6 * _MIN_PX)
        _ellipses(refl, cx[vis], cy[vis], rx[vis], ry[vis], 0.03)
        signs["irf"] = int(vis.any())
    if len(e.foci):
        v = _vis(e.foci[:, 1], e.foci[:, 2], z) > 0
        cx = col(e.foci[v, 0])
        ci = np.round(cx).astype(int)
        cy = bounds[1, ci] + e.foci[v, 3] * (bounds[6, ci] - bounds[1, ci])
        r = np.full(len(cx), 0.9 * s)
        _ellipses(refl, cx, cy, r, r, 0.95)
    if len(e.shrm) and srf_h.max() * h >= _MIN_PX:
        v = _vis(e.shrm[:, 1], e.shrm[:, 3], z)
        cx = col(e.shrm[:, 0])
        ci = np.round(cx).astype(int)
        ry = np.minimum(e.shrm[:, 4] * h * v, 0.5 * srf_h[ci] * h)
        _ellipses(refl, cx, bounds[9, ci] - ry, e.shrm[:, 2] * (w / 2) * v, ry, 0.75)
    if len(e.vessels):  # retinal vessels in the GCL with shadows below
        vu = e.vessels[:, 0] + e.vessels[:, 1] * z
        cx = col(vu)
        ci = np.round(cx).astype(int)
        rv = e.vessels[:, 2] * (w / 2)
        shadow = np.zeros(w, np.float32)
        for x0, r in zip(cx.tolist(), rv.tolist()):
            shadow = np.maximum(shadow, np.exp(-((np.arange(w) - x0) / r) ** 2))
        refl *= 1.0 - 0.55 * shadow[None, :] * cov[2]
        _ellipses(refl, cx, bounds[2, ci] - 0.3 * rv, rv, 0.8 * rv, 0.7)
    # multiplicative gamma speckle, a little lateral/axial blur, display curve
    img = refl * speckle
    sx, sy = np.hypot(0.6, st.oct_blur) * s, np.hypot(0.4, st.oct_blur) * s
    img = gaussian_filter1d(gaussian_filter1d(img, sx, axis=1, mode="nearest"), sy, axis=0, mode="nearest")
    linear = (np.clip(img * 0.9, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if not layers:
        return finish_oct(linear, st, pre_gamma=0.85), signs
    band = (yy[0] + 0.5 > bounds[:, None, :]).sum(axis=0)  # (H, W): 0 vitreous ... 13 choroid
    return finish_oct(linear, st, pre_gamma=0.85), signs, _BAND_CLASS[band]


def make_oct_bscan(
    rng: np.random.Generator, shape: tuple[int, int] = (128, 128), diagnosis: str = "normal",
    style: str | DeviceStyle = "A", position: float = 0.0,
) -> tuple[np.ndarray, dict]:
    """One B-scan phantom: uint8 (H, W) and key signs ``{"drusen", "irf", "srf", "ped"}`` (0/1).

    ``position`` in [-1, 1] is the scan's offset from the fovea (0 = through the foveal pit;
    towards +-1 the pit flattens and pathology fades).
    """
    eye_rng, scan_rng = rng.spawn(2)
    return render_bscan(sample_oct_eye(eye_rng, diagnosis), scan_rng, shape, position, style)


def make_oct_volume(
    rng: np.random.Generator, n_slices: int, shape: tuple[int, int] = (128, 128),
    diagnosis: str = "normal", style: str | DeviceStyle = "A",
) -> tuple[np.ndarray, dict]:
    """A volume of ``n_slices`` B-scans, uint8 (n_slices, H, W), fovea at the middle slice.

    Slice ``i`` is at position ``linspace(-1, 1, n_slices)[i]`` (a single slice is at 0).
    Lesions are drawn once per eye, so slices agree; key signs are the union over slices.
    """
    eye_rng, scan_rng = rng.spawn(2)
    e = sample_oct_eye(eye_rng, diagnosis)
    pos = np.linspace(-1.0, 1.0, n_slices) if n_slices > 1 else np.zeros(1)
    vol = np.empty((n_slices, int(shape[0]), int(shape[1])), np.uint8)
    signs = dict.fromkeys(KEY_SIGNS, 0)
    for i, (p, r) in enumerate(zip(pos.tolist(), scan_rng.spawn(n_slices))):
        vol[i], s = render_bscan(e, r, shape, p, style)
        signs = {k: max(signs[k], s[k]) for k in KEY_SIGNS}
    return vol, signs
