"""Quality of a synthetic store against the real pool it imitates.

* **Frechet distance** between Gaussian fits of real and synthetic features in the feature space
  of *our own* pretrained encoder (the modality's MAE checkpoint; no downloaded Inception
  weights), overall and per class. FD is biased by sample size, so the reported pair is
  real half A vs real half B (the baseline: what two real samples of that size score) and real
  half A vs as many synthetic images.
* **Memorisation**: for every synthetic image its nearest real image (Euclidean, divided by
  sqrt(#values) = an RMS difference: in pixel space at ``nn_size`` px, values in [0, 1], and in
  the encoder's standardised feature space), compared with each real image's nearest *other*
  real image. A synthetic image closer to a real one than 99 % of real images are to their
  neighbour is counted as a near copy (in pixel space a blurry, average-looking sample can be
  one without copying anything: ``nearest.png`` shows the closest pairs); distance 0 is an
  exact copy.
* **Train on synthetic, test on real** (conditional generators): a logistic regression on the
  encoder's standardised features, trained on synthetic images and their generating classes,
  scored on the test split of a labelled real dataset; the same classifier trained on that
  dataset's own train split is the reference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import linalg

from retflow.atomic import json_safe, write_json
from retflow.data.dataset import load_manifest
from retflow.data.labels import normalise_label
from retflow.data.store import ImageStore
from retflow.inference import pick_device
from retflow.models.features import FeatureExtractor
from retflow.settings.synth import ConditionSettings, SynthQualitySettings


# ----------------------------------------------------------------------------- Frechet distance
def gaussian_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need at least 2 feature vectors (n x d), got shape {x.shape}")
    return x.mean(0), np.cov(x, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Dowson & Landau 1982; Heusel et al. 2017)."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # singular product: regularise both covariances
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = np.real(covmean)
    return float(max(0.0, diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)))


def fd(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between the Gaussian fits of two feature sets."""
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


