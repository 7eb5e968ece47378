"""Choose the scratch baseline's fine-tuning recipe on validation data (issue 17).

A randomly initialised ViT (the config's ``vit`` section) is fine-tuned on prepared stores over a
small grid of blr x epochs (layer_decay 1: no layer decay without pretrained layers), every other
key from the config's ``finetune`` section with the ``scratch`` model's recipe applied, as the
workflow builds it (:func:`retflow.settings.build.finetune`). Prints per task and setting the best
validation score (the run's ``select_by`` metric, the epoch it was kept at), the final and the
lowest training loss and the chance level (:func:`retflow.train.targets.chance_loss`). Pick by
validation, never by test: the test predictions are not read.

    nice -n 10 .venv/bin/python bench/scratch_recipe.py --data /tmp/demo/results/data
    nice -n 10 .venv/bin/python bench/scratch_recipe.py --data results/data --tasks glaucoma \\
        --blr 3e-3 1e-2 --epochs 16 --fraction 0.1

Runs write into a temporary folder (``--out`` keeps them); the stores are only read.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from retflow.settings import build, load_config
from retflow.train import finetune as ft

ROOT = Path(__file__).resolve().parents[1]


def run_one(config: dict, task: str, store: Path, out: Path, fraction: float, seed: int, model: str,
            **recipe) -> dict:
    s = build.finetune(config, "finetune", task, fraction, seed, model=model).replace(device="cpu", **recipe)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the per-epoch lines; the table says it all
        ft.run(s, str(store), None, out)
    log = pd.read_csv(out / "train_log.csv")
    summary = json.loads((out / "train_summary.json").read_text())
    return {"task": task, **recipe, "fraction": fraction, "seed": seed,
            "best_val": summary["best_val_score"], "best_epoch": summary["best_epoch"],
            "val_epoch0": float(log.val_score.iloc[0]), "final_train": float(log.train_loss.iloc[-1]),
            "min_train": summary["min_train_loss"], "chance": summary["chance_loss"],
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "config.yaml"))
    ap.add_argument("--data", required=True, help="folder of prepared stores (results/data): <data>/<dataset>")
    ap.add_argument("--tasks", nargs="+", default=["glaucoma", "oct_diagnosis"])
    ap.add_argument("--model", default="scratch", help="the config's random-init model (its recipe is the base)")
    ap.add_argument("--blr", nargs="+", type=float, default=[1e-3, 3e-3, 1e-2])
    ap.add_argument("--layer-decay", nargs="+", type=float, default=[1.0])
    ap.add_argument("--epochs", nargs="+", type=int, default=[8, 16])
    ap.add_argument("--fraction", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="keep the runs here (default: a temporary folder)")
    args = ap.parse_args(argv)
    config = load_config(args.config)
    if config["models"][args.model]["init"] != "random":
        raise SystemExit(f"models.{args.model}: init is {config['models'][args.model]['init']}, not random")
    rows = []
    with tempfile.TemporaryDirectory(prefix="scratch_recipe_") as tmp:
        out_root = Path(args.out or tmp)
        for task in args.tasks:
            store = Path(args.data) / config["tasks"][task]["dataset"]
            for blr, ld, epochs in itertools.product(args.blr, args.layer_decay, args.epochs):
                out = out_root / task / f"blr{blr:g}_ld{ld:g}_ep{epochs}"
                row = run_one(config, task, store, out, args.fraction, args.seed, args.model,
                              blr=blr, layer_decay=ld, epochs=epochs)
                rows.append(row)
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                      flush=True)
    table = pd.DataFrame(rows)
    print()
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    best = table.loc[table.groupby("task")["best_val"].idxmax()]
    print("\nbest by validation score per task:")
    print(best[["task", "blr", "layer_decay", "epochs", "best_val", "best_epoch", "min_train", "chance"]]
          .to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
