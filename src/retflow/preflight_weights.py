"""The pre-flight weights check (rule ``preflight_weights``): every local weights file the config
starts a model from is read (memory-mapped: nothing is loaded into a model) and checked against
the ViT it will be loaded into, before any pretraining or fine-tuning job starts.

A RETFound ViT-L file under a config whose ``vit:`` is a tiny ViT would otherwise fail inside the
fine-tune job, after pretraining. The check builds the configured ViT on PyTorch's ``meta``
device (shapes only) and runs the encoder loader's own checks (``check_only``): layout, shapes
after position-embedding interpolation and channel adaptation, missing encoder weights. It writes
``weights.json`` -- every file with its layout, and every problem -- and the gate
(:mod:`retflow.preflight_data`) lists those problems with the data stage's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from retflow import config as rfc
from retflow.atomic import write_json


def weight_uses(config: dict) -> list[dict]:
    """``{key, path, vit}`` for every (weights file, ViT) pair the config will load: ``init: file``
    models of the tasks that use them (a volume model's: ``{key, path, vit3d}``), ``pretrain.init``, a file
    as token_recon's teacher."""
    uses = []
    for task, modality in ((t, m) for t in config["tasks"] for m in rfc.task_modalities(config, t)):
        for name in rfc.task_models(config, task):
            model = config["models"][name]
            if model["init"] == "file":
                key = f"models.{name}.path" + (f".{modality}" if isinstance(model["path"], dict) else "")
                use = {"key": key, "path": rfc.model_weights_file(config, name, modality)}
                if model["input"] == "volume":  # an mae3d checkpoint for the 3-D ViT
                    use["vit3d"] = dict(config["vit3d"])
                else:
                    use["vit"] = rfc.vit_settings(config, modality)
                uses.append(use)
    p = config["pretrain"]
    for run, modality in rfc.pretrain_runs(config):
        if p["init"] and rfc.parse_pretrain_run(run)[0] != "mae3d":  # mae3d starts from random weights
            uses.append({"key": "pretrain.init", "path": p["init"], "vit": rfc.vit_settings(config, modality)})
        teacher = p["token_recon"].get("teacher_checkpoint")
        if rfc.parse_pretrain_run(run)[0] == "token_recon" and teacher and teacher not in p["methods"]:
            path = teacher if isinstance(teacher, str) else teacher[modality]
            key = "pretrain.token_recon.teacher_checkpoint" + ("" if isinstance(teacher, str) else f".{modality}")
            vit = p["token_recon"]["teacher_vit"] or rfc.vit_settings(config, modality)
            uses.append({"key": key, "path": path, "vit": dict(vit)})
    unique = {json.dumps(u, sort_keys=True): u for u in uses}
    return [unique[k] for k in sorted(unique)]


def check_use(use: dict) -> dict:
    """``use`` with ``layout`` and ``problem`` (None when the file fits its ViT): a 2-D file read by the
    encoder loader's checks; a volume model's (``vit3d``) an mae3d checkpoint whose encoder must fit the 3-D ViT."""
    from retflow.checkpoint_file import CheckpointError

    out = dict(use, layout=None, problem=None)
    try:
        (_check_volume_file if "vit3d" in use else _check_image_file)(out)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        out["problem"] = f"{use['key']}: {' '.join(str(exc).split())}"
    return out


def _check_image_file(out: dict) -> None:
    """Records the file's layout, then checks it loads into the configured 2-D ViT (built on the meta device)."""
    import torch

    from retflow.models.checkpoint_layouts import load_encoder, read_checkpoint
    from retflow.models.vit import ViTSpec, create_vit

    ck = read_checkpoint(out["path"])
    out["layout"] = ck.layout
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = create_vit(ViTSpec.from_dict(out["vit"]), num_classes=0, global_pool="avg")
    load_encoder(model, ck, check_only=True)


def _check_volume_file(out: dict) -> None:
    """Checks the file's encoder loads into the configured 3-D ViT (on the meta device), then records its layout."""
    import warnings

    import torch

    from retflow.models.mae3d import ViT3DSpec, vit3d
    from retflow.train.volume import load_mae3d_encoder

    with torch.device("meta"), warnings.catch_warnings():  # shapes only: loading into it copies nothing
        warnings.filterwarnings("ignore", message=".*non-meta parameter in the checkpoint to a meta parameter")
        model = vit3d(ViT3DSpec.from_dict(out["vit3d"]), num_classes=0)
        load_mae3d_encoder(model, out["path"])
    out["layout"] = "mae3d"


def check_weights(uses: list[dict]) -> dict:
    checked = [check_use(u) for u in uses]
    return {"checked": checked, "problems": [c["problem"] for c in checked if c["problem"]]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Pre-flight: every configured weights file fits its ViT.")
    ap.add_argument("--uses", required=True, help="JSON list of {key, path, vit} (weight_uses)")
    ap.add_argument("--out", required=True, help="weights.json (the gate reads its problems)")
    args = ap.parse_args(argv)
    report = check_weights(json.loads(args.uses))
    for c in report["checked"]:
        fits = "the 3-D ViT (vit3d)" if "vit3d" in c else c["vit"]["arch"]
        print(f"{c['key']}: {c['path']} ({c['layout']}): {c['problem'] or 'fits ' + fits}")
    write_json(report, Path(args.out))
    return 0
