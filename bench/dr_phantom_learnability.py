"""Can phantom DR grading be learned at the demo's resolution? Cheap stand-ins for the demo's models.

Generates the demo's labelled fundus set (``cfp_clinic``: cfp, n 500, seed 12, style A, 96 px),
runs every photo through the data stage's own CFP preprocessing (field crop, pad to square,
LANCZOS resize to ``--stored`` px, no enhancement), splits 80/20 by patient and reports the
quadratic-weighted kappa (QWK, the demo's primary metric for ``dr_grading``) on the held-out 20 % of

* ``features+logreg``: a multinomial logistic regression on hand-made image features (mean colour
  in four rings, dark/bright residual pixel shares at three thresholds, counts of small and large
  dark/bright blobs; the residual is the green channel minus its median-filtered background);
* ``features+ridge``: a ridge regression of the grade on the same features, rounded (an ordinal
  stand-in);
* ``tiny CNN``: a tiny CNN (3 conv blocks, class-weighted cross entropy like the demo's fine-tune,
  horizontal flips) trained from scratch for ``--cnn-epochs`` on the CPU; optionally (``--vit-epochs``) the
  demo config's ViT (``vit`` section), also from scratch.

Writes a contact sheet (``--per-grade`` photos per grade, one row per grade, at the stored size,
magnified ``--zoom`` x with nearest-neighbour so the pixels stay visible) to ``--sheet``.

    nice -n 10 .venv/bin/python bench/dr_phantom_learnability.py --sheet /tmp/dr_after.png
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from retflow.data.preprocess import preprocess_cfp
from retflow.phantoms.generate import generate_dataset

N_GRADES = 5


def load_stored(n: int, seed: int, style: str, size: int, stored: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate the phantom set and preprocess it like the data stage: (images uint8 (N, s, s, 3), grades, patients)."""
    with tempfile.TemporaryDirectory() as tmp:
        table = generate_dataset("cfp", Path(tmp), n=n, seed=seed, style=style, size=size)
        imgs = [preprocess_cfp(np.asarray(Image.open(Path(tmp) / "images" / name).convert("RGB")),
                               stored, crop_border=True, enhance="none")[0] for name in table["image"]]
    return np.stack(imgs), table["dr_grade"].to_numpy(int), table["patient_id"].to_numpy()


