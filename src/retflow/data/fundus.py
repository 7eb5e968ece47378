"""The fundus field of a colour fundus photograph (CFP): where it is, how good it looks.

A fundus camera images the retina through a circular aperture, so a CFP is a bright (mostly
red) disc on a black surround; the disc is often cut by the image edges (HRF, Topcon: cut at
top and bottom), sometimes fills the whole frame, and the surround may carry a notch or a
burnt-in text label. This module finds that field with numpy / scipy / scikit-image only:

1. :func:`detect_field` works on a copy whose longest side is at most :data:`WORK_SIZE` px
   (block means over a few sample offsets per block, so a 3504x2336 image costs a few ms),
   takes the max over channels, thresholds it a fixed fraction of the way from the surround's
   level up to the field's (Otsu's bright class; surround = pixels far darker), keeps the largest
   connected component, fills its holes, and fits a circle to the sub-pixel boundary points
   that are not on the image edge (RANSAC over point triples, then trimmed least squares).
   If a rectangle explains the mask better than the circle (no black surround at all, or a
   rectangular field), the field is that rectangle. The result, a :class:`FundusField`, is in
   the input's pixel coordinates.
2. :func:`mask_from_field` draws ``circle ∩ bounds`` (``bounds`` lie inside the image, so this
   is the circle∩image mask for circular fields, and the rectangle for rectangular ones).
3. :func:`quality_flags` gives cheap exposure / contrast / sharpness measures inside the field
   and heuristic flags (constants below); :func:`enhance_contrast` and :func:`crop_to_field`
   are the usual preprocessing steps.

All thresholds are generic heuristics for 8-bit images, not fitted to any particular dataset.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage import exposure, filters, measure

# --- detection -------------------------------------------------------------------------------
WORK_SIZE = 512  # px: detection and quality measures run on a copy with longest side <= this
MIN_FIELD_LEVEL = 10.0  # grey levels (max channel): a field dimmer than this is "no field"
MIN_DYNAMIC_RANGE = 5.0  # grey levels between the 1st and 99th percentile: less is a blank image
BORDER_REL_MAX = 0.3  # pixels darker than this x field level are surround candidates ...
MIN_SURROUND_FRACTION = 0.002  # ... and fewer of them than this share means: field fills the frame
THRESHOLD_FRAC = 0.25  # field threshold = bg + THRESHOLD_FRAC * (field - bg)
MIN_FIELD_FRACTION = 0.05  # a component smaller than this share of the image is not a field
RANSAC_TRIALS = 256  # random point triples tried when fitting the circle
RANSAC_TOL = 1.5  # working-scale px: a boundary point this close to the circle is an inlier
MIN_CIRCLE_INLIERS = 0.5  # share of boundary points the circle must explain
CIRCLE_PREFERENCE = 0.002  # IoU margin by which the circle must beat the rectangle model

# --- quality (heuristics on 8-bit images, measured on the WORK_SIZE copy) ----------------------
DARK_MEAN = 35.0  # too_dark: mean brightness (HSV value, i.e. max channel) in the field below this
BRIGHT_MEAN = 225.0  # too_bright: mean brightness above this ...
UNDER_LEVEL = 15.0  # a field pixel with brightness <= this is under-exposed
OVER_LEVEL = 245.0  # a field pixel with luminance >= this is over-exposed (washed out to white)
UNDER_FRAC_MAX = 0.5  # too_dark also when more than this share of the field is under-exposed
OVER_FRAC_MAX = 0.25  # too_bright also when more than this share of the field is over-exposed
BLUR_VAR = 2.0  # blurry: variance of the Laplacian of luminance (0-255 scale) below this
EDGE_MARGIN = 0.04  # share of the radius left out at the field edge for contrast / sharpness

ENHANCE_METHODS = ("none", "clahe", "graham")
GRAHAM_SIGMA_FRAC = 1 / 30  # Gaussian sigma as a share of the field radius (Graham, 2015)


@dataclass(frozen=True)
class FundusField:
    """The illuminated field of a fundus photograph, in the input image's pixel coordinates.

    ``bounds`` = (top, bottom, left, right) is the crop box, end-exclusive like slices, clipped
    to the image; ``center`` = (cy, cx) and ``radius`` are the fitted circle (pixel centres at
    integer coordinates; for a rectangular field the circle circumscribes the box). The field is
    ``circle ∩ bounds``. ``mask_fraction`` is the share of image pixels in the field (0.0 when
    ``found`` is False; then the geometry is the whole frame so cropping is a no-op).
    """

    bounds: tuple[int, int, int, int]
    center: tuple[float, float]
    radius: float
    mask_fraction: float
    found: bool
    shape: tuple[int, int] = (0, 0)  # (H, W) of the image it was detected on


def _whole_frame(h: int, w: int, found: bool) -> FundusField:
    return FundusField(bounds=(0, h, 0, w), center=((h - 1) / 2, (w - 1) / 2),
                       radius=float(np.hypot(h, w) / 2), mask_fraction=1.0 if found else 0.0,
                       found=found, shape=(h, w))


def _check(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {img.dtype}")
    if img.ndim == 2:
        return img[..., None]
    if img.ndim == 3 and img.shape[2] in (1, 3, 4):
        return img[..., :3]
    raise ValueError(f"expected an (H, W) or (H, W, 3) image, got shape {img.shape}")


def _downscale(img: np.ndarray, size: int = WORK_SIZE) -> tuple[np.ndarray, int]:
    """Block-mean downscale by an integer factor k so the longest side is <= ``size``.

    Each k x k block is averaged over an m x m grid of sample offsets (m <= 4) instead of all
    k^2 pixels: strided views are cheap, full reductions over a 10-Mpx image are not. Block i
    has its centre at full-resolution coordinate ``i * k + (k - 1) / 2``; the last partial
    block row / column is dropped. Returns float32 (h, w, C) and k.
    """
    h, w = img.shape[:2]
    k = max(1, int(np.ceil(max(h, w) / size)))
    if k == 1:
        return img.astype(np.float32), 1
    hs, ws = h // k, w // k
    m = min(k, 4)
    offs = ((np.arange(m) + 0.5) * k / m).astype(int)
    acc = np.zeros((hs, ws, img.shape[2]), np.float32)
    for oy in offs:
        for ox in offs:
            acc += img[oy:oy + hs * k:k, ox:ox + ws * k:k]
    return acc / (m * m), k


def _circle_from_triples(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Circumcircles of point triples p (n, 3, 2) in (y, x): centres cy, cx and radii."""
    (y1, x1), (y2, x2), (y3, x3) = (p[:, i].T for i in range(3))
    d = 2 * (x1 * (y2 - y3) + x2 * (y3 - y1) + x3 * (y1 - y2))
    s1, s2, s3 = x1 ** 2 + y1 ** 2, x2 ** 2 + y2 ** 2, x3 ** 2 + y3 ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        cx = (s1 * (y2 - y3) + s2 * (y3 - y1) + s3 * (y1 - y2)) / d
        cy = (s1 * (x3 - x2) + s2 * (x1 - x3) + s3 * (x2 - x1)) / d
    r = np.hypot(x1 - cx, y1 - cy)
    return cy, cx, r


