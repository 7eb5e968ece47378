"""Supervised fine-tuning / linear probing of a ViT on one task, RETFound's recipe.

Fine-tune: timm ViT with global average pooling + fc_norm, initialised from an MAE encoder (or
random / a local weights file), layer-wise lr decay, drop path, label smoothing, AdamW with
warmup + cosine, best checkpoint by a validation metric. Probe: encoder frozen, a BatchNorm +
linear head trained (MAE's linear-probe head). Writes best.pth, train_log.csv and the internal
test predictions. Resumable per epoch from ``<out>/resume/last.pth``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from retflow.atomic import atomic_path, write_json
from retflow.data.dataset import StoreDataset, eval_transform, load_manifest, train_transform
from retflow.data.splits import label_fraction_indices
from retflow.evaluate.metrics import PRIMARY_METRIC, compute_metrics
from retflow.models.lr_decay import param_groups_lrd
from retflow.models.vit import ViTSpec, attach_probe_head, create_vit, load_checkpoint_file, load_encoder_weights
from retflow.train.checkpoint import load_state, save_atomic
from retflow.train.distributed import pick_device
from retflow.train.engine_finetune import train_one_epoch
from retflow.train.predict import labelled_rows, predict_probs, write_predictions
from retflow.train.sampling import loader, repeated_order


def build_model(cfg: dict, spec: ViTSpec, num_classes: int, init_path: str | None):
    probe = cfg["protocol"] == "probe"
    model = create_vit(spec, num_classes=num_classes, drop_path_rate=0.0 if probe else cfg["drop_path"], global_pool="avg")
    if init_path:
        report = load_encoder_weights(model, load_checkpoint_file(init_path))
        print(f"loaded encoder from {init_path}: missing {report['missing']}, ignored {len(report['unexpected'])} keys")
    if probe:
        attach_probe_head(model)
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("head.")
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": params, "weight_decay": cfg["weight_decay"]}]
    else:
        groups = param_groups_lrd(model, cfg["weight_decay"], model.no_weight_decay(), cfg["layer_decay"])
    return model, groups


def select_score(y: np.ndarray, probs: np.ndarray, task_type: str, select_by: str) -> float:
    metric = PRIMARY_METRIC[task_type] if select_by == "primary" else select_by
    value = compute_metrics(y, probs, task_type).get(metric, float("nan"))
    return value if math.isfinite(value) else -math.inf


def run(cfg: dict, store: str, init_path: str | None, out_dir: Path) -> int:
    torch.manual_seed(cfg["seed"])
    device = pick_device(cfg.get("device", "auto"))
    spec = ViTSpec.from_dict(cfg["vit"])
    task = cfg["task"]
    classes = [str(c) for c in task["classes"]]
    manifest = load_manifest(store)
    parts = {}
    for split in ("train", "val", "test"):
        rows, y, excluded = labelled_rows(manifest, task["label"], classes, split)
        if excluded:
            print(f"{split}: {excluded} images without a known '{task['label']}' label excluded")
        if len(rows) == 0:
            raise SystemExit(f"task '{task['name']}': no labelled images in split '{split}' of {store}")
        parts[split] = (rows, y)
    tr_rows, tr_y = parts["train"]
    keep = label_fraction_indices(tr_y, cfg["fraction"], cfg["seed"])
    tr_rows, tr_y = tr_rows[keep], tr_y[keep]
    index = manifest["index"].to_numpy()
    norm = cfg.get("normalize")
    train_tf = train_transform(spec.img_size, cfg["crop_scale"], normalize=norm, in_chans=spec.in_chans)
    eval_tf = eval_transform(spec.img_size, normalize=norm, in_chans=spec.in_chans)
    train_ds = StoreDataset(store, index[tr_rows], tr_y, train_tf, spec.in_chans)
    val_ds = StoreDataset(store, index[parts["val"][0]], parts["val"][1], eval_tf, spec.in_chans)
    test_ds = StoreDataset(store, index[parts["test"][0]], parts["test"][1], eval_tf, spec.in_chans)

    batch = min(cfg["batch_size"], len(train_ds))
    epochs = cfg["epochs"]
    # small label fractions: repeat the training set within an epoch to reach min_steps in total
    n_batches = max(len(train_ds) // batch, math.ceil(cfg.get("min_steps", 0) / epochs))
    model, groups = build_model(cfg, spec, len(classes), init_path)
    model.to(device)
    cfg = {**cfg, "lr": cfg["blr"] * batch / 256}
    optimizer = torch.optim.AdamW(groups, lr=cfg["lr"])
    smoothing = cfg["label_smoothing"] if cfg["protocol"] == "finetune" else 0.0
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=smoothing)
    print(f"{cfg['protocol']} {task['name']}: {len(train_ds)} train (fraction {cfg['fraction']:g}), "
          f"{len(val_ds)} val, {len(test_ds)} test; {epochs} epochs x {n_batches} steps, lr {cfg['lr']:.3g}", flush=True)

    resume_path = out_dir / "resume" / "last.pth"
    best_path = out_dir / "resume" / "best.pth"  # copied to <out>/best.pth at the end
    start, best, log = 0, -math.inf, []
    if resume_path.exists() and best_path.exists():
        state = load_state(resume_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, best, log = state["epoch"], state["best"], state["log"]
        print(f"Resuming from {resume_path}: epoch {start}", flush=True)
    meta = {"spec": cfg["vit"], "normalize": norm, "classes": classes, "task": task["name"], "probe_head": cfg["protocol"] == "probe"}
    for epoch in range(start, epochs):
        train_ds.set_aug_seed(cfg["seed"] * 100003 + epoch)
        order = repeated_order(len(train_ds), n_batches * batch, cfg["seed"], epoch)
        dl = loader(train_ds, order, batch, 0, cfg.get("num_workers", 0))
        train_loss, lr = train_one_epoch(model, dl, criterion, optimizer, epoch, n_batches, cfg, device)
        val_probs = predict_probs(model, val_ds, device)
        val_loss = float(torch.nn.functional.nll_loss(torch.log(torch.from_numpy(val_probs).clamp_min(1e-8)),
                                                      torch.from_numpy(val_ds.labels)))
        score = select_score(val_ds.labels, val_probs, task["type"], cfg.get("select_by", "primary"))
        improved = score > best or not best_path.exists()  # the first epoch always counts
        if improved:
            best = score
            save_atomic({"model": model.state_dict(), "epoch": epoch, "val_score": score, **meta}, best_path)
        log.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_score": score, "lr": lr,
                    "best": improved})
        print(f"epoch {epoch}: train {train_loss:.4f} val loss {val_loss:.4f} val score {score:.4f}{' *' if improved else ''}", flush=True)
        save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                     "best": best, "log": log}, resume_path)
    with atomic_path(out_dir / "train_log.csv") as tmp:
        pd.DataFrame(log).to_csv(tmp, index=False)
    best_state = load_state(best_path)
    save_atomic(best_state, out_dir / "best.pth")
    model.load_state_dict(best_state["model"])
    probs = predict_probs(model, test_ds, device)
    write_predictions(out_dir / "predictions.parquet", manifest["image_id"].to_numpy()[parts["test"][0]],
                      test_ds.labels, probs)
    write_json({"n_train": len(train_ds), "n_val": len(val_ds), "n_test": len(test_ds), "epochs": epochs,
                "best_epoch": best_state["epoch"], "best_val_score": best}, out_dir / "train_summary.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Fine-tune or linear-probe a ViT on one task.")
    ap.add_argument("--settings", required=True, help="run settings, JSON")
    ap.add_argument("--store", required=True)
    ap.add_argument("--init", default="", help="pretrained checkpoint; empty for random init")
    ap.add_argument("--out-dir", required=True)
    args = ap.parse_args(argv)
    return run(json.loads(args.settings), args.store, args.init or None, Path(args.out_dir))


if __name__ == "__main__":
    sys.exit(main())
