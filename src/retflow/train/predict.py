"""Predict class probabilities for a prepared store with a fine-tuned checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from retflow.atomic import atomic_path
from retflow.data.dataset import StoreDataset, encode_labels, eval_transform, load_manifest
from retflow.models.vit import ViTSpec, attach_probe_head, create_vit
from retflow.train.checkpoint import load_state


@torch.no_grad()
def predict_probs(model, dataset, device, batch_size: int = 128) -> np.ndarray:
    model.eval()
    dl = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    out = []
    for imgs, _ in dl:
        logits = model(imgs.to(device))
        out.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def write_predictions(path: Path, image_ids, y_true, probs: np.ndarray) -> None:
    frame = pd.DataFrame({"image_id": list(image_ids), "y_true": np.asarray(y_true, dtype=int)})
    for k in range(probs.shape[1]):
        frame[f"prob_{k}"] = probs[:, k]
    frame["y_pred"] = probs.argmax(axis=1)
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def labelled_rows(manifest: pd.DataFrame, label: str, classes: list, split: str | None):
    """(row positions, class indices, n_excluded) of rows in ``split`` with a known label."""
    if label not in manifest.columns:
        raise SystemExit(f"label column '{label}' not in the manifest (columns: {list(manifest.columns)})")
    y, valid = encode_labels(manifest[label], classes)
    keep = valid if split is None else valid & (manifest["split"] == split).to_numpy()
    in_split = np.ones(len(manifest), bool) if split is None else (manifest["split"] == split).to_numpy()
    return np.flatnonzero(keep), y[keep], int((in_split & ~valid).sum())


def load_finetuned(checkpoint: Path, device):
    state = load_state(checkpoint)
    spec = ViTSpec.from_dict(state["spec"])
    model = create_vit(spec, num_classes=len(state["classes"]), global_pool="avg")
    if state.get("probe_head"):
        attach_probe_head(model)
    model.load_state_dict(state["model"])
    return model.to(device), state, spec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Predict a store with a fine-tuned model (no retraining).")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--label", required=True)
    ap.add_argument("--split", default=None, help="only this split (default: all rows)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    from retflow.train.distributed import pick_device

    device = pick_device(args.device)
    model, state, spec = load_finetuned(Path(args.checkpoint), device)
    manifest = load_manifest(args.store)
    rows, y, excluded = labelled_rows(manifest, args.label, state["classes"], args.split)
    if excluded:
        print(f"{excluded} images without a known '{args.label}' label were not predicted", file=sys.stderr)
    ds = StoreDataset(args.store, manifest["index"].to_numpy()[rows], y, eval_transform(spec.img_size, state.get("normalize"), spec.in_chans), spec.in_chans)
    probs = predict_probs(model, ds, device)
    write_predictions(Path(args.out), manifest["image_id"].to_numpy()[rows], y, probs)
    print(json.dumps({"n": len(rows), "excluded": excluded, "out": args.out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