def _lsq_circle(pts: np.ndarray) -> tuple[float, float, float]:
    """Algebraic (Kasa) least-squares circle through points (n, 2) in (y, x)."""
    y, x = pts[:, 0], pts[:, 1]
    my, mx = y.mean(), x.mean()  # centre the data for conditioning
    yc, xc = y - my, x - mx
    a = np.column_stack([xc, yc, np.ones_like(xc)])
    b = -(xc ** 2 + yc ** 2)
    (d, e, f), *_ = np.linalg.lstsq(a, b, rcond=None)
    cx, cy = -d / 2, -e / 2
    r2 = cx ** 2 + cy ** 2 - f
    return float(cy + my), float(cx + mx), float(np.sqrt(max(r2, 0.0)))


def _fit_circle(pts: np.ndarray, max_radius: float) -> tuple[float, float, float, float] | None:
    """Robust circle fit: RANSAC over triples, then trimmed least squares on the inliers.

    Returns (cy, cx, r, inlier share) or None when no circle explains the points.
    """
    n = len(pts)
    if n < 12:
        return None
    rng = np.random.default_rng(0)
    idx = rng.integers(0, n, (RANSAC_TRIALS, 3))
    cy, cx, r = _circle_from_triples(pts[idx])
    ok = np.isfinite(r) & (r > 2) & (r < max_radius)
    if not ok.any():
        return None
    cy, cx, r = cy[ok], cx[ok], r[ok]
    # inlier counts of every candidate (chunk to bound memory)
    counts = np.zeros(len(r), int)
    for s in range(0, len(r), 64):
        dist = np.hypot(pts[None, :, 0] - cy[s:s + 64, None], pts[None, :, 1] - cx[s:s + 64, None])
        counts[s:s + 64] = (np.abs(dist - r[s:s + 64, None]) < RANSAC_TOL).sum(axis=1)
    best = int(np.argmax(counts))
    c = (cy[best], cx[best], r[best])
    inl = None
    for _ in range(5):  # refine: least squares on inliers, re-select inliers
        res = np.abs(np.hypot(pts[:, 0] - c[0], pts[:, 1] - c[1]) - c[2])
        new = res < RANSAC_TOL
        if new.sum() < 6:
            break
        if inl is not None and np.array_equal(new, inl):
            break
        inl = new
        c = _lsq_circle(pts[inl])
    res = np.abs(np.hypot(pts[:, 0] - c[0], pts[:, 1] - c[1]) - c[2])
    share = float((res < RANSAC_TOL).mean())
    if not np.isfinite(c[2]) or c[2] <= 2 or c[2] >= max_radius:
        return None
    return c[0], c[1], c[2], share


