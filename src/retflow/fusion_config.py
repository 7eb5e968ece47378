"""What a fusion task (``tasks.<name>.fusion``) adds to the config: its checks, fan-out and comparisons.

A fusion task trains one late-fusion model per model x label fraction x seed on the pairs of a CFP
and an OCT dataset (:mod:`retflow.data.pairing`, :mod:`retflow.train.fusion`); its only protocol is
:data:`FUSION` (the run folder ``results/fusion/<task>/<model>/frac<f>/seed<s>/``). Its
``compare_with`` tasks are single-modality tasks on the same datasets: :func:`same_eyes_jobs` lists
one comparison per model x protocol x fraction x seed that the fusion task and all of them run
(rule ``same_eyes``: the fusion model and the single-modality models on the same test eyes).

:func:`errors` are the startup checks (one line each, naming the key and the fix); the other
functions are pure functions of the validated config, used by :mod:`retflow.config`, the rules
(``rules/fusion.smk``) and the report targets.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

FUSION = "fusion"  # the protocol of fusion runs
MODALITIES = ("cfp", "oct")
PAIRS_FOLDER = "pairs"  # results/data/pairs/<task>/ (retflow.layout.Layout.pairs_dir)


def is_fusion(config: dict, task: str) -> bool:
    return config["tasks"][task].get("fusion") is not None  # optional block: only fusion tasks have one


def fusion_tasks(config: dict) -> list[str]:
    return [t for t in config["tasks"] if is_fusion(config, t)]


def compare_tasks(config: dict, task: str) -> dict[str, str]:
    """``{modality: single-modality task}`` of a fusion task's ``compare_with`` (its order)."""
    datasets = config["datasets"]
    out = {}
    for name in config["tasks"][task]["fusion"]["compare_with"]:
        out[datasets[config["tasks"][name]["dataset"]]["modality"]] = name
    return out


@dataclass(frozen=True)
class SameEyes:
    """One same-eyes comparison: the fusion run (``task``, model, fraction, seed) and the
    ``compare_with`` tasks' runs of ``protocol`` with the same model, fraction and seed."""

    task: str
    protocol: str
    model: str
    fraction: float
    seed: int


def same_eyes_jobs(config: dict) -> list[SameEyes]:
    """Every same-eyes comparison of the config (module docstring); none without ``compare_with``."""
    from retflow import config as rfc

    jobs = []
    for task in fusion_tasks(config):
        single = list(compare_tasks(config, task).values())
        if not single:
            continue
        _, fractions, seeds = rfc.task_fanout(config, task)
        models = rfc.task_models(config, task)
        shared = [rfc.task_fanout(config, t) + (rfc.task_models(config, t),) for t in single]
        protocols = [p for p in shared[0][0] if all(p in s[0] for s in shared)]
        for p, m, f, s in itertools.product(protocols, models, fractions, seeds):
            if all(m in sh[3] and any(float(f) == float(x) for x in sh[1]) and s in sh[2] for sh in shared):
                jobs.append(SameEyes(task, p, m, float(f), int(s)))
    return jobs


def init_checkpoint(config: dict, layout, model: str, modality: str) -> str | None:
    """The checkpoint a fusion model's ``modality`` encoder starts from: the DAG's pretraining run
    (``init: pretrained``), the model's file for that modality (``init: file``), or None (random)."""
    from retflow import config as rfc

    spec = config["models"][model]
    if spec["init"] == "pretrained":
        return layout.pretrain_checkpoint(rfc.pretrain_run(config, spec), modality)
    if spec["init"] == "file":
        return rfc.model_weights_file(config, model, modality)
    return None


# ---------------------------------------------------------------- startup checks
def _block_errors(config: dict, name: str) -> list[str]:
    task, block, datasets = config["tasks"][name], config["tasks"][name]["fusion"], config["datasets"]
    key = f"tasks.{name}.fusion"
    errors = []
    for modality in MODALITIES:
        ds = block[modality]
        if ds not in datasets:
            errors.append(f"{key}.{modality}: unknown dataset '{ds}' (one of {', '.join(datasets)})")
        elif datasets[ds]["modality"] != modality:
            errors.append(f"{key}.{modality}: dataset '{ds}' has modality '{datasets[ds]['modality']}', "
                          f"not '{modality}'")
        elif datasets[ds]["role"] != "labelled":
            errors.append(f"{key}.{modality}: dataset '{ds}' has role '{datasets[ds]['role']}'; pairs need the "
                          f"patient splits of a labelled dataset (role: labelled)")
        else:
            from retflow import config as rfc

            if rfc.dataset_folds(config, ds) > 1:
                errors.append(f"{key}.{modality}: dataset '{ds}' is cross-validated ({rfc.dataset_folds(config, ds)} "
                              f"folds); fusion tasks use the fixed split (set datasets.{ds}.folds: 1)")
    if task["dataset"] not in (block["cfp"], block["oct"]):
        errors.append(f"tasks.{name}.dataset: '{task['dataset']}' gives the fusion task's label, so it must be "
                      f"{key}.cfp ('{block['cfp']}') or {key}.oct ('{block['oct']}')")
    if task["type"] == "segmentation":
        errors.append(f"tasks.{name}.type: a fusion task classifies or regresses eyes, not 'segmentation' "
                      f"(remove {key} or change the type)")
    if task["external"]:
        errors.append(f"tasks.{name}.external: not supported for fusion tasks (remove it)")
    if task.get("protocols") not in (None, [FUSION]):  # optional override
        errors.append(f"tasks.{name}.protocols: a fusion task runs the '{FUSION}' protocol only "
                      f"(remove the key; got {task['protocols']})")
    return errors