def split(patients: np.ndarray, test: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Patient-level train/test indices (both eyes of a patient on the same side)."""
    from sklearn.model_selection import GroupShuffleSplit

    tr, te = next(GroupShuffleSplit(n_splits=1, test_size=test, random_state=seed).split(patients, groups=patients))
    return tr, te


def features(img: np.ndarray) -> np.ndarray:
    """Hand-made lesion features of one stored photo (H, W, 3) uint8."""
    from scipy import ndimage
    from skimage.measure import label

    x = img.astype(np.float32)
    h, w = x.shape[:2]
    field = ndimage.binary_erosion(x.max(-1) > 20, iterations=2)
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2) / (min(h, w) / 2)
    feats = []
    for lo, hi in ((0, 0.3), (0.3, 0.55), (0.55, 0.75), (0.75, 1.0)):  # mean colour in rings
        ring = field & (r >= lo) & (r < hi)
        feats += list(x[ring].mean(0) if ring.any() else np.zeros(3))
    g = x[..., 1]
    res = g - ndimage.median_filter(g, size=9)
    vals = res[field]
    n = max(1, field.sum())
    for t in (5, 10, 18):
        feats += [(vals < -t).sum() / n, (vals > t).sum() / n]
    for sign in (-1, 1):
        lab = label(field & (sign * res > 8))
        sizes = np.bincount(lab.ravel())[1:]
        feats += [(sizes <= 4).sum(), ((sizes > 4) & (sizes <= 16)).sum(), (sizes > 16).sum()]
    feats += [vals.std(), np.percentile(vals, 1), np.percentile(vals, 99)]
    return np.asarray(feats, np.float32)


def qwk(y, p) -> float:
    from sklearn.metrics import cohen_kappa_score

    return float(cohen_kappa_score(y, p, labels=list(range(N_GRADES)), weights="quadratic"))


def confusion(y, p) -> str:
    """Confusion matrix rows (true grade) as one compact string, e.g. ``0:[30 1 0 0 0]``."""
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(y, p, labels=list(range(N_GRADES)))
    return " ".join(f"{g}:[{' '.join(str(v) for v in row)}]" for g, row in enumerate(cm))


def feature_learners(imgs, y, tr, te) -> dict:
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    f = np.stack([features(im) for im in imgs])
    logreg = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=2000, class_weight="balanced"))
    logreg.fit(f[tr], y[tr])
    ridge = make_pipeline(StandardScaler(), Ridge(alpha=3.0)).fit(f[tr], y[tr])
    pr = np.clip(np.rint(ridge.predict(f[te])), 0, N_GRADES - 1).astype(int)
    return {"features+logreg": (y[te], logreg.predict(f[te])), "features+ridge": (y[te], pr)}


def tiny_cnn(n_out: int):
    from torch import nn

    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                             nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(block(3, 16), block(16, 32), block(32, 48), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(48, n_out))


def demo_vit(config: Path, n_out: int):
    """The demo config's fine-tune ViT (``vit`` section), random init."""
    import yaml

    from retflow.models.vit import ViTSpec, create_vit

    return create_vit(ViTSpec.from_dict(yaml.safe_load(config.read_text())["vit"]), n_out)


def train_scratch(net, imgs, y, tr, te, epochs: int, lr: float, seed: int = 0) -> np.ndarray:
    """Test-set predictions of ``net`` trained from scratch on ``tr`` for ``epochs`` (class-weighted
    cross entropy like the demo's fine-tune, AdamW, one warm-up epoch then cosine decay,
    horizontal flips, batch 32). Deterministic for a seed on the CPU."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    torch.set_num_threads(2)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
    x = (x - x[tr].mean((0, 2, 3), keepdim=True)) / x[tr].std((0, 2, 3), keepdim=True)
    yt = torch.from_numpy(y.copy())
    counts = np.bincount(y[tr], minlength=N_GRADES).astype(np.float32)
    weight = torch.from_numpy(counts.sum() / (N_GRADES * np.maximum(counts, 1)))
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    tr_t = torch.from_numpy(tr)
    batches = tr_t.split(32)
    steps, step = epochs * len(batches), 0
    for _ in range(epochs):
        net.train()
        for b in tr_t[torch.randperm(len(tr_t), generator=gen)].split(32):
            warm = len(batches)
            f = (step + 1) / warm if step < warm else 0.5 * (1 + np.cos(np.pi * (step - warm) / max(1, steps - warm)))
            for grp in opt.param_groups:
                grp["lr"] = lr * f
            step += 1
            xb = x[b]
            flip = torch.rand(len(b), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            opt.zero_grad()
            loss_fn(net(xb), yt[b]).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        return net(x[torch.from_numpy(te)]).argmax(1).numpy()


def contact_sheet(imgs, y, per_grade: int, zoom: int, path: Path) -> None:
    """Rows = grades 0..4, ``per_grade`` photos each (the first of each grade), magnified ``zoom`` x."""
    s = imgs.shape[1]
    pad = 2
    sheet = np.full((N_GRADES * (s + pad), per_grade * (s + pad), 3), 255, np.uint8)
    for g in range(N_GRADES):
        for j, i in enumerate(np.flatnonzero(y == g)[:per_grade]):
            sheet[g * (s + pad): g * (s + pad) + s, j * (s + pad): j * (s + pad) + s] = imgs[i]
    im = Image.fromarray(sheet)
    im.resize((im.width * zoom, im.height * zoom), Image.NEAREST).save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--style", default="A")
    ap.add_argument("--size", type=int, default=96, help="generated image height")
    ap.add_argument("--stored", type=int, default=64, help="side after the data stage's resize")
    ap.add_argument("--cnn-epochs", type=int, default=20, help="0 skips the CNN")
    ap.add_argument("--vit-epochs", type=int, default=0, help="the demo's ViT from scratch; 0 skips it")
    ap.add_argument("--config", type=Path, default=ROOT / "config.yaml", help="for the ViT's spec")
    ap.add_argument("--sheet", type=Path, default=None, help="contact sheet PNG")
    ap.add_argument("--per-grade", type=int, default=6)
    ap.add_argument("--zoom", type=int, default=3)
    a = ap.parse_args(argv)

    t0 = time.perf_counter()
    imgs, y, patients = load_stored(a.n, a.seed, a.style, a.size, a.stored)
    tr, te = split(patients)
    print(f"{len(y)} photos (style {a.style}, {a.size} px -> {a.stored} px) in {time.perf_counter() - t0:.1f}s; "
          f"grades {np.bincount(y, minlength=N_GRADES).tolist()}; train {len(tr)} / test {len(te)} "
          f"(test grades {np.bincount(y[te], minlength=N_GRADES).tolist()})")
    if a.sheet:
        contact_sheet(imgs, y, a.per_grade, a.zoom, a.sheet)
        print(f"contact sheet -> {a.sheet}")
    rows = feature_learners(imgs, y, tr, te)
    learners = [("tiny CNN", a.cnn_epochs, lambda: tiny_cnn(N_GRADES), 2e-3),
                ("demo ViT", a.vit_epochs, lambda: demo_vit(a.config, N_GRADES), 1e-3)]
    for name, epochs, build, lr in learners:
        if epochs > 0:
            t1 = time.perf_counter()
            pred = train_scratch(build(), imgs, y, tr, te, epochs, lr)
            rows[f"{name}, scratch, {epochs} epochs ({time.perf_counter() - t1:.0f}s)"] = (y[te], pred)
    for name, (yt, p) in rows.items():
        print(f"  QWK {qwk(yt, p):6.3f}  {name:42s} confusion {confusion(yt, p)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
