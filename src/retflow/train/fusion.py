"""Train, select and predict one late-fusion run (a CFP and an OCT encoder, :mod:`retflow.models.fusion`).

Reads the task's ``pairs.parquet`` (:mod:`retflow.data.pairing`: one row per eye with both
modalities, its split and label) and the two stores; trains on the pairs' ``train`` split (a
stratified label ``fraction``), keeps the best validation epoch after warm-up
(:func:`~retflow.train.engine_finetune.keep_epoch`, ``select_by`` as fine-tuning), predicts the
``test`` pairs. The fine-tuning pieces are reused: the training engine (one input tensor: the
pair's two images stacked along the channels), targets / loss / chance level
(:mod:`retflow.train.targets`), the warmup + cosine schedule, the resume fingerprint. Writes into
``out_dir``: ``settings.json`` (the :class:`~retflow.settings.stages.FusionSettings`),
``best.pth`` (``kind: "fusion"``: the whole model's state dict + both ViT specs, normalisations,
classes), ``train_log.csv`` (epoch, train_loss, val_loss, val_score, lr, best),
``predictions.parquet`` (the columns of :func:`retflow.train.targets.write_predictions`, one row
per test pair, ``image_id`` = ``pair_id``: :mod:`retflow.evaluate` and the comparisons read it as a
fine-tuning run's) and ``train_summary.json`` (as fine-tuning's, plus ``encoders`` and
``n_unlabelled``). Resumable per epoch from ``<out>/resume/last.pth``.

Command line (``workflow_scripts/fusion.py`` is the same)::

    python workflow_scripts/fusion.py --settings '<FusionSettings JSON>' --pairs results/data/pairs/<task>/pairs.parquet
        --cfp-store results/data/<cfp> --oct-store results/data/<oct> --init-cfp <checkpoint or ''>
        --init-oct <checkpoint or ''> --out-dir <run folder>
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from retflow.atomic import write_json
from retflow.data.dataset import eval_transform, train_transform
from retflow.data.pair_dataset import PairDataset
from retflow.data.splits import label_fraction_indices
from retflow.errors import UserError
from retflow.models.fusion import build_fusion, fusion_param_groups
from retflow.settings.stages import FusionSettings
from retflow.train.checkpoint import load_state, save_atomic
from retflow.train.distributed import pick_device
from retflow.train.engine_finetune import classifier_validation, fit, predict_outputs
from retflow.train.finetune import select_score
from retflow.train.footprint import param_counts, peak_memory, reset_peak
from retflow.train.resume import run_fingerprint
from retflow.train.targets import (
    TargetScale,
    chance_loss,
    class_weights,
    encode_targets,
    make_loss,
    n_outputs,
    stratum,
    write_predictions,
)

SPLITS = ("train", "val", "test")


def split_pairs(pairs: pd.DataFrame, s: FusionSettings, pairs_path) -> tuple[dict, int]:
    """``{split: (rows, targets)}`` of the labelled pairs, and how many pairs have no usable label."""
    if "split" not in pairs.columns or "pair_id" not in pairs.columns:
        raise UserError(f"{pairs_path}: not a pairs table (no split / pair_id column; written by retflow.data.pairing)")
    targets, valid = encode_targets(pairs, s.task)
    parts = {}
    for split in SPLITS:
        rows = np.flatnonzero((pairs["split"] == split).to_numpy() & valid)
        if len(rows) == 0:
            raise UserError(f"{pairs_path}: task '{s.task.name}' has no labelled pair in split '{split}' "
                            f"({int((pairs['split'] == split).sum())} pairs, {int(valid.sum())} labelled in all); "
                            f"see unpaired.csv and pairing.json beside it")
        parts[split] = (rows, targets[rows])
    return parts, int((~valid).sum())


def _datasets(s: FusionSettings, pairs: pd.DataFrame, parts: dict, stores: dict) -> dict:
    tf = {}
    for m in ("cfp", "oct"):
        inp = getattr(s, m)
        norm = inp.normalize.to_dict()
        tf[m] = {"train": train_transform(inp.vit.img_size, s.crop_scale, s.hflip, norm, inp.vit.in_chans),
                 "eval": eval_transform(inp.vit.img_size, norm, inp.vit.in_chans)}
    out = {}
    for split, (rows, y) in parts.items():
        mode = "train" if split == "train" else "eval"
        out[split] = PairDataset(stores["cfp"], stores["oct"], pairs["cfp_index"].to_numpy()[rows],
                                 pairs["oct_index"].to_numpy()[rows], y, tf["cfp"][mode], tf["oct"][mode],
                                 s.cfp.vit.in_chans, s.oct.vit.in_chans)
    return out


def run(s: FusionSettings, pairs_path: str, cfp_store: str, oct_store: str, init_cfp: str | None,
        init_oct: str | None, out_dir: Path) -> int:
    """One fusion run with settings ``s`` (:func:`retflow.settings.build.fusion`); writes ``settings.json``
    first, then the run's outputs, into ``out_dir``."""
    out_dir = Path(out_dir)
    s.write(out_dir / "settings.json")
    torch.manual_seed(s.seed)
    device = pick_device(s.device)
    reset_peak(device)
    task = s.task
    pairs = pd.read_parquet(pairs_path)
    parts, n_unlabelled = split_pairs(pairs, s, pairs_path)
    if n_unlabelled:
        print(f"{n_unlabelled} pairs without a usable '{task.label}' label excluded", flush=True)
    rows, y = parts["train"]
    keep = label_fraction_indices(stratum(task, y), s.fraction, s.seed)
    parts["train"] = (rows[keep], y[keep])
    if len(keep) < 2:  # the head's BatchNorm standardises over a batch
        raise UserError(f"{pairs_path}: task '{task.name}' has {len(keep)} training pair at label fraction "
                        f"{s.fraction:g}; fusion needs at least 2 (raise the fraction or add pairs)")
    ds = _datasets(s, pairs, parts, {"cfp": cfp_store, "oct": oct_store})
    scale = TargetScale.fit(task, ds["train"].labels)
    model = build_fusion({"cfp": s.cfp.vit.spec(), "oct": s.oct.vit.spec()}, n_outputs(task), s.encoders, s.pool,
                         s.drop_path, {"cfp": init_cfp, "oct": init_oct})
    model.to(device)
    counts = param_counts(model)
    meta = {"kind": "fusion", "specs": {m: getattr(s, m).vit.to_dict() for m in ("cfp", "oct")},
            "normalize": {m: getattr(s, m).normalize.to_dict() for m in ("cfp", "oct")},
            "classes": list(task.classes), "task": task.name, "task_spec": task.to_dict(),
            "target_scale": [scale.mean, scale.std], "pool": s.pool, "encoders": s.encoders}
    fingerprint = run_fingerprint(s, [pairs_path, Path(cfp_store) / "manifest.parquet",
                                      Path(oct_store) / "manifest.parquet", init_cfp, init_oct])
    summary = _train(s, model, ds["train"], ds["val"], scale, device, meta, out_dir, fingerprint)
    best = load_state(out_dir / "best.pth")
    model.load_state_dict(best["model"])
    outputs = predict_outputs(model, ds["test"], device, task, scale)
    write_predictions(out_dir / "predictions.parquet", task, pairs["pair_id"].to_numpy()[parts["test"][0]],
                      ds["test"].labels, outputs)
    write_json({"n_train": len(ds["train"]), "n_val": len(ds["val"]), "n_test": len(ds["test"]),
                "n_unlabelled": n_unlabelled, "best_epoch": best["epoch"], "encoders": s.encoders, **summary,
                **counts, **peak_memory(device)}, out_dir / "train_summary.json")
    return 0