def _model_errors(config: dict, name: str) -> list[str]:
    from retflow import config as rfc

    errors = []
    models = [m for m in rfc.task_models(config, name) if m in config["models"]]
    for m in models:
        spec = config["models"][m]
        path = spec.get("path")  # init: file only, no default
        if spec["init"] == "file" and path and not (isinstance(path, dict) and all(k in path for k in MODALITIES)):
            errors.append(f"models.{m}.path: fusion task '{name}' loads a CFP and an OCT encoder: give one file per "
                          f"modality (path: {{cfp: <file>, oct: <file>}})")
    pools = config["pretrain"]["pools"]
    if any(config["models"][m]["init"] == "pretrained" for m in models):
        for modality in MODALITIES:
            if not pools.get(modality):
                errors.append(f"tasks.{name}: fusion needs a pretrained {modality.upper()} encoder: no pretraining "
                              f"pool for modality '{modality}' (pretrain.pools.{modality})")
    return errors


def _compare_errors(config: dict, name: str) -> list[str]:
    task, block, tasks = config["tasks"][name], config["tasks"][name]["fusion"], config["tasks"]
    key = f"tasks.{name}.fusion.compare_with"
    errors, seen = [], {}
    for other in block["compare_with"]:
        if other not in tasks:
            errors.append(f"{key}: unknown task '{other}' (one of {', '.join(t for t in tasks if t != name)})")
            continue
        spec = tasks[other]
        if is_fusion(config, other):
            errors.append(f"{key}: '{other}' is a fusion task; name single-modality tasks")
            continue
        if spec["dataset"] not in (block["cfp"], block["oct"]):
            errors.append(f"{key}: task '{other}' is on dataset '{spec['dataset']}', not on the fusion task's "
                          f"'{block['cfp']}' or '{block['oct']}' (the same eyes are compared)")
            continue
        if spec["type"] != task["type"] or [str(c) for c in spec.get("classes", [])] != \
                [str(c) for c in task.get("classes", [])]:
            errors.append(f"{key}: task '{other}' ({spec['type']}, classes {spec.get('classes')}) must have the "
                          f"fusion task's type and classes ({task['type']}, {task.get('classes')})")
            continue
        modality = "cfp" if spec["dataset"] == block["cfp"] else "oct"
        if modality in seen:
            errors.append(f"{key}: '{seen[modality]}' and '{other}' are both {modality.upper()} tasks; name one per "
                          f"modality")
        seen[modality] = other
    return errors


def errors(config: dict) -> list[str]:
    """Every problem of the config's fusion tasks and protocols, one line each (startup)."""
    out = []
    if FUSION in config["protocols"]:
        out.append(f"protocols: '{FUSION}' is the protocol of fusion tasks (tasks.<name>.fusion), which run it "
                   f"without being told; remove it")
    if PAIRS_FOLDER in config["datasets"] and fusion_tasks(config):
        out.append(f"datasets.{PAIRS_FOLDER}: the name is taken by the fusion tasks' pairs "
                   f"(results/data/{PAIRS_FOLDER}/<task>/); rename the dataset")
    for name, task in config["tasks"].items():
        if not is_fusion(config, name):
            if FUSION in (task.get("protocols") or []):
                out.append(f"tasks.{name}.protocols: '{FUSION}' needs a fusion task (tasks.{name}.fusion: "
                           f"{{cfp: <dataset>, oct: <dataset>}}); remove it")
            continue
        if task["dataset"] not in config["datasets"]:
            continue  # retflow.config.semantic_errors names it
        out += _block_errors(config, name) + _model_errors(config, name) + _compare_errors(config, name)
    return out