def fd_with_baseline(real: np.ndarray, synth: np.ndarray, rng: np.random.Generator, min_n: int = 10) -> dict:
    """``real_vs_synth``: FD(real half A, k synthetic); ``real_vs_real``: FD(real half A, k of real half B),
    k = min(|B|, #synthetic), so both distances carry the same sample-size bias."""
    out = {"n_real": int(len(real)), "n_synthetic": int(len(synth)), "real_vs_synth": None, "real_vs_real": None}
    if len(real) < 2 * min_n or len(synth) < min_n:
        out["note"] = f"too few images (need {2 * min_n} real and {min_n} synthetic)"
        return out
    order = rng.permutation(len(real))
    half_a, half_b = real[order[: len(real) // 2]], real[order[len(real) // 2:]]
    k = min(len(half_b), len(synth))  # the same number of real (B) and synthetic images against A
    take = synth[rng.permutation(len(synth))[:k]]
    out.update(real_vs_synth=fd(half_a, take), real_vs_real=fd(half_a, half_b[:k]), n_half=int(len(half_a)),
               n_compared=int(k))
    out["ratio"] = out["real_vs_synth"] / out["real_vs_real"] if out["real_vs_real"] else None
    return out


# ----------------------------------------------------------------------------- nearest neighbours
def nearest(query: np.ndarray, ref: np.ndarray, exclude_self: bool = False, metric: str = "euclidean",
            chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Distance to and index of each query row's nearest ``ref`` row (``exclude_self``: query is ref,
    skip the diagonal). ``euclidean`` is divided by sqrt(dim) (an RMS difference); ``cosine`` = 1 - cos."""
    q = torch.as_tensor(np.asarray(query, np.float32))
    r = torch.as_tensor(np.asarray(ref, np.float32))
    if metric == "cosine":
        q = torch.nn.functional.normalize(q, dim=1)
        r = torch.nn.functional.normalize(r, dim=1)
    elif metric != "euclidean":
        raise ValueError(f"unknown metric {metric!r}")
    dist, idx = [], []
    for s in range(0, len(q), chunk):
        block = q[s:s + chunk]
        d = torch.cdist(block, r) / np.sqrt(q.shape[1]) if metric == "euclidean" else 1.0 - block @ r.T
        if exclude_self:
            rows = torch.arange(len(block))
            d[rows, rows + s] = float("inf")
        v, i = d.min(1)
        dist.append(v.clamp_min(0).numpy())
        idx.append(i.numpy())
    return np.concatenate(dist), np.concatenate(idx)


def _summary(d: np.ndarray) -> dict:
    return {"min": float(d.min()), "p1": float(np.percentile(d, 1)), "median": float(np.median(d)),
            "mean": float(d.mean())}


def memorisation(synth: np.ndarray, real: np.ndarray, metric: str = "euclidean") -> dict:
    """Nearest-real distances of synthetic rows vs real rows' nearest other real row."""
    d_s, i_s = nearest(synth, real, metric=metric)
    d_r, _ = nearest(real, real, exclude_self=True, metric=metric)
    threshold = float(np.percentile(d_r, 1))
    close = d_s < threshold
    return {"synth_to_real": _summary(d_s), "real_to_real": _summary(d_r), "near_copy_threshold": threshold,
            "near_copies": int(close.sum()), "near_copy_fraction": float(close.mean()),
            "exact_copies": int((d_s <= 1e-6).sum()), "distances": d_s, "real_distances": d_r, "nearest": i_s}


# ----------------------------------------------------------------------------- images
def read_images(store: str | Path, indices: np.ndarray) -> np.ndarray:
    im = ImageStore(store)
    return np.stack([im[int(i)] for i in indices]) if len(indices) else np.zeros((0,), np.uint8)


def pixels(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (n, H, W, C) -> float32 (n, size*size*C) in [0, 1] (area-resized)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != size or x.shape[-2] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="area")
    return x.flatten(1).numpy()


def label_indices(values: pd.Series, classes: list[str]) -> np.ndarray:
    """Class index of each value (-1: missing or not a class)."""
    lookup = {str(c): i for i, c in enumerate(classes)}
    return np.array([lookup.get(normalise_label(v), -1) for v in values], dtype=int)


# ----------------------------------------------------------------------------- train on synthetic
def classifier_scores(train_x, train_y, test_x, test_y, n_classes: int, seed: int) -> dict:
    """Logistic regression on standardised features: accuracy, balanced accuracy, macro AUROC."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    clf = LogisticRegression(C=0.1, max_iter=3000, random_state=seed).fit((train_x - mu) / sd, train_y)
    proba = np.zeros((len(test_x), n_classes))
    proba[:, clf.classes_] = clf.predict_proba((test_x - mu) / sd)
    pred = proba.argmax(1)
    present = np.unique(test_y)
    auroc = None
    if len(present) >= 2:
        if n_classes == 2:
            auroc = float(roc_auc_score(test_y, proba[:, 1]))
        else:
            aucs = [roc_auc_score(test_y == c, proba[:, c]) for c in present]
            auroc = float(np.mean(aucs))
    return {"n_train": int(len(train_x)), "n_test": int(len(test_x)),
            "accuracy": float(accuracy_score(test_y, pred)),
            "balanced_accuracy": float(balanced_accuracy_score(test_y, pred)), "auroc": auroc,
            "train_classes": sorted(int(c) for c in np.unique(train_y))}


def tstr(encoder: FeatureExtractor, synth_feats: np.ndarray, synth_y: np.ndarray, tstr_store: str | Path,
         cond: ConditionSettings, seed: int, max_real: int) -> dict:
    manifest = load_manifest(tstr_store)
    if cond.label not in manifest.columns:
        return {"skipped": f"the TSTR dataset has no '{cond.label}' column"}
    classes = list(cond.classes)
    y = label_indices(manifest[cond.label], classes)
    split = manifest["split"].astype(str).to_numpy()
    test = np.flatnonzero((split == "test") & (y >= 0))
    train = np.flatnonzero((split == "train") & (y >= 0))
    if len(test) < 2 or len(np.unique(synth_y)) < 2:
        return {"skipped": f"{len(test)} labelled test images, {len(np.unique(synth_y))} synthetic classes"}
    rng = np.random.default_rng([seed, 3])
    train = np.sort(rng.permutation(train)[:max_real])
    index = manifest["index"].to_numpy()
    test_x = encoder(read_images(tstr_store, index[test]))
    out = {"dataset": Path(tstr_store).name, "label": cond.label, "classes": classes,
           "train_on_synthetic": classifier_scores(synth_feats, synth_y, test_x, y[test], len(classes), seed)}
    if len(np.unique(y[train])) >= 2:
        train_x = encoder(read_images(tstr_store, index[train]))
        out["train_on_real"] = classifier_scores(train_x, y[train], test_x, y[test], len(classes), seed)
    return out


# ----------------------------------------------------------------------------- the whole check
def _real_pool(stores: list[str], cond: ConditionSettings | None, n_max: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """A random subset of at most ``n_max`` pool images and their class indices (-1 unknown)."""
    rows = []
    for k, store in enumerate(stores):
        m = load_manifest(store).sort_values("index")
        lab = label_indices(m[cond.label], list(cond.classes)) if cond and cond.label in m else \
            np.full(len(m), -1)
        rows.append(pd.DataFrame({"store": k, "index": m["index"].to_numpy(), "label": lab}))
    table = pd.concat(rows, ignore_index=True)
    take = np.sort(rng.permutation(len(table))[:n_max])
    table = table.iloc[take]
    images = np.concatenate([read_images(stores[k], g["index"].to_numpy()) for k, g in table.groupby("store")])
    labels = np.concatenate([g["label"].to_numpy() for _, g in table.groupby("store")])
    return images, labels


def evaluate(synth_store: str | Path, real_stores: list[str], encoder_ckpt: str | Path,
             settings: SynthQualitySettings, out_dir: str | Path, tstr_store: str | Path | None = None) -> dict:
    """Run every check; writes ``settings.json`` (first), ``quality.json``, ``samples.png``,
    ``memorisation.png``, ``nearest.png``."""
    from retflow.synth import figures

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings.write(out_dir / "settings.json")
    rng = np.random.default_rng([int(settings.seed), 2])
    cond = settings.condition
    device = pick_device(settings.device)
    encoder = FeatureExtractor(encoder_ckpt, settings.vit.to_dict(), settings.normalize.to_dict(), device)

    sm = load_manifest(synth_store).sort_values("index")
    pick = np.sort(rng.permutation(len(sm))[: int(settings.max_synthetic)])
    sm = sm.iloc[pick]
    synth_img = read_images(synth_store, sm["index"].to_numpy())
    synth_y = label_indices(sm[cond.label], list(cond.classes)) if cond else np.full(len(sm), -1)
    real_img, real_y = _real_pool(real_stores, cond, int(settings.max_real), rng)
    if synth_img.shape[1:] != real_img.shape[1:]:
        raise ValueError(f"synthetic images {synth_img.shape[1:]} and real images {real_img.shape[1:]} differ in shape")
    synth_f, real_f = encoder(synth_img), encoder(real_img)

    report = {"modality": settings.modality, "encoder_checkpoint": str(encoder_ckpt),
              "feature_dim": int(synth_f.shape[1]), "n_synthetic": int(len(synth_img)), "n_real": int(len(real_img)),
              "frechet": {"all": fd_with_baseline(real_f, synth_f, rng)}}
    if cond:
        report["classes"] = list(cond.classes)
        report["label"] = cond.label
        report["frechet"]["per_class"] = {
            c: fd_with_baseline(real_f[real_y == i], synth_f[synth_y == i], rng) for i, c in enumerate(cond.classes)}
    size = int(settings.nn_size)
    mem_pix = memorisation(pixels(synth_img, size), pixels(real_img, size))
    mu, sd = real_f.mean(0), real_f.std(0) + 1e-6  # standardised: every feature counts alike
    mem_feat = memorisation((synth_f - mu) / sd, (real_f - mu) / sd)
    report["memorisation"] = {
        "pixel": {k: v for k, v in mem_pix.items() if not isinstance(v, np.ndarray)} | {"size": size},
        "feature": {k: v for k, v in mem_feat.items() if not isinstance(v, np.ndarray)}}
    if cond and tstr_store:
        report["tstr"] = tstr(encoder, synth_f, synth_y, tstr_store, cond, int(settings.seed), int(settings.max_real))
    elif cond:
        report["tstr"] = {"skipped": "no labelled real dataset for this label (set synth.quality.tstr_dataset)"}
    else:
        report["tstr"] = {"skipped": "unconditional generator: synthetic images carry no class"}

    figures.sample_grid(synth_img, synth_y, real_img, real_y, cond, int(settings.grid_per_class),
                        out_dir / "samples.png")
    figures.memorisation_histogram(mem_pix, mem_feat, out_dir / "memorisation.png")
    figures.nearest_pairs(synth_img, real_img, mem_pix, out_dir / "nearest.png")
    report["seconds"] = round(time.perf_counter() - t0, 2)
    write_json(json_safe(report), out_dir / "quality.json")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Quality checks of a synthetic store (FD, memorisation, TSTR).")
    ap.add_argument("--synth-store", required=True)
    ap.add_argument("--real-stores", nargs="+", required=True)
    ap.add_argument("--encoder", required=True, help="pretraining checkpoint of the modality (the feature space)")
    ap.add_argument("--tstr-store", default=None, help="labelled real store whose test split scores TSTR")
    ap.add_argument("--settings", required=True, help="SynthQualitySettings as JSON "
                    "(retflow.synth.settings.quality_settings(config, modality).to_json())")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        report = evaluate(args.synth_store, args.real_stores, args.encoder,
                          SynthQualitySettings.from_json(args.settings), args.out_dir, args.tstr_store)
    except (ValueError, FileNotFoundError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({k: report[k] for k in ("frechet", "tstr") if k in report}, default=str))
    return 0
