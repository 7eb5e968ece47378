"""Predict a prepared store with a fine-tuned checkpoint (internal or external validation, with an
optional mapping from the model's classes to the external set's classes); a volume model's best.pth
(``input: volume``) predicts the store's whole volumes, one row per volume as in its training run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from retflow.checkpoint_file import CheckpointError
from retflow.data.dataset import StoreDataset, eval_transform, load_manifest
from retflow.data.volume_dataset import VolumeDataset
from retflow.data.volume_store import VOLUME_INDEX, VOLUME_SHARD_DIR
from retflow.models.checkpoint_layouts import load_model
from retflow.settings.stages import TaskSettings
from retflow.train.engine_finetune import predict_outputs
from retflow.train.targets import TargetScale, encode_targets, write_predictions
from retflow.train.volume import load_volume_classifier, per_volume, volume_checkpoint


def load_finetuned(checkpoint: Path, device):
    """``(model, state, spec)`` of a fine-tuned ``best.pth`` or its ``retflow export`` folder.

    The classifier is rebuilt from what the checkpoint records (its ``spec``, ``classes`` and
    ``probe_head``; :func:`retflow.models.checkpoint_layouts.load_model`); ``state`` is the
    checkpoint's metadata (``classes``, ``normalize``, ``task_spec``, ``target_scale`` ...).
    A file that is not a fine-tuned model raises :class:`CheckpointError` naming it.
    """
    lm = load_model(checkpoint)
    if lm.kind != "classifier":
        raise CheckpointError(f"{checkpoint}: a pretrained encoder (layout {lm.report.layout}), not a fine-tuned "
                              "model; give the run's best.pth or its export")
    return lm.model.to(device), lm.meta, lm.spec


def checkpoint_task(state: dict, label: str | None = None) -> dict:
    """The task a checkpoint was trained for (older checkpoints: single-label classification)."""
    task = dict(state.get("task_spec") or {"name": state.get("task", ""), "type": "multiclass",
                                            "label": label, "classes": state["classes"]})
    if label:
        task["label"] = label
    return task


def map_outputs(probs: np.ndarray, source: list[str], target: list[str], mapping: dict) -> np.ndarray:
    """Sum the model's class probabilities into the external set's classes (``source -> target``)."""
    out = np.zeros((probs.shape[0], len(target)))
    for i, cls in enumerate(source):
        if str(cls) not in mapping:
            raise SystemExit(f"label map has no entry for model class '{cls}' (map: {mapping})")
        out[:, target.index(str(mapping[str(cls)]))] += probs[:, i]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Predict a store with a fine-tuned model (no retraining).")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--label", default=None, help="label column of this store (default: the training one)")
    ap.add_argument("--label-map", default="", help="JSON {model class: this set's class}; sums probabilities")
    ap.add_argument("--classes", nargs="*", default=None, help="this set's classes (with --label-map)")
    ap.add_argument("--split", default=None, help="only this split (default: all rows)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    from retflow.train.distributed import pick_device

    device = pick_device(args.device)
    try:
        volume = volume_checkpoint(args.checkpoint)  # a volume model reads the store's whole volumes
        if volume is not None:
            model, state, spec = load_volume_classifier(args.checkpoint, volume).to(device), volume, None
        else:
            model, state, spec = load_finetuned(Path(args.checkpoint), device)
    except (CheckpointError, FileNotFoundError) as exc:
        raise SystemExit(f"ERROR: {exc}") from None
    task = TaskSettings.from_dict(checkpoint_task(state, args.label), f"{args.checkpoint}: task_spec")
    scale = TargetScale(*state.get("target_scale", (0.0, 1.0)))
    eval_task = task
    if args.label_map:
        eval_task = task.replace(classes=list(args.classes), type="binary" if len(args.classes) == 2 else "multiclass")
    manifest = load_manifest(args.store)
    targets, valid = encode_targets(manifest, eval_task)
    if volume is not None:  # one row per volume: its first B-scan's (split, label, image_id), as in training
        if VOLUME_INDEX not in manifest.columns:
            raise SystemExit(f"ERROR: {args.store} holds no whole volumes ({VOLUME_SHARD_DIR}/) for the volume model "
                             f"{args.checkpoint}; prepare it with preprocess.oct.volume set")
        manifest, targets, valid = per_volume(manifest, targets, valid)
    if args.split is not None:
        valid = valid & (manifest["split"] == args.split).to_numpy()
    rows = np.flatnonzero(valid)
    excluded = int(len(manifest) - len(rows)) if args.split is None else 0
    if excluded:
        print(f"{excluded} images without a usable '{task.label}' label were not predicted", file=sys.stderr)
    if volume is not None:
        ds = VolumeDataset(args.store, manifest.iloc[rows], targets[rows], state.get("normalize"))
    else:
        tf = eval_transform(spec.img_size, state.get("normalize"), spec.in_chans)
        ds = StoreDataset(args.store, manifest["index"].to_numpy()[rows], targets[rows], tf, spec.in_chans)
    outputs = predict_outputs(model, ds, device, task, scale)
    if args.label_map:
        outputs = map_outputs(outputs, [str(c) for c in state["classes"]], list(args.classes),
                              json.loads(args.label_map))
    write_predictions(Path(args.out), eval_task, manifest["image_id"].to_numpy()[rows], targets[rows], outputs)
    print(json.dumps({"n": len(rows), "excluded": excluded, "out": args.out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
