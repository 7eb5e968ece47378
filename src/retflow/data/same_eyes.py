"""Fusion vs single-modality models on the same eyes: predictions restricted to the paired test eyes.

A fusion run predicts one row per pair (``image_id`` = the pair's ``pair_id``,
:mod:`retflow.data.pairing`); a single-modality run one row per test image of its own store. To
compare them on the same eyes, :func:`eye_predictions` keeps the single-modality rows of the
images the pairs use (the pair's CFP or OCT image, pairs in the ``test`` split) and renames their
``image_id`` to the ``pair_id``; :func:`common_eyes` then keeps, in every frame, the eyes all of
them predicted (a pair whose image is not in a single-modality store's test split drops out). The
frames keep the predictions-parquet columns, so :mod:`retflow.evaluate.evaluate` and
:mod:`retflow.evaluate.compare` read them unchanged.

Command line (rule ``same_eyes``, one job per :func:`retflow.fusion_config.same_eyes_jobs` entry;
``workflow_scripts/same_eyes.py`` is the same)::

    python -m retflow.data.same_eyes --settings '<SameEyesSettings JSON>' --pairs results/data/pairs/<task>/pairs.parquet
        --fusion <fusion run>/predictions.parquet --cfp <cfp run>/predictions.parquet
        --oct <oct run>/predictions.parquet --out results/same_eyes/<task>/<protocol>/<model>/frac<f>/seed<s>/compare.json
        # beside it: fusion|cfp|oct.parquet (the same eyes) and fusion|cfp|oct.metrics.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from retflow.atomic import atomic_path, json_safe, write_json
from retflow.errors import UserError
from retflow.settings.report import SameEyesSettings

MODALITIES = ("cfp", "oct")


def eye_predictions(predictions: pd.DataFrame, pairs: pd.DataFrame, modality: str) -> pd.DataFrame:
    """``modality``'s single-modality predictions of the pairs' test images, ``image_id`` -> ``pair_id``."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    test = pairs[pairs["split"] == "test"]
    to_pair = dict(zip(test[f"{modality}_image_id"].astype(str), test["pair_id"]))
    out = predictions[predictions["image_id"].astype(str).isin(to_pair)].copy()
    out["image_id"] = out["image_id"].astype(str).map(to_pair)
    return out.reset_index(drop=True)


def common_eyes(frames: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Every frame restricted to the ``image_id`` values all of them hold, in one order (sorted)."""
    ids = None
    for frame in frames.values():
        ids = set(frame["image_id"].astype(str)) if ids is None else ids & set(frame["image_id"].astype(str))
    keep = sorted(ids or ())
    return {name: f.set_index(f["image_id"].astype(str)).loc[keep].reset_index(drop=True)
            for name, f in frames.items()}


def restrict(pairs_path, fusion_path, single: dict[str, str], out_dir) -> dict[str, Path]:
    """Write ``fusion.parquet`` and ``<modality>.parquet`` (each given single-modality run) on the
    same eyes into ``out_dir``; returns ``{name: path}`` (fusion first)."""
    pairs = pd.read_parquet(pairs_path)
    frames = {"fusion": pd.read_parquet(fusion_path)}
    for modality, path in single.items():
        frames[modality] = eye_predictions(pd.read_parquet(path), pairs, modality)
    before = {name: len(f) for name, f in frames.items()}
    frames = common_eyes(frames)
    if len(frames["fusion"]) == 0:
        raise UserError(f"{fusion_path}: no test eye is in every predictions file ({before}); the single-modality "
                        f"runs test on other patients than the pairs (see pairing.json split_source beside {pairs_path})")
    out, paths = Path(out_dir), {}
    for name, frame in frames.items():
        paths[name] = out / f"{name}.parquet"
        with atomic_path(paths[name]) as tmp:
            frame.to_parquet(tmp, index=False)
    print(f"{len(frames['fusion'])} eyes in every predictions file (rows before: {before}) -> {out}", flush=True)
    return paths


def run(s: SameEyesSettings, pairs_path, fusion_path, single: dict[str, str], out) -> dict:
    """One same-eyes job: restricted predictions beside ``out``, each scored (``<name>.metrics.json``,
    :func:`retflow.evaluate.evaluate.evaluate_predictions`, eval set ``same_eyes``) and every pair
    compared (:func:`retflow.report.pairwise.compare_models`: DeLong for a binary AUROC, else a
    paired bootstrap) -> ``out`` (compare.json: the comparison + ``metrics`` (name -> primary metric
    with its CI), ``n_eyes``, ``tasks``, ``pairing`` (the task's pairing.json counts), ``settings``)."""
    from retflow.evaluate.evaluate import evaluate_predictions
    from retflow.report.pairwise import compare_models

    if set(single) != set(s.tasks):
        raise ValueError(f"predictions for {sorted(single)}, settings name {dict(s.tasks)}")
    out = Path(out)
    paths = restrict(pairs_path, fusion_path, single, out.parent)
    classes = list(s.classes) or None
    metrics, n = {}, None
    for name, path in paths.items():
        meta = {"task": s.task if name == "fusion" else s.tasks[name], "task_type": s.task_type,
                "protocol": "fusion" if name == "fusion" else s.protocol, "model": s.model,
                "fraction": s.fraction, "seed": s.seed, "eval_set": "same_eyes", "classes": classes}
        res = evaluate_predictions(path, meta, out.parent / f"{name}.metrics.json", n_boot=s.evaluate.n_boot,
                                   seed=s.evaluate.seed, settings=s.to_dict())
        metrics[name], n = res["metrics"][res["primary_metric"]], res["n"]
    compare = compare_models({k: str(v) for k, v in paths.items()}, s.task_type, classes, None,
                             n_boot=s.evaluate.n_boot, seed=s.evaluate.seed)
    pairing = Path(pairs_path).parent / "pairing.json"
    result = {"task": s.task, "protocol": s.protocol, "model": s.model, "fraction": s.fraction, "seed": s.seed,
              "tasks": dict(s.tasks), "n_eyes": n, "metrics": metrics, **compare,
              "pairing": json.loads(pairing.read_text()) if pairing.is_file() else None, "settings": s.to_dict()}
    write_json(json_safe(result), out)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Fusion and single-modality models compared on the same test eyes.")
    ap.add_argument("--settings", required=True, help="SameEyesSettings JSON (retflow.settings.report.same_eyes)")
    ap.add_argument("--pairs", required=True, help="pairs.parquet of the fusion task")
    ap.add_argument("--fusion", required=True, help="the fusion run's predictions.parquet")
    ap.add_argument("--cfp", default="", help="the CFP-only run's predictions.parquet")
    ap.add_argument("--oct", default="", help="the OCT-only run's predictions.parquet")
    ap.add_argument("--out", required=True, help="compare.json to write (the restricted predictions go beside it)")
    args = ap.parse_args(argv)
    single = {m: p for m, p in (("cfp", args.cfp), ("oct", args.oct)) if p}
    res = run(SameEyesSettings.from_json(args.settings), args.pairs, args.fusion, single, args.out)
    rest = "; ".join(f"{p['a']} - {p['b']}: {p['difference']} p {p['p_value']}" for p in res["pairs"])
    print(f"{args.out}: {res['metric']} on {res['n_eyes']} eyes {res['values']} ({rest})", flush=True)
    return 0


if __name__ == "__main__":
    from retflow.errors import run_main

    sys.exit(run_main(main))
