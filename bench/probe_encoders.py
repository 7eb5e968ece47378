"""Do the pretrained encoders of a run know anything? A cheap frozen-feature probe of each.

For every pretraining run named (``results/pretrain/<run>/<modality>/checkpoint.pth``) and for the
same ViT with random weights (the reference, scored in the same process), the encoder's mean-pooled
features of a labelled prepared dataset are scored on one label by

* a logistic regression on standardised features (train split -> test split): macro AUROC and
  balanced accuracy (``retflow.synth.quality.classifier_scores``);
* a cosine k-nearest-neighbour vote (k=10): balanced accuracy;
* the feature spread: the mean pairwise cosine similarity of test features (near 1 = collapse: every
  image gets the same embedding).

Prints one row per encoder plus its ratio to the random encoder. Used to check that SimCLR/DINO on
the phantom demo pool learn something before trusting the downstream comparison.

    python bench/probe_encoders.py --config config.yaml --dataset cfp_clinic --label dr_grade mae simclr
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from retflow.data.dataset import load_manifest  # noqa: E402
from retflow.layout import Layout  # noqa: E402
from retflow.settings import build, load_config  # noqa: E402
from retflow.models.vit import ViTSpec, create_vit  # noqa: E402
from retflow.models.features import FeatureExtractor  # noqa: E402
from retflow.synth.quality import classifier_scores, label_indices, read_images  # noqa: E402


def knn_balanced_accuracy(train_x, train_y, test_x, test_y, k: int = 10) -> float:
    from sklearn.metrics import balanced_accuracy_score

    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True).clip(1e-8)
    b = test_x / np.linalg.norm(test_x, axis=1, keepdims=True).clip(1e-8)
    nn = np.argsort(-(b @ a.T), axis=1)[:, :k]
    votes = np.stack([np.bincount(train_y[row], minlength=train_y.max() + 1) for row in nn])
    return float(balanced_accuracy_score(test_y, votes.argmax(1)))


def mean_cosine(x: np.ndarray) -> float:
    u = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-8)
    s = u @ u.T
    n = len(u)
    return float((s.sum() - n) / (n * (n - 1)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="pretraining runs (results/pretrain/<run>/)")
    ap.add_argument("--config", default="config.yaml")
    ap.add_argument("--results", default=None, help="results folder (default: the config's)")
    ap.add_argument("--dataset", required=True, help="a labelled prepared dataset")
    ap.add_argument("--label", required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    config = load_config(args.config)
    results = Path(args.results or config["results"])
    layout = Layout(str(results))
    modality = config["datasets"][args.dataset]["modality"]
    store = Path(layout.store(args.dataset))
    manifest = load_manifest(store)
    classes = sorted({str(v) for v in manifest[args.label].dropna()})
    y = label_indices(manifest[args.label], classes)
    split = manifest["split"].to_numpy()
    idx = {s: np.flatnonzero((split == s) & (y >= 0)) for s in ("train", "test")}
    images = {s: read_images(store, i) for s, i in idx.items()}
    # the encoders as the workflow's runs build them (retflow.settings.build)
    vit, normalize = build.vit(config, modality).to_dict(), build.normalize(config, modality).to_dict()

    random_ckpt = results / "probe_random_encoder.pth"
    torch.manual_seed(0)
    torch.save({"model": create_vit(ViTSpec.from_dict(vit), num_classes=0).state_dict()}, random_ckpt)
    encoders = [("random", random_ckpt)] + [(r, Path(layout.pretrain_checkpoint(r, modality))) for r in args.runs]
    print(f"{args.dataset}/{args.label}: {len(idx['train'])} train, {len(idx['test'])} test, classes {classes}")
    print(f"{'encoder':<28}{'AUROC':>8}{'bal.acc':>9}{'kNN bal.acc':>13}{'mean cos':>10}{'AUROC/random':>14}{'s':>6}")
    ref = None
    for name, ckpt in encoders:
        if not ckpt.exists():
            print(f"{name:<28} missing: {ckpt}")
            continue
        t0 = time.perf_counter()
        enc = FeatureExtractor(ckpt, vit, normalize, torch.device("cpu"))
        fx = {s: enc(images[s]) for s in images}
        lin = classifier_scores(fx["train"], y[idx["train"]], fx["test"], y[idx["test"]], len(classes), seed=0)
        knn = knn_balanced_accuracy(fx["train"], y[idx["train"]], fx["test"], y[idx["test"]])
        ref = lin["auroc"] if ref is None else ref
        print(f"{name:<28}{lin['auroc']:>8.3f}{lin['balanced_accuracy']:>9.3f}{knn:>13.3f}"
              f"{mean_cosine(fx['test']):>10.3f}{lin['auroc'] / ref:>14.2f}{time.perf_counter() - t0:>6.0f}")
    random_ckpt.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