def _disc(shape: tuple[int, int], cy: float, cx: float, r: float,
          box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Boolean mask of pixels with (y-cy)^2 + (x-cx)^2 <= r^2, intersected with box."""
    h, w = shape
    yy = (np.arange(h, dtype=np.float64) - cy) ** 2
    xx = (np.arange(w, dtype=np.float64) - cx) ** 2
    m = (yy[:, None] + xx[None, :]) <= r * r
    if box is not None:
        t, b, l, rt = box
        m[:max(t, 0)] = False
        m[max(b, 0):] = False
        m[:, :max(l, 0)] = False
        m[:, max(rt, 0):] = False
    return m


def _chord_count(h: int, w: int, cy: float, cx: float, r: float,
                 box: tuple[int, int, int, int]) -> int:
    """Number of pixels in circle ∩ box, counted row by row (exact, O(H))."""
    t, b, l, rt = box
    y = np.arange(t, b, dtype=np.float64)
    half = np.sqrt(np.clip(r * r - (y - cy) ** 2, 0, None))
    inside = r * r - (y - cy) ** 2 >= 0
    x0 = np.maximum(np.ceil(cx - half), l)
    x1 = np.minimum(np.floor(cx + half) + 1, rt)
    return int(np.where(inside, np.clip(x1 - x0, 0, None), 0).sum())


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


def _threshold(v: np.ndarray) -> tuple[float | None, bool]:
    """Field threshold on the working max-channel image.

    Returns (None, _) for a blank image, (_, False) when there is no dark surround (the field
    fills the frame), else (threshold, True).
    """
    lo, hi = np.percentile(v, [1, 99])
    if hi < MIN_FIELD_LEVEL or hi - lo < MIN_DYNAMIC_RANGE:
        return None, False
    # field level: median of Otsu's bright class; a bright class too small to be the field
    # (burnt-in label, reflex, optic disc of a dark image) is dropped and Otsu run again below it
    vals = v.ravel()
    for _ in range(4):
        if vals.size == 0 or vals.max() - vals.min() < MIN_DYNAMIC_RANGE:
            return None, False
        t_otsu = filters.threshold_otsu(vals)
        above = vals[vals > t_otsu]
        if above.size >= MIN_FIELD_FRACTION * v.size:
            break
        vals = vals[vals <= t_otsu]
    else:
        return None, False
    fg = float(np.median(above))
    if fg < MIN_FIELD_LEVEL:
        return None, False
    dark = v[v <= BORDER_REL_MAX * fg]  # surround candidates: far darker than the field
    if dark.size < MIN_SURROUND_FRACTION * v.size:
        return 0.0, False
    bg = float(np.median(dark))
    return bg + THRESHOLD_FRAC * (fg - bg), True


def detect_field(img: np.ndarray) -> FundusField:
    """Find the illuminated fundus field of a uint8 (H, W, 3) or (H, W) fundus photograph."""
    img = _check(img)
    h, w = img.shape[:2]
    small, k = _downscale(img)
    v = small.max(axis=2)
    if k < 3:  # few pixels averaged per block: smooth sensor / JPEG noise a little
        v = ndi.gaussian_filter(v, 1.0)
    hs, ws = v.shape
    t, surround = _threshold(v)
    if t is None:
        return _whole_frame(h, w, found=False)
    if not surround:
        return _whole_frame(h, w, found=True)

    labels, n = ndi.label(v > t)
    if n == 0:
        return _whole_frame(h, w, found=False)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    comp = labels == int(np.argmax(sizes))
    comp = ndi.binary_fill_holes(comp)
    if comp.sum() < MIN_FIELD_FRACTION * comp.size:
        return _whole_frame(h, w, found=False)

    rows, cols = np.nonzero(comp.any(axis=1))[0], np.nonzero(comp.any(axis=0))[0]
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1  # working-scale mask bbox
    rect = np.zeros_like(comp)
    rect[y0:y1, x0:x1] = True
    iou_rect = _iou(rect, comp)

    # sub-pixel boundary of the field; no contour runs along the image edge (no crossing there)
    contours = measure.find_contours(comp.astype(np.float32), 0.5)
    pts = np.concatenate(contours) if contours else np.zeros((0, 2))
    if len(pts) > 4000:
        pts = pts[np.linspace(0, len(pts) - 1, 4000).astype(int)]
    fit = _fit_circle(pts, max_radius=4 * np.hypot(hs, ws))
    use_circle = False
    if fit is not None and fit[3] >= MIN_CIRCLE_INLIERS:
        cy, cx, r, _ = fit
        margin = max(2, int(np.ceil(0.02 * r)))
        box = (y0 - margin, y1 + margin, x0 - margin, x1 + margin)
        iou_circle = _iou(_disc((hs, ws), cy, cx, r, box), comp)
        use_circle = iou_circle > iou_rect + CIRCLE_PREFERENCE

    def full(i0: int, i1: int, n_small: int, n_full: int) -> tuple[int, int]:
        """Working-scale index range [i0, i1) -> full-resolution pixel range, clipped."""
        a = 0 if i0 <= 0 else i0 * k
        b = n_full if i1 >= n_small else i1 * k
        return max(0, a), min(n_full, b)

    if use_circle:
        cy_f, cx_f, r_f = cy * k + (k - 1) / 2, cx * k + (k - 1) / 2, r * k
        top, bottom = full(y0 - margin, y1 + margin, hs, h)
        left, right = full(x0 - margin, x1 + margin, ws, w)
        top = max(top, int(np.ceil(cy_f - r_f)))
        bottom = min(bottom, int(np.floor(cy_f + r_f)) + 1)
        left = max(left, int(np.ceil(cx_f - r_f)))
        right = min(right, int(np.floor(cx_f + r_f)) + 1)
        if bottom <= top or right <= left:
            return _whole_frame(h, w, found=False)
    else:
        top, bottom = full(y0, y1, hs, h)
        left, right = full(x0, x1, ws, w)
        cy_f, cx_f = (top + bottom - 1) / 2, (left + right - 1) / 2
        r_f = float(np.hypot(bottom - top, right - left) / 2)
    bounds = (int(top), int(bottom), int(left), int(right))
    frac = _chord_count(h, w, cy_f, cx_f, r_f, bounds) / (h * w)
    return FundusField(bounds=bounds, center=(float(cy_f), float(cx_f)), radius=float(r_f),
                       mask_fraction=float(frac), found=True, shape=(h, w))


def mask_from_field(shape: tuple[int, ...], field: FundusField) -> np.ndarray:
    """Boolean (H, W) mask of the field: circle ∩ bounds (bounds lie inside the image)."""
    h, w = shape[:2]
    return _disc((h, w), field.center[0], field.center[1], field.radius, field.bounds)


# --- quality ---------------------------------------------------------------------------------

def _small_field_mask(shape_small: tuple[int, int], k: int, field: FundusField,
                      shrink: float = 0.0) -> np.ndarray:
    """The field mask on the working grid (block centres at i * k + (k - 1) / 2)."""
    hs, ws = shape_small
    off = (k - 1) / 2
    t, b, l, r = field.bounds
    box = (int(np.ceil((t - off) / k)), int(np.floor((b - 1 - off) / k)) + 1,
           int(np.ceil((l - off) / k)), int(np.floor((r - 1 - off) / k)) + 1)
    return _disc((hs, ws), (field.center[0] - off) / k, (field.center[1] - off) / k,
                 field.radius * (1 - shrink) / k, box)


def quality_flags(img: np.ndarray, field: FundusField | None = None) -> dict:
    """Cheap image-quality measures inside the field, and heuristic flags.

    Measures (on the :data:`WORK_SIZE` copy, 0-255 scale):

    - ``brightness``: mean HSV value (max over channels) in the field;
    - ``contrast``: standard deviation of luminance (Rec. 709 weights) in the field;
    - ``sharpness``: variance of the Laplacian (``skimage.filters.laplace``) of luminance in
      the field shrunk by :data:`EDGE_MARGIN` (the field edge itself is not detail);
    - ``under_exposed`` / ``over_exposed``: share of field pixels with value <=
      :data:`UNDER_LEVEL` / luminance >= :data:`OVER_LEVEL`.

    Flags: ``no_field`` (no field found), ``too_dark`` (brightness < :data:`DARK_MEAN` or
    under_exposed > :data:`UNDER_FRAC_MAX`), ``too_bright`` (brightness > :data:`BRIGHT_MEAN`
    or over_exposed > :data:`OVER_FRAC_MAX`), ``blurry`` (sharpness < :data:`BLUR_VAR`), and
    ``quality_ok`` = none of them. Without a field the measures cover the whole image.
    """
    img = _check(img)
    if field is None:
        field = detect_field(img)
    small, k = _downscale(img)
    value = small.max(axis=2)
    if small.shape[2] == 3:
        lum = small @ np.array([0.2125, 0.7154, 0.0721], np.float32)
    else:
        lum = small[..., 0]
    mask = _small_field_mask(value.shape, k, field) if field.found else np.ones(value.shape, bool)
    if not mask.any():
        mask = np.ones(value.shape, bool)
    inner = _small_field_mask(value.shape, k, field, EDGE_MARGIN) if field.found else mask
    if inner.sum() < 16:
        inner = mask
    lap = filters.laplace(lum, ksize=3)
    brightness = float(value[mask].mean())
    under = float((value[mask] <= UNDER_LEVEL).mean())
    over = float((lum[mask] >= OVER_LEVEL).mean())
    out = {
        "brightness": brightness,
        "contrast": float(lum[inner].std()),
        "sharpness": float(lap[inner].var()),
        "under_exposed": under,
        "over_exposed": over,
        "no_field": not field.found,
        "too_dark": brightness < DARK_MEAN or under > UNDER_FRAC_MAX,
        "too_bright": brightness > BRIGHT_MEAN or over > OVER_FRAC_MAX,
    }
    out["blurry"] = out["sharpness"] < BLUR_VAR
    out["quality_ok"] = not (out["no_field"] or out["too_dark"] or out["too_bright"] or out["blurry"])
    return out


# --- preprocessing ---------------------------------------------------------------------------

def _interp_matrix(n: int, n_small: int, k: int) -> np.ndarray:
    """(n, n_small) linear-interpolation weights from block centres (i * k + (k - 1) / 2)."""
    u = np.clip((np.arange(n) - (k - 1) / 2) / k, 0, n_small - 1)
    i0 = np.floor(u).astype(int)
    i1 = np.minimum(i0 + 1, n_small - 1)
    f = (u - i0).astype(np.float32)
    w = np.zeros((n, n_small), np.float32)
    np.add.at(w, (np.arange(n), i0), 1 - f)
    np.add.at(w, (np.arange(n), i1), f)
    return w


def _field_local_mean(x: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-weighted mean of x (H, W, C) over field pixels only, float32 (H, W, C).

    Normalised convolution blur(x * mask) / blur(mask). For large sigma the blur runs on a
    block-sampled copy (block k ~ sigma / 3, so the kernel still spans several blocks) and is
    brought back with separable linear interpolation written as two small matrix products.
    """
    h, w, c = x.shape
    k = max(1, int(sigma // 3))
    if k == 1:
        m = mask.astype(np.float32)
        num = ndi.gaussian_filter(x.astype(np.float32) * m[..., None], (sigma, sigma, 0),
                                  mode="constant")
        den = ndi.gaussian_filter(m, sigma, mode="constant")[..., None]
        return num / np.maximum(den, 1e-3)
    hs, ws = h // k, w // k
    ms = min(k, 4)
    offs = ((np.arange(ms) + 0.5) * k / ms).astype(int)
    num = np.zeros((hs, ws, c), np.float32)
    den = np.zeros((hs, ws), np.float32)
    for oy in offs:
        for ox in offs:
            mm = mask[oy:oy + hs * k:k, ox:ox + ws * k:k].astype(np.float32)
            num += x[oy:oy + hs * k:k, ox:ox + ws * k:k] * mm[..., None]
            den += mm
    s = sigma / k
    num = ndi.gaussian_filter(num, (s, s, 0), mode="constant")
    den = ndi.gaussian_filter(den, s, mode="constant")
    small = num / np.maximum(den, 1e-3)[..., None]
    wy, wx = _interp_matrix(h, hs, k), _interp_matrix(w, ws, k)
    return np.stack([wy @ small[..., i] @ wx.T for i in range(c)], axis=-1)


def enhance_contrast(img: np.ndarray, method: str = "clahe",
                     field: FundusField | None = None) -> np.ndarray:
    """Contrast enhancement of a fundus photograph; returns uint8 of the input's shape.

    - ``"none"``: a copy.
    - ``"clahe"``: ``skimage.exposure.equalize_adapthist`` on the HSV value (max channel), the
      colour channels scaled by the same gain (hue and saturation kept; what skimage does for
      RGB input, without the slow full colour-space round trip); outside ``field`` (if given) 0.
    - ``"graham"``: Ben Graham's local-average subtraction (Kaggle DR 2015),
      ``4 * img - 4 * gaussian(img, radius / 30) + 128`` clipped to 0-255, outside the field 0.
      The local average is taken over field pixels only (normalised convolution), so the black
      surround does not leave a bright ring at the field edge. Needs the field: detected when
      not given (whole frame when none is found).
    """
    if method not in ENHANCE_METHODS:
        raise ValueError(f"unknown enhancement {method!r}; expected one of {ENHANCE_METHODS}")
    arr = np.asarray(img)
    _check(arr)
    if method == "none":
        return arr.copy()
    if method == "clahe":
        if arr.ndim == 2:
            out = np.round(exposure.equalize_adapthist(arr) * 255).astype(np.uint8)
        else:  # equalise the HSV value (max channel); scaling RGB by V'/V keeps hue, saturation
            value = arr.max(axis=2)
            eq = exposure.equalize_adapthist(value).astype(np.float32) * 255
            gain = eq / np.maximum(value, 1)
            out = np.empty(arr.shape, np.uint8)
            for i in range(arr.shape[2]):
                out[..., i] = np.clip(np.round(arr[..., i] * gain), 0, 255)
        if field is not None and field.found:
            out[~mask_from_field(arr.shape, field)] = 0
        return out
    if field is None:
        field = detect_field(arr)
    mask = mask_from_field(arr.shape, field) if field.found else np.ones(arr.shape[:2], bool)
    sigma = max(field.radius * GRAHAM_SIGMA_FRAC, 1.0)
    x = arr[..., None] if arr.ndim == 2 else arr
    local = _field_local_mean(x, mask, sigma)
    out = np.empty(x.shape, np.uint8)
    for i in range(x.shape[2]):
        v = x[..., i].astype(np.float32)
        v -= local[..., i]
        v *= 4
        v += 128
        np.clip(v, 0, 255, out=v)
        out[..., i] = v
    out[~mask] = 0
    return out[..., 0] if arr.ndim == 2 else out


def crop_pad_square(arr: np.ndarray, bounds) -> np.ndarray:
    """Crop ``arr`` to ``bounds`` (top, bottom, left, right) and zero-pad it, centred, to a square
    (keeps the dtype: images and their label masks get the same geometry)."""
    t, b, l, r = (int(v) for v in bounds)
    crop = arr[max(0, t):b, max(0, l):r]
    ch, cw = crop.shape[:2]
    side = max(ch, cw)
    out = np.zeros((side, side) + arr.shape[2:], arr.dtype)
    oy, ox = (side - ch) // 2, (side - cw) // 2
    out[oy:oy + ch, ox:ox + cw] = crop
    return out


def crop_to_field(img: np.ndarray, field: FundusField) -> np.ndarray:
    """Crop to ``field.bounds`` and zero-pad (centred) to a square; returns uint8."""
    arr = np.asarray(img)
    _check(arr)
    return crop_pad_square(arr, field.bounds)