def _train(s: FusionSettings, model, train_ds, val_ds, scale, device, meta, out_dir: Path, fingerprint: str) -> dict:
    task = s.task
    batch = min(s.batch_size, len(train_ds))
    n_batches = max(len(train_ds) // batch, math.ceil(s.min_steps / s.epochs))
    schedule = s.schedule(batch)
    optimizer = torch.optim.AdamW(fusion_param_groups(model, s.weight_decay, s.layer_decay), lr=schedule.lr)
    criterion = make_loss(task, class_weights(task, train_ds.labels, s.class_weights), s.label_smoothing, scale)
    print(f"fusion {task.name} (encoders {s.encoders}): {len(train_ds)} train pairs (fraction {s.fraction:g}), "
          f"{len(val_ds)} val; {s.epochs} epochs x {n_batches} steps, lr {schedule.lr:.3g}", flush=True)
    score = lambda y, outputs: select_score(y, outputs, task.type, s.select_by)  # noqa: E731
    best, log, best_path = fit(model, optimizer, criterion, train_ds,
                               classifier_validation(val_ds, device, task, scale, criterion, score),
                               epochs=s.epochs, n_batches=n_batches, batch=batch, schedule=schedule, seed=s.seed,
                               warmup_epochs=s.warmup_epochs, num_workers=s.num_workers, device=device,
                               meta=meta, out_dir=out_dir, fingerprint=fingerprint)
    save_atomic(load_state(best_path), out_dir / "best.pth")
    return {"epochs": s.epochs, "best_val_score": best, "chance_loss": chance_loss(task, criterion, train_ds.labels),
            "min_train_loss": min(row["train_loss"] for row in log)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train one late-fusion (CFP + OCT) model on a fusion task's pairs.")
    ap.add_argument("--settings", required=True, help="FusionSettings JSON (retflow.settings.build.fusion(...).to_json())")
    ap.add_argument("--pairs", required=True, help="the task's pairs.parquet (retflow.data.pairing)")
    ap.add_argument("--cfp-store", required=True)
    ap.add_argument("--oct-store", required=True)
    ap.add_argument("--init-cfp", default="", help="CFP encoder checkpoint; empty for random init")
    ap.add_argument("--init-oct", default="", help="OCT encoder checkpoint; empty for random init")
    ap.add_argument("--out-dir", required=True)
    args = ap.parse_args(argv)
    return run(FusionSettings.from_json(args.settings), args.pairs, args.cfp_store, args.oct_store,
               args.init_cfp or None, args.init_oct or None, Path(args.out_dir))


if __name__ == "__main__":
    sys.exit(main())
