"""Paired CFP + OCT phantoms: the same patients' eyes photographed and scanned, labelled ``refer``.

Two phantom kinds, ``paired_cfp`` and ``paired_oct``, generated as two datasets with the same
``n`` and ``seed``: both draw the same eyes from :func:`paired_eyes` (a pure function of
``n, seed``) and each renders its own modality, so each dataset is one independent job.

Every eye has two independent causes: a DR grade (0-4, :data:`DR_GRADE_P`: referable, grade >= 2,
in 30 % of eyes), seen on the fundus photo only, and retinal fluid (``fluid`` 0/1 with
:data:`FLUID_P` = 30 %: a DME eye with intraretinal cysts through the fovea, else a normal or
drusen eye), seen on the OCT only. The label ``refer = (dr_grade >= 2) or fluid`` (51 % of eyes)
therefore needs both modalities: about 59 % of the referred eyes show it on the photo, 59 % on the
scan, 18 % on both; a perfect single-modality model reaches AUROC ~0.80, a perfect fusion model 1.
(With the CFP phantoms' grade mix, 45 % referable, and 35 % fluid, 64 % of the eyes were referred
and the OCT explained too little of it for a small ViT to learn from 175 eyes.)

Layout (``out_dir`` = ``results/raw/<dataset>``, read by ``prepare_dataset`` like the other phantoms):

* ``paired_cfp``: ``images/{patient}_{eye}.png`` (as kind ``cfp``); columns
  ``image,patient_id,eye,refer,visit,dr_grade``;
* ``paired_oct``: ``images/{patient}_{eye}.png`` one foveal grey B-scan size x size; columns
  ``image,patient_id,eye,refer,visit,fluid,diagnosis,irf,srf`` (``irf`` / ``srf``: what the
  rendered B-scan shows; ``fluid`` = irf or srf by construction).

``n`` is the number of eyes: ``ceil(n / 2)`` patients with a right and a left eye (odd ``n``: the
last patient has only "R"). Some eyes are unpaired on purpose, so pairing has something to
report: about :data:`MISSING_P` of the two-eyed patients lack one modality of one eye ("no OCT",
"no CFP"), and about :data:`VISIT_SHIFT_P` of the eyes were scanned at a later visit than they
were photographed (``visit`` differs). The dropped eye is never the more severe one of its
patient, so both datasets hold the same patients with the same most-severe ``refer``: with
``refer`` as the first label column the two stores get the same patient split.
"""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from .cfp import make_cfp
from .oct import render_bscan, sample_oct_eye

__all__ = ["DR_GRADE_P", "FLUID_P", "MISSING_P", "PAIRED_KINDS", "VISIT_SHIFT_P", "generate_paired", "paired_eyes"]

PAIRED_KINDS = ("paired_cfp", "paired_oct")
FLUID_P = 0.30  # eyes with retinal fluid (independent of the DR grade)
#: DR grade 0-4 of a paired eye: 30 % referable (grade >= 2), as FLUID_P, so each modality explains
#: about half of the referrals (the CFP phantoms' own mix, generate.DR_GRADE_P, is 45 % referable)
DR_GRADE_P = (0.5, 0.2, 0.15, 0.1, 0.05)
MISSING_P = 0.10  # two-eyed patients with one modality missing for one eye
VISIT_SHIFT_P = 0.04  # eyes scanned at a later visit than the photo
REFER_GRADE = 2  # DR grade from which an eye is referred
_CDR = (0.2, 0.5)
_VISIT_DAYS = 90


def _pid(i: int, n: int) -> str:
    return f"P{i:0{max(4, len(str(max(n - 1, 0))))}d}"


def paired_eyes(n: int, seed: int) -> pd.DataFrame:
    """The eyes of a paired phantom, one row each: ``patient_id, eye, dr_grade, fluid, refer,
    cdr, has_cfp, has_oct, cfp_visit, oct_visit`` (ISO dates) -- the same table for both kinds."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7001]))
    n_pat = (n + 1) // 2
    rows = []
    for i in range(n_pat):
        pid = _pid(i, n_pat)
        day = date(2023, 1, 1) + timedelta(days=int(rng.integers(0, 365)))
        eyes = ("R", "L") if 2 * i + 1 < n else ("R",)
        for eye in eyes:
            grade = int(rng.choice(5, p=DR_GRADE_P))
            fluid = int(rng.random() < FLUID_P)
            rows.append({"patient_id": pid, "eye": eye, "dr_grade": grade, "fluid": fluid,
                         "refer": int(grade >= REFER_GRADE or fluid), "cdr": round(float(rng.uniform(*_CDR)), 3),
                         "has_cfp": True, "has_oct": True, "cfp_visit": day.isoformat(), "oct_visit": day.isoformat()})
        if len(eyes) == 2 and rng.random() < MISSING_P:
            pair = rows[-2:]
            # the less severe eye (a tie: either) loses one modality: the patient's worst refer stays in both
            order = sorted(range(2), key=lambda k: (pair[k]["refer"], rng.random()))
            pair[order[0]]["has_oct" if rng.random() < 0.5 else "has_cfp"] = False
    table = pd.DataFrame(rows)
    shift = (rng.random(len(table)) < VISIT_SHIFT_P) & table["has_cfp"] & table["has_oct"]
    later = [(date.fromisoformat(d) + timedelta(days=_VISIT_DAYS)).isoformat() for d in table["cfp_visit"]]
    table["oct_visit"] = np.where(shift, later, table["oct_visit"])
    return table


def _eye_rng(seed: int, row: int, modality: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), 7002, row, PAIRED_KINDS.index(modality)]))


def _save(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr).save(path, compress_level=1)


def generate_paired(kind: str, out_dir: Path, n: int, seed: int, style: str = "A", size: int = 128) -> pd.DataFrame:
    """Render one modality of :func:`paired_eyes` into ``out_dir/images`` + ``labels.csv``; returns the table."""
    if kind not in PAIRED_KINDS:
        raise ValueError(f"kind must be one of {PAIRED_KINDS}, got {kind!r}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    eyes = paired_eyes(n, seed)
    rows = []
    for k, e in enumerate(eyes.itertuples(index=False)):
        name = f"{e.patient_id}_{e.eye}.png"
        base = {"image": name, "patient_id": e.patient_id, "eye": e.eye, "refer": e.refer}
        rng = _eye_rng(seed, k, kind)
        if kind == "paired_cfp" and e.has_cfp:
            _save(make_cfp(rng, size, e.dr_grade, e.cdr, e.eye, style), out / "images" / name)
            rows.append(dict(base, visit=e.cfp_visit, dr_grade=e.dr_grade))
        elif kind == "paired_oct" and e.has_oct:
            eye_rng, scan_rng = rng.spawn(2)
            # fluid: a DME eye (its largest cyst lies through the fovea); dry: normal or drusen
            diagnosis = "dme" if e.fluid else ("drusen" if eye_rng.random() < 0.3 else "normal")
            img, signs = render_bscan(sample_oct_eye(eye_rng, diagnosis), scan_rng, (size, size), 0.0, style)
            _save(img, out / "images" / name)
            rows.append(dict(base, visit=e.oct_visit, fluid=e.fluid, diagnosis=diagnosis, irf=signs["irf"],
                             srf=signs["srf"]))
    table = pd.DataFrame(rows)
    table.to_csv(out / "labels.csv", index=False)
    return table
