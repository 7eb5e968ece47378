"""Does the ``oct_offcentre`` label need the whole volume? Cheap stand-ins for the 3-D and 2-D models.

Generates an ``oct_offcentre`` phantom set (default n 300, seed 31, style A, 96 px, 9 slices),
runs every B-scan through the data stage's own OCT preprocessing (robust min/max, LANCZOS resize
to ``--stored`` px, as the models see it) and reports the out-of-fold AUROC (5-fold, grouped by
patient, stratified by the label) of ``extrafoveal_irf`` for two inputs:

* ``volume``: every B-scan of the volume;
* ``central``: the central B-scan only (``retflow.data.volumes.central_bscans(vol, 1)``), what
  the 2-D central-B-scan model sees;

each with two models:

* ``pixels+logreg``: an L2 logistic regression on the standardised pixels;
* ``random conv+logreg``: ``--filters`` fixed random 5x5 convolution filters (zero-mean), ReLU,
  global max- and mean-pooling per B-scan, then the same logistic regression -- a stand-in for a
  small untrained CNN.  For ``volume`` the B-scans' features either concatenated in slice order
  or pooled over the B-scans (max and standard deviation: the lesion's slice varies from eye to
  eye, so a model that compares B-scans wins);
* ``row-band stats+logreg``: the same logistic regression on simple statistics of each B-scan
  (mean, std, five percentiles, the means of 16 horizontal bands, the share of dark pixels),
  pooled over the B-scans (std and max - mean) for ``volume`` -- the test suite's check.

The central rows should sit at chance (the label is invisible there by construction), the volume
rows clearly above it.  A last row repeats ``central`` for ``foveal_drusen`` (central content):
the central B-scan does carry that.

    nice -n 10 .venv/bin/python bench/offcentre_learnability.py
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from retflow.data.preprocess import preprocess_oct
from retflow.data.volumes import central_bscans
from retflow.phantoms.generate import generate_dataset, load_volume


def load_stored(n: int, seed: int, style: str, size: int, n_slices: int, stored: int):
    """The phantom set as the models see it: volumes uint8 (N, S, s, s), the labels table."""
    with tempfile.TemporaryDirectory() as tmp:
        table = generate_dataset("oct_offcentre", Path(tmp), n=n, seed=seed, style=style, size=size,
                                 n_slices=n_slices)
        vols = [np.stack([preprocess_oct(b, stored)[0][..., 0] for b in load_volume(Path(tmp) / "volumes" / v)])
                for v in table["volume"]]
    return np.stack(vols), table


def random_conv_features(vols: np.ndarray, n_filters: int, seed: int = 0) -> np.ndarray:
    """(N, S, H, W) uint8 -> (N, S, 2 * n_filters): max- and mean-pooled ReLU of random 5x5 filters."""
    import torch

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_filters, 1, 5, 5, generator=g)
    w -= w.mean(dim=(2, 3), keepdim=True)
    x = torch.from_numpy(vols.reshape(-1, 1, *vols.shape[2:]).astype(np.float32) / 255.0)
    with torch.no_grad():
        y = torch.relu(torch.nn.functional.conv2d(x, w))
        f = torch.cat([y.amax(dim=(2, 3)), y.mean(dim=(2, 3))], 1)
    return f.numpy().reshape(vols.shape[0], vols.shape[1], -1)


def band_stats(vols: np.ndarray) -> np.ndarray:
    """(N, S, H, W) uint8 -> (N, S, 24): mean, std, 5 percentiles, 16 row-band means, dark share."""
    v = vols.astype(np.float32)
    n, s, h, _ = v.shape
    flat = v.reshape(n, s, -1)
    return np.concatenate([flat.mean(2, keepdims=True), flat.std(2, keepdims=True),
                           np.moveaxis(np.percentile(flat, [5, 25, 50, 75, 95], axis=2), 0, 2),
                           v.mean(3).reshape(n, s, 16, h // 16).mean(3), (flat < 30).mean(2, keepdims=True)], 2)


def oof_auroc(x: np.ndarray, y: np.ndarray, groups: np.ndarray, c: float) -> float:
    """Out-of-fold AUROC of an L2 logistic regression (5 folds, grouped, stratified)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    p = np.zeros(len(y))
    for tr, te in StratifiedGroupKFold(5, shuffle=True, random_state=0).split(x, y, groups):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
        p[te] = model.fit(x[tr], y[tr]).predict_proba(x[te])[:, 1]
    return float(roc_auc_score(y, p))


def auroc_ci(y: np.ndarray, auc: float) -> tuple[float, float]:
    """95 % CI of an AUROC by Hanley & McNeil's standard error."""
    n1, n0 = int(y.sum()), int(len(y) - y.sum())
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    se = np.sqrt((auc * (1 - auc) + (n1 - 1) * (q1 - auc**2) + (n0 - 1) * (q2 - auc**2)) / (n1 * n0))
    return auc - 1.96 * se, auc + 1.96 * se


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=31)
    ap.add_argument("--style", default="A")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--n-slices", type=int, default=9)
    ap.add_argument("--stored", type=int, default=64)
    ap.add_argument("--filters", type=int, default=32)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    vols, table = load_stored(a.n, a.seed, a.style, a.size, a.n_slices, a.stored)
    t1 = time.perf_counter()
    y, groups = table["extrafoveal_irf"].to_numpy(int), table["patient_id"].to_numpy()
    k = central_bscans(vols[0], 1)[0][0]
    feats, stats = random_conv_features(vols, a.filters), band_stats(vols)
    n = len(y)
    print(f"oct_offcentre n {n} (positives {y.sum()}), seed {a.seed}, style {a.style}, {a.size} px -> "
          f"{a.stored} px, {a.n_slices} slices, central B-scan index {k}; data {t1 - t0:.1f}s")
    rows = [("pixels+logreg", "volume", vols.reshape(n, -1), y, 1e-3),
            ("pixels+logreg", "central", vols[:, k].reshape(n, -1), y, 1e-3),
            ("random conv+logreg", "volume", feats.reshape(n, -1), y, 0.1),
            ("random conv+logreg", "volume, pooled over B-scans", np.concatenate([feats.max(1), feats.std(1)], 1),
             y, 0.1),
            ("random conv+logreg", "central", feats[:, k], y, 0.1),
            ("row-band stats+logreg", "volume, pooled over B-scans",
             np.concatenate([stats.std(1), stats.max(1) - stats.mean(1)], 1), y, 0.1),
            ("row-band stats+logreg", "central", stats[:, k], y, 0.1),
            ("random conv+logreg", "central, label foveal_drusen", feats[:, k],
             table["foveal_drusen"].to_numpy(int), 0.1)]
    print("| model | input | AUROC | 95 % CI |\n|---|---|---|---|")
    for model, what, x, target, c in rows:
        auc = oof_auroc(x.astype(np.float32), target, groups, c)
        lo, hi = auroc_ci(target, auc)
        print(f"| {model} | {what} | {auc:.3f} | {lo:.2f}-{hi:.2f} |")
    print(f"total {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
