"""Colour fundus photograph (CFP) phantoms.

:func:`make_cfp` paints a macula-centred fundus photo: a circular field on a black
background (so a border-crop step has work to do), orange-red fundus with vignetting and
choroidal texture, an optic disc with a cup of the requested vertical cup-to-disc ratio, a
darker macula, a branching vessel tree, and diabetic-retinopathy lesions whose number and kind
follow the ICDR grade (0-4).

Coordinates are output pixels with pixel ``i`` centred at ``i``.  Smooth structures are
computed analytically with numpy; lines and spots are drawn with Pillow on 2x super-sampled
masks and box-reduced, which anti-aliases them.  The generator's stream is split into an
anatomy stream and a lesion stream, so the same seed with a different grade or cup-to-disc
ratio gives the same eye with different pathology (used by the tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .style import DeviceStyle, finish_rgb, get_style, smooth_noise

__all__ = ["make_cfp", "cfp_shape", "ASPECT"]

ASPECT = 1.25  # width / height of the photo
SS = 2  # super-sampling factor of the drawn masks
VESSEL_COVERAGE = 0.4  # pixel share of vessel ink that makes a pixel "vessel" in the mask

# multiplicative colour of a fully covered pixel, relative to the fundus underneath
_VEIN = np.array([0.52, 0.2, 0.24], np.float32)
_ARTERY = np.array([0.76, 0.4, 0.4], np.float32)
_BLOOD = np.array([0.56, 0.2, 0.26], np.float32)
# absolute colours (scaled by local illumination) of bright lesions
_EXUDATE = np.array([1.0, 0.88, 0.42], np.float32)
_COTTON = np.array([0.96, 0.9, 0.8], np.float32)


def cfp_shape(size: int) -> tuple[int, int]:
    """(H, W) of a photo of height ``size``."""
    return int(size), int(round(size * ASPECT))


@dataclass
class _Eye:
    """Anatomy of one eye in output pixels."""

    h: int
    w: int
    s: float  # pixels per pixel-at-128
    cx: float
    cy: float
    rf: float  # field radius
    dd: float  # disc diameter
    side: int  # +1 right eye (disc right of centre), -1 left eye
    fx: float
    fy: float
    dx: float
    dy: float
    rx: float  # disc half-width
    ry: float  # disc half-height


def _sample_eye(rng: np.random.Generator, size: int, eye: str, st: DeviceStyle) -> _Eye:
    h, w = cfp_shape(size)
    if eye not in ("R", "L"):
        raise ValueError(f"eye must be 'R' or 'L', got {eye!r}")
    side = 1 if eye == "R" else -1
    j = rng.normal(size=6)
    u = rng.uniform(size=4)
    cx, cy = w / 2 + 0.01 * h * j[0], h / 2 + 0.01 * h * j[1]
    dd = (2 * 0.47 * h / 7) * st.magnification * (0.92 + 0.16 * u[0])
    fx = cx - side * 0.35 * dd + 0.15 * dd * j[2]
    fy = cy + 0.1 * dd + 0.15 * dd * j[3]
    dx = fx + side * 2.5 * dd * (0.93 + 0.14 * u[1])
    dy = fy - 0.2 * dd + 0.15 * dd * j[4]
    ry = 0.5 * dd * (0.95 + 0.13 * u[2])
    rx = ry * (0.85 + 0.1 * u[3])
    vals = (cx, cy, st.field_radius * h, dd, side, fx, fy, dx, dy, rx, ry)
    return _Eye(h, w, h / 128.0, *(float(v) for v in vals[:4]), side, *(float(v) for v in vals[5:]))


def _soft_ellipse(xx, yy, cx, cy, rx, ry, edge) -> np.ndarray:
    """Coverage (0..1) of an axis-aligned ellipse with a soft edge of ``edge`` pixels."""
    d = np.sqrt(((xx - cx) * (1.0 / rx)) ** 2 + ((yy - cy) * (1.0 / ry)) ** 2)
    return np.clip((1.0 - d) * (min(rx, ry) / edge) + 0.5, 0.0, 1.0)


@lru_cache(maxsize=8)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(xx, yy)``, float32 (H, W), read-only and cached."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    xx.flags.writeable = yy.flags.writeable = False
    return xx, yy


def _fundus(rng, e: _Eye, st: DeviceStyle, xx, yy):
    """Background fundus colour, channel-first (3, H, W), and the illumination (H, W)."""
    pig = rng.uniform(0.72, 1.1)
    base = [0.86 * pig, 0.38 * pig * rng.uniform(0.85, 1.15), 0.15 * pig * rng.uniform(0.7, 1.4)]
    r2 = ((xx - e.cx) ** 2 + (yy - e.cy) ** 2) * (1.0 / e.rf**2)
    tx, ty = (float(t) / e.rf for t in rng.normal(0, 0.06, 2))
    illum = 1.0 - st.vignette * r2 * np.sqrt(np.sqrt(r2)) + tx * (xx - e.cx) + ty * (yy - e.cy)
    tex = smooth_noise(rng, e.h, e.w, 6 * e.s)  # choroidal mottling
    dm2 = ((xx - e.fx) ** 2 + (yy - e.fy) ** 2) * (1.0 / e.dd**2)
    mac = np.exp(dm2 * (-1 / (2 * 0.7**2)))  # macula, sigma 0.7 disc diameters
    shade = illum * (1.0 + 0.04 * tex) * (1.0 - 0.3 * mac)
    r = int(0.5 * e.dd) + 2  # darker fovea, sigma 0.13 DD: only a small window
    ya, yb = max(0, int(e.fy) - r), min(e.h, int(e.fy) + r + 1)
    xa, xb = max(0, int(e.fx) - r), min(e.w, int(e.fx) + r + 1)
    shade[ya:yb, xa:xb] -= 0.18 * np.exp(dm2[ya:yb, xa:xb] * (-1 / (2 * 0.13**2)))
    img = np.empty((3, e.h, e.w), np.float32)
    for c in range(3):
        img[c] = shade * base[c]
    img[2] *= 1.0 - 0.25 * (mac * mac)  # yellowish macular pigment, sigma 0.7 / sqrt(2) DD
    return img, illum


def _disc(img, e: _Eye, cdr: float, rng, xx, yy, illum) -> None:
    """Paint the optic disc, a pale peripapillary ring and the cup, in place (local window)."""
    r = int(1.5 * max(e.rx, e.ry)) + 3
    y0, y1 = max(0, int(e.dy) - r), min(e.h, int(e.dy) + r + 1)
    x0, x1 = max(0, int(e.dx) - r), min(e.w, int(e.dx) + r + 1)
    if y0 >= y1 or x0 >= x1:
        return
    win, xs, ys = img[:, y0:y1, x0:x1], xx[y0:y1, x0:x1], yy[y0:y1, x0:x1]
    iy, ix = min(e.h - 1, max(0, int(e.dy))), min(e.w - 1, max(0, int(e.dx)))
    lum = 0.7 + 0.3 * min(1.0, max(0.0, float(illum[iy, ix])))
    disc = _soft_ellipse(xs, ys, e.dx, e.dy, e.rx, e.ry, 1.0 * e.s)
    halo = _soft_ellipse(xs, ys, e.dx, e.dy, e.rx * 1.25, e.ry * 1.2, 2.0 * e.s)
    win *= 1.0 + 0.12 * (halo - disc)
    cup_ry = float(np.clip(cdr, 0.05, 0.95)) * e.ry
    cup_rx = min(cup_ry * rng.uniform(0.8, 0.95), 0.9 * e.rx)
    cup = _soft_ellipse(xs, ys, e.dx - e.side * 0.08 * e.rx, e.dy, cup_rx, cup_ry, 1.3 * e.s)
    rim = np.array([0.95, 0.58, 0.36], np.float32) * (rng.uniform(0.9, 1.05) * lum)
    pale = np.array([1.0, 0.96, 0.86], np.float32) * min(1.0, lum * 1.15)
    for c in range(3):
        win[c] = (win[c] * (1 - disc) + rim[c] * disc) * (1 - cup) + pale[c] * cup


# ---------------------------------------------------------------- vessel tree ----------------


def _walks(rng, starts, headings, n: int, step, turn: float, pull: float = 0.15) -> np.ndarray:
    """``m`` random-walk polylines at once, (m, n + 1, 2).

    Each heading wanders as an AR(1) process around its initial value (``pull`` drags it
    back), so vessels curve smoothly without looping.  ``step`` may be per-walk.
    """
    starts = np.asarray(starts, np.float64).reshape(-1, 2)
    dev = rng.normal(0.0, turn, (n, len(starts)))
    for i in range(1, n):  # AR(1): dev[i] = (1 - pull) dev[i - 1] + turn noise
        dev[i] += (1.0 - pull) * dev[i - 1]
    h = np.asarray(headings, np.float64)[None, :] + dev
    st = np.asarray(step, np.float64)
    d = np.stack([np.cos(h) * st, np.sin(h) * st], -1)  # (n, m, 2)
    pts = np.concatenate([starts[None], starts[None] + np.cumsum(d, 0)], 0)
    return pts.transpose(1, 0, 2)


def _arcade(rng, e: _Eye, vsign: int, radial: float) -> np.ndarray:
    """Main arcade around the fovea: leaves the disc vertically and arches temporally."""
    ux, uy = e.dx - e.fx, e.dy - e.fy
    dist = float(np.hypot(ux, uy))
    ux, uy = ux / dist, uy / dist
    vx, vy = -uy, ux  # perpendicular; flip so it points up (vsign -1) or down (+1)
    if vy * vsign < 0:
        vx, vy = -vx, -vy
    n = 22
    psi = np.linspace(0.0, np.deg2rad(rng.uniform(110, 140)), n)
    wobble = np.cumsum(rng.normal(0, 0.03, n)) * e.dd
    spread = 0.35 * np.maximum(0.0, psi - np.pi / 2)  # arcades diverge temporally
    rho = dist * radial * (1.0 - 0.28 * np.sin(psi) + spread) + wobble
    rho[0] = dist
    px = e.fx + rho * (np.cos(psi) * ux + np.sin(psi) * vx)
    py = e.fy + rho * (np.cos(psi) * uy + np.sin(psi) * vy)
    py[0] += vsign * rng.uniform(0.0, 0.15) * e.dd  # emerge from the cup, not one point
    return np.stack([px, py], 1)


def _grow(rng, parents: list, k_lo: int, k_hi: int, e: _Eye) -> list:
    """Side branches of ``parents`` [(points, width, kind)]: k_lo..k_hi each, all walked at once."""
    ks = rng.integers(k_lo, k_hi + 1, len(parents))
    pid = np.repeat(np.arange(len(parents)), ks)
    m = len(pid)
    if m == 0:
        return []
    lens = np.array([len(p[0]) for p in parents])
    pad = np.zeros((len(parents), lens.max(), 2))
    for j, p in enumerate(parents):
        pad[j, : lens[j]] = p[0]
    frac = rng.uniform(0.15, 0.9, m)
    i = np.clip((frac * (lens[pid] - 1)).astype(int), 1, lens[pid] - 2)
    t = pad[pid, i + 1] - pad[pid, i - 1]
    ang = np.arctan2(t[:, 1], t[:, 0]) + (2 * rng.integers(0, 2, m) - 1) * rng.uniform(0.45, 1.0, m)
    ns = rng.integers(5, 12, m)
    walks = _walks(rng, pad[pid, i], ang, int(ns.max()), 0.22 * e.dd, 0.18)
    wid = np.array([p[1] for p in parents])[pid] * (1 - 0.5 * frac) * rng.uniform(0.5, 0.7, m)
    return [(walks[c, : ns[c] + 1], wid[c], parents[j][2]) for c, j in enumerate(pid.tolist())]


def _vessel_tree(rng, e: _Eye) -> tuple[list, list]:
    """Polylines ``(points, width, kind)`` of the vessel tree, and the four arcade trunks.

    Per half (superior/inferior): a vein and an artery arcade, a nasal vein and artery;
    arcades branch twice, nasal vessels once; two small papillomacular vessels.
    """
    arcades, nasal = [], []
    for vsign in (-1, 1):
        for kind, w0, radial in (("vein", 2.3, 1.04), ("artery", 1.7, 0.96)):
            w0 = w0 * e.s * rng.uniform(0.9, 1.1)
            arcades.append((_arcade(rng, e, vsign, radial * rng.uniform(0.95, 1.05)), w0, kind))
            ang = np.arctan2(vsign * 1.0, e.side * rng.uniform(0.4, 1.2))
            nasal.append((ang, 0.75 * w0, kind))
    nw = _walks(rng, np.full((4, 2), (e.dx, e.dy)), [a for a, _, _ in nasal], 12, 0.3 * e.dd, 0.12)
    nasal = [(nw[i, : int(rng.integers(9, 14))], w, k) for i, (_, w, k) in enumerate(nasal)]
    level1 = _grow(rng, arcades, 3, 4, e) + _grow(rng, nasal, 1, 2, e)
    level2 = _grow(rng, level1, 0, 1, e)
    pm_ang = np.arctan2(e.fy - e.dy, e.fx - e.dx) + rng.normal(0, 0.35, 2)
    pmw = _walks(rng, np.full((2, 2), (e.dx, e.dy)), pm_ang, 6, 0.25 * e.dd, 0.2)
    pm = [(pmw[i], 0.8 * e.s, "artery" if rng.random() < 0.5 else "vein") for i in range(2)]
    return arcades + nasal + level1 + level2 + pm, [a[0] for a in arcades]


class _Masks:
    """Super-sampled 8-bit drawing masks, one per paint layer."""

    names = ("vein", "artery", "blood", "exudate", "cotton")

    def __init__(self, h: int, w: int):
        self.img = {n: Image.new("L", (w * SS, h * SS), 0) for n in self.names}
        self.draw = {n: ImageDraw.Draw(im) for n, im in self.img.items()}
        self.used: set[str] = set()

    @staticmethod
    def xy(p):
        return (SS * p[0] + (SS - 1) / 2, SS * p[1] + (SS - 1) / 2)

    def polyline(self, layer, pts, w_start, w_end, chunks=3):
        """Draw a tapering polyline in ``chunks`` pieces; sub-pixel widths get a fainter ink."""
        n = len(pts)
        k = max(1, min(chunks, n - 1))
        flat = (np.asarray(pts, np.float64) * SS + (SS - 1) / 2).ravel().tolist()
        draw = self.draw[layer]
        for c in range(k):
            a, b = (c * (n - 1)) // k, ((c + 1) * (n - 1)) // k
            wid = (w_start + (w_end - w_start) * (c + 0.5) / k) * SS
            iw = max(1, int(wid + 0.5))
            draw.line(flat[2 * a: 2 * b + 2], fill=int(255 * min(1.0, wid / iw)), width=iw,
                      joint="curve" if iw > 2 else None)
        self.used.add(layer)

    def spot(self, layer, x, y, rx, ry=None, fill=255):
        ry = rx if ry is None else ry
        (X, Y), RX, RY = self.xy((x, y)), rx * SS, ry * SS
        self.draw[layer].ellipse([X - RX, Y - RY, X + RX, Y + RY], fill=fill)
        self.used.add(layer)

    def arrays(self, blur: dict) -> dict:
        """Coverage (0..1, float32 (H, W)) of each layer drawn to; ``blur`` sigmas in pixels."""
        out = {}
        for n in self.used:
            im = self.img[n].reduce(SS)
            if n in blur:
                im = im.filter(ImageFilter.GaussianBlur(blur[n]))
            out[n] = np.asarray(im) * np.float32(1.0 / 255.0)
        return out


# ---------------------------------------------------------------- lesions ---------------------


def _lesion_counts(rng, grade: int) -> dict:
    """Random lesion counts for an ICDR grade; neighbouring grades overlap a little.

    1: microaneurysms only (at least 2); 2: + a few blot / flame haemorrhages and usually
    hard exudates; 3: haemorrhages in all four quadrants, exudates, cotton-wool spots;
    4: grade 3's background + 1-3 neovascular tufts and often a pre-retinal haemorrhage.
    """
    p = rng.poisson
    c = dict(ma=0, blot=0, flame=0, quadrant_blots=0, ex_clusters=0, ex_size=0, cws=0, nv=0, prh=0)
    if grade == 1:
        c.update(ma=2 + p(4))
    elif grade == 2:
        c.update(ma=3 + p(5), blot=p(3), flame=p(0.8), ex_clusters=int(rng.random() < 0.6)
                 + int(rng.random() < 0.2), ex_size=3 + p(4), cws=p(0.4))
        if c["blot"] + c["flame"] + c["ex_clusters"] == 0:
            c["blot"] = 1
    elif grade >= 3:
        sev = rng.uniform(0.7, 1.3)
        c.update(ma=5 + p(8 * sev), quadrant_blots=2 + p(2 * sev), flame=p(2 * sev),
                 ex_clusters=1 + p(1), ex_size=4 + p(5 * sev), cws=1 + p(2 * sev))
        if grade == 4:
            c.update(nv=1 + rng.binomial(2, 0.5), prh=int(rng.random() < 0.5))
    return c


def _field_points(rng, e: _Eye, n: int, rmin=0.0, rmax=0.88, angles=None) -> np.ndarray:
    """``n`` random points in the fundus field (polar annulus / sector), avoiding the disc."""
    m = 3 * n + 4
    th = rng.uniform(*(angles or (0, 2 * np.pi)), m)
    r = e.rf * np.sqrt(rng.uniform(rmin**2, rmax**2, m))
    pts = np.stack([e.cx + r * np.cos(th), e.cy + r * np.sin(th)], 1)
    ok = np.hypot(pts[:, 0] - e.dx, pts[:, 1] - e.dy) > 0.8 * e.dd
    return pts[ok][:n]


def _lesions(rng, e: _Eye, grade: int, masks: _Masks, trunks: list) -> None:
    """Draw the lesions of ``grade`` into the masks.

    Sizes are in pixels at 128 px (``e.s`` units).  They are chosen so that every kind still
    covers a pixel after the demo's data stage (96 px photos, field cropped and resized to 64 px:
    one unit ~0.53 stored px): a microaneurysm has a diameter of >= 1 stored px, a hard exudate
    nearly so, and a neovascular tuft is a tangle of ~1.3 unit wide loops a few stored px across.
    """
    if grade <= 0:
        return
    c = _lesion_counts(rng, grade)
    s = e.s
    for x, y in _field_points(rng, e, c["ma"], 0.05):
        masks.spot("blood", x, y, rng.uniform(1.0, 1.4) * s)
    blots = [_field_points(rng, e, c["blot"], 0.1, 0.75)]
    for q in range(4 if c["quadrant_blots"] else 0):
        a0 = np.pi / 4 + q * np.pi / 2
        blots.append(_field_points(rng, e, c["quadrant_blots"], 0.2, 0.88, (a0, a0 + np.pi / 2)))
    for x, y in np.concatenate(blots):
        r = rng.uniform(1.2, 3.0) * s
        for _ in range(int(rng.integers(1, 4))):
            ox, oy = rng.normal(0, 0.5 * r, 2)
            masks.spot("blood", x + ox, y + oy, r * rng.uniform(0.6, 1.0), r * rng.uniform(0.6, 1.0))
    for _ in range(c["flame"]):  # flame haemorrhages: radial streaks around the disc
        a, rr = rng.uniform(0, 2 * np.pi), e.dd * rng.uniform(0.8, 2.5)
        x, y = e.dx + rr * np.cos(a), e.dy + rr * np.sin(a)
        ln = rng.uniform(2.5, 5.0) * s
        seg = np.array([[x, y], [x + ln * np.cos(a), y + ln * np.sin(a)]])
        masks.polyline("blood", seg, rng.uniform(1.6, 2.6) * s, 0.8 * s, chunks=1)
    for _ in range(c["ex_clusters"]):  # hard exudates: (partial) rings near the macula
        a, rr = rng.uniform(0, 2 * np.pi), e.dd * rng.uniform(0.3, 1.8)
        ccx, ccy = e.fx + rr * np.cos(a), e.fy + rr * np.sin(a)
        ring = e.dd * rng.uniform(0.2, 0.6)
        t = rng.uniform(0, 2 * np.pi, c["ex_size"])
        jit = rng.normal(0, 0.12 * e.dd, (c["ex_size"], 2))
        for k in range(c["ex_size"]):
            masks.spot("exudate", ccx + ring * np.cos(t[k]) + jit[k, 0],
                       ccy + ring * np.sin(t[k]) + jit[k, 1], rng.uniform(0.8, 1.5) * s)
    all_trunk = np.concatenate(trunks)
    for _ in range(c["cws"]):  # cotton-wool spots: fluffy, near the arcades
        x, y = all_trunk[rng.integers(len(all_trunk))] + rng.normal(0, 0.4 * e.dd, 2)
        masks.spot("cotton", x, y, rng.uniform(1.8, 3.2) * s, rng.uniform(1.4, 2.6) * s)
    for _ in range(c["nv"]):  # neovascular tufts: at the disc margin (NVD) or on an arcade (NVE)
        k = int(rng.integers(12, 19))
        if rng.random() < 0.5:  # NVD grows outwards from the rim, so the cup stays visible
            a = rng.uniform(0, 2 * np.pi)
            ox, oy = e.dx + 1.1 * e.rx * np.cos(a), e.dy + 1.1 * e.ry * np.sin(a)
            heads = a + rng.uniform(-0.8, 0.8, k)
        else:
            ox, oy = all_trunk[rng.integers(len(all_trunk))] + rng.normal(0, 0.15 * e.dd, 2)
            heads = rng.uniform(0, 2 * np.pi, k)
        tuft = _walks(rng, np.full((k, 2), (ox, oy)), heads, 8, 0.1 * e.dd, 0.9, pull=0.0)
        for sq in tuft:
            masks.polyline("blood", sq, 1.3 * s, 0.9 * s, chunks=1)
    if c["prh"]:  # pre-retinal (boat-shaped) haemorrhage with a flat fluid level
        x, y = all_trunk[rng.integers(len(all_trunk))]
        hw = e.dd * rng.uniform(0.5, 0.9)
        (X, Y), R = masks.xy((x, y)), hw * SS
        masks.draw["blood"].chord([X - R, Y - 0.7 * R, X + R, Y + 0.7 * R], 0, 180, fill=255)
        masks.used.add("blood")


# ---------------------------------------------------------------- compositing -----------------


def make_cfp(
    rng: np.random.Generator, size: int, dr_grade: int, cdr: float, eye: str = "R",
    style: str | DeviceStyle = "A", vessel_mask: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """A colour fundus photo phantom, uint8 (H, W, 3) with H = ``size``, W = round(1.25 size).

    ``dr_grade`` is the ICDR grade (0 none, 1 microaneurysms, 2 + blot haemorrhages and
    exudates, 3 many haemorrhages in all quadrants + cotton-wool spots, 4 + neovascular tufts
    and possibly a pre-retinal haemorrhage); ``cdr`` is the vertical cup-to-disc ratio;
    ``eye`` "R" puts the disc right of centre, "L" mirrors it; ``style`` is the device
    (see :mod:`retflow.phantoms.style`).

    With ``vessel_mask=True`` returns ``(photo, mask)``: ``mask`` uint8 (H, W), 1 where the
    vessel tree (veins + arteries) covers at least :data:`VESSEL_COVERAGE` of a pixel inside the
    field, else 0 (the ground truth for vessel segmentation; the photo is the same either way).
    """
    if not 0 <= int(dr_grade) <= 4:
        raise ValueError(f"dr_grade must be 0..4, got {dr_grade}")
    st = get_style(style)
    anat_rng, lesion_rng, style_rng = rng.spawn(3)
    e = _sample_eye(anat_rng, size, eye, st)
    xx, yy = _grid(e.h, e.w)
    img, illum = _fundus(anat_rng, e, st, xx, yy)
    _disc(img, e, cdr, anat_rng, xx, yy, illum)
    masks = _Masks(e.h, e.w)
    paths, trunks = _vessel_tree(anat_rng, e)
    for i, (pts, w0, kind) in enumerate(paths):  # 8 trunks taper in 3 steps, branches in 2
        masks.polyline(kind, pts, w0, 0.42 * w0, chunks=3 if i < 8 else (2 if len(pts) > 8 else 1))
    _lesions(lesion_rng, e, int(dr_grade), masks, trunks)
    m = masks.arrays(blur={"cotton": 1.0 * e.s})
    lum = np.clip(illum, 0.2, 1.0)
    ex = 0.9 * m["exudate"] if "exudate" in m else None
    cw = np.clip(1.3 * m["cotton"], 0.0, 0.85) if "cotton" in m else None
    field = _soft_ellipse(xx, yy, e.cx, e.cy, e.rf, e.rf, 1.0)
    for c in range(3):  # channel by channel: contiguous arrays are much faster than (H, W, 3)
        x = img[c]
        if ex is not None:
            x = x * (1.0 - ex) + ex * lum * _EXUDATE[c]
        for layer, col in (("blood", _BLOOD), ("vein", _VEIN), ("artery", _ARTERY)):
            if layer in m:
                x *= 1.0 - m[layer] * (1.0 - col[c])
        if cw is not None:
            x = x * (1.0 - cw) + cw * lum * _COTTON[c]
        x *= field
        img[c] = x
    photo = finish_rgb(img, st, style_rng)
    if not vessel_mask:
        return photo
    zero = np.zeros((e.h, e.w), np.float32)
    cover = np.maximum(m.get("vein", zero), m.get("artery", zero))
    return photo, ((cover >= VESSEL_COVERAGE) & (field >= 0.5)).astype(np.uint8)
