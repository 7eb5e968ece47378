"""Off-centre OCT phantoms: a volume label that the central B-scan cannot see.

Kind ``oct_offcentre`` (written by :func:`retflow.phantoms.generate.generate_dataset`): macular
volumes like ``oct_volume`` whose binary label ``extrafoveal_irf`` is intraretinal fluid -- a
cluster of cystoid spaces in the INL/OPL/ONL over a focal retinal thickening -- lying only
outside the foveal centre, as in non-centre-involving diabetic macular oedema.  Every lesion of
a positive eye lies at ``|z| >= Z_MIN`` (``z`` in [-1, 1] the B-scan position, 0 = fovea; 0.4 of
a 6 mm cube is 1.2 mm from the fovea, outside the ETDRS central subfield), so the central
B-scan -- and the central three of a 16-slice volume (``|z| <= 0.2``) -- never show it, while at
least one off-centre B-scan shows its main cyst nearly at full size.  Negative eyes have no
lesion at ``|z| >= Z_CENTRAL``.

The central content is drawn independently of the label: each eye is normal or has foveal
drusen (``foveal_drusen``, confined to ``|z| <= Z_CENTRAL``) with :data:`FOVEAL_DRUSEN_P`.
The lesion's parameters are drawn for every eye and attached only to positive ones, so an eye
drawn from the same generator state renders bit-identical central B-scans with and without the
label: the central B-scan carries no information about it.
"""

from __future__ import annotations

import numpy as np

from .oct import OctEye, sample_oct_eye

__all__ = ["FOVEAL_DRUSEN_P", "LABEL", "POSITIVE_P", "Z_CENTRAL", "Z_MIN", "lesion_positions",
           "sample_offcentre_eye"]

LABEL = "extrafoveal_irf"
Z_MIN = 0.4  # a positive eye's lesions lie at |z| >= Z_MIN
Z_CENTRAL = 0.35  # the foveal drusen (either class) lie at |z| <= Z_CENTRAL
POSITIVE_P = 0.5  # eyes with extrafoveal intraretinal fluid
FOVEAL_DRUSEN_P = 0.5  # eyes with foveal drusen, independent of the label
_ANCHOR_MARGIN = 0.1  # a cluster is anchored on a slice at |z| >= Z_MIN + _ANCHOR_MARGIN
_MAIN_RZ = (0.1, 0.2)  # the main cyst's half-extent in z: it is clipped to |z| >= Z_MIN + rz, so
#                        its anchor slice sees it at >= sqrt(1 - 0.5^2) = 87 % of its size


def lesion_positions(positions: np.ndarray) -> np.ndarray:
    """The slice positions a positive eye's lesion cluster can be anchored on."""
    p = np.asarray(positions, np.float64)
    return p[np.abs(p) >= Z_MIN + _ANCHOR_MARGIN]


def _foveal_drusen(rng: np.random.Generator, uf: float) -> np.ndarray:
    """Drusen [u, z, ru, rz, h] around the fovea, every one inside ``|z| <= Z_CENTRAL``; the
    first spans the foveal B-scan."""
    rows = []
    for i in range(1 + int(rng.poisson(2))):
        if i == 0:
            row = [uf + rng.normal(0, 0.1), rng.uniform(-0.05, 0.05), rng.uniform(0.07, 0.14),
                   rng.uniform(0.2, 0.3), rng.uniform(0.028, 0.04)]
        else:
            row = [uf + rng.normal(0, 0.3), rng.normal(0, 0.12), rng.uniform(0.05, 0.12),
                   rng.uniform(0.08, 0.25), rng.uniform(0.015, 0.035)]
        row[1] = float(np.clip(row[1], -0.25, 0.25))
        row[3] = min(row[3], Z_CENTRAL - abs(row[1]))
        rows.append(row)
    return np.asarray(rows, np.float64)


def _outward(z: np.ndarray, rz: np.ndarray, side: float) -> np.ndarray:
    """Centres ``z`` moved (outwards, on ``side``) until each extent ``rz`` clears ``Z_MIN``."""
    return side * np.clip(side * z, Z_MIN + rz, None)


def _cluster(rng: np.random.Generator, anchor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One cluster of cysts [u, z, ru, rz, ry, depth] with its oedema [u, z, ru, rz, amplitude]
    and hyperreflective foci [u, z, rz, depth], anchored on the slice at ``anchor``."""
    side = float(np.sign(anchor))
    uc = rng.uniform(-0.6, 0.6)
    z0 = anchor + rng.uniform(-0.05, 0.05)
    k = int(rng.integers(3, 7))
    cysts = np.stack([uc + rng.normal(0, 0.1, k), z0 + rng.normal(0, 0.04, k),
                      rng.uniform(0.05, 0.1, k), rng.uniform(0.08, 0.16, k),
                      rng.uniform(0.025, 0.045, k), rng.uniform(0.2, 0.7, k)], 1)
    cysts[0] = [uc, z0, rng.uniform(0.09, 0.14), rng.uniform(*_MAIN_RZ), rng.uniform(0.04, 0.06),
                rng.uniform(0.3, 0.5)]
    cysts[:, 1] = _outward(cysts[:, 1], cysts[:, 3], side)
    ext = float(np.max(np.abs(cysts[:, 1] - z0) + cysts[:, 3]))
    oedema = np.array([[uc, 0.0, rng.uniform(0.25, 0.4), ext, rng.uniform(0.06, 0.1)]])
    oedema[:, 1] = _outward(np.array([z0]), oedema[:, 3], side)
    m = int(rng.integers(2, 6))
    foci = np.stack([uc + rng.normal(0, 0.2, m), z0 + rng.normal(0, 0.05, m),
                     rng.uniform(0.05, 0.12, m), rng.uniform(0.0, 1.0, m)], 1)
    foci[:, 1] = _outward(foci[:, 1], foci[:, 2], side)
    return cysts, oedema, foci


def sample_offcentre_eye(rng: np.random.Generator, positions: np.ndarray, lesion: bool,
                         foveal_drusen: bool) -> OctEye:
    """Draw one eye of kind ``oct_offcentre`` for a volume with slices at ``positions``.

    ``lesion``: extrafoveal intraretinal fluid (1-2 clusters, each anchored on a slice of
    :func:`lesion_positions`, every lesion at ``|z| >= Z_MIN``); ``foveal_drusen``: drusen inside
    ``|z| <= Z_CENTRAL``.  Both lesion sets are drawn for every eye (the generator's state after
    this call does not depend on the two flags) and attached as the flags say.
    """
    anchors = lesion_positions(positions)
    if len(anchors) == 0:
        raise ValueError(f"oct_offcentre needs slices at |z| >= {Z_MIN + _ANCHOR_MARGIN:g} to place "
                         f"the lesion on (a volume of >= 3 B-scans); positions were {np.round(positions, 3).tolist()}")
    e = sample_oct_eye(rng, "normal")
    drusen = _foveal_drusen(rng, e.fovea_u)
    n_clusters = 1 + int(rng.random() < 0.3)
    parts = [_cluster(rng, float(rng.choice(anchors))) for _ in range(2)]  # always two drawn
    if foveal_drusen:
        e.diagnosis, e.drusen = "drusen", drusen
    if lesion:
        e.cysts, e.oedema, e.foci = (np.concatenate([p[i] for p in parts[:n_clusters]]) for i in range(3))
    return e
