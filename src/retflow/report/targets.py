"""DAG targets of the report's own steps (pairwise model comparison, saliency maps).

Pure functions of the resolved config, used by ``rules/compare.smk`` and ``rules/report.smk``;
paths are relative to the results root (the rules prefix ``config["results"]``).

* **compare**: one job per (task, protocol, label fraction, seed) that has at least two models in
  :func:`retflow.config.downstream_runs`; it compares the models' internal test predictions.
  Segmentation tasks are left out (their predictions are masks, not per-image scores).
* **saliency**: one job per classification task (binary, multiclass, ordinal) on one run: the
  ``finetune`` protocol when it is run (else the first protocol), the first model initialised
  from our pretraining (else the first model), the largest label fraction and the first seed.
"""

from __future__ import annotations

import shlex
from collections import OrderedDict

from .. import config as rfc

SKIP_COMPARE_TYPES = frozenset({"segmentation"})
SALIENCY_TYPES = ("binary", "multiclass", "ordinal")


def task_type(config: dict, task: str) -> str | None:
    return (config.get("tasks", {}).get(task) or {}).get("type")


def compare_groups(config: dict) -> "OrderedDict[tuple[str, str, str, int], list[str]]":
    """``{(task, protocol, fraction tag, seed): [model, ...]}`` for groups with >= 2 models."""
    groups: OrderedDict = OrderedDict()
    for run in rfc.downstream_runs(config):
        if task_type(config, run.task) in SKIP_COMPARE_TYPES:
            continue
        key = (run.task, run.protocol, rfc.fraction_tag(run.fraction), int(run.seed))
        models = groups.setdefault(key, [])
        if run.model not in models:
            models.append(run.model)
    return OrderedDict((k, v) for k, v in groups.items() if len(v) >= 2)


def compare_json(task: str, protocol: str, frac: str, seed) -> str:
    return f"compare/{task}/{protocol}/frac{frac}/seed{seed}.json"


def compare_targets(config: dict) -> list[str]:
    """Every compare JSON of the config (relative to the results root)."""
    return [compare_json(*key) for key in compare_groups(config)]


def compare_models(config: dict, task: str, protocol: str, frac: str, seed) -> list[str]:
    """Models of one compare job, in config order."""
    return compare_groups(config).get((task, protocol, str(frac), int(seed)), [])


def compare_predictions(config: dict, task: str, protocol: str, frac: str, seed) -> list[str]:
    """Internal test predictions of the models of one compare job (same order as the models)."""
    return [
        f"{protocol}/{task}/{model}/frac{frac}/seed{seed}/predictions.parquet"
        for model in compare_models(config, task, protocol, frac, seed)
    ]


def saliency_run(config: dict, task: str) -> rfc.Run | None:
    """The run whose model the saliency maps of ``task`` explain (module docstring), or None."""
    if task_type(config, task) not in SALIENCY_TYPES:
        return None
    runs = rfc.downstream_runs(config, task)
    if not runs:
        return None
    protocols = list(dict.fromkeys(r.protocol for r in runs))
    protocol = "finetune" if "finetune" in protocols else protocols[0]
    runs = [r for r in runs if r.protocol == protocol]
    models = list(dict.fromkeys(r.model for r in runs))
    pretrained = [m for m in models if (config.get("models", {}).get(m) or {}).get("init") == "pretrained"]
    model = (pretrained or models)[0]
    runs = [r for r in runs if r.model == model]
    frac = max(r.fraction for r in runs)
    runs = [r for r in runs if r.fraction == frac]
    seeds = list(dict.fromkeys(r.seed for r in runs))
    return next(r for r in runs if r.seed == seeds[0])


def saliency_tasks(config: dict) -> list[str]:
    return [t for t in config.get("tasks", {}) if saliency_run(config, t) is not None]


def saliency_targets(config: dict) -> list[str]:
    return [f"saliency/{t}.png" for t in saliency_tasks(config)]


# ---------------------------------------------------------------- rule helpers (full paths)
def _root(config: dict) -> str:
    return str(config.get("results", "results"))


def compare_outputs(config: dict) -> list[str]:
    """Every compare JSON, under the results root (input of the report rule)."""
    return [f"{_root(config)}/{p}" for p in compare_targets(config)]


def saliency_outputs(config: dict) -> list[str]:
    """Every saliency PNG, under the results root (input of the report rule)."""
    return [f"{_root(config)}/{p}" for p in saliency_targets(config)]


def compare_inputs(config: dict, wildcards) -> list[str]:
    """Input function of rule compare: the models' internal test predictions."""
    w = wildcards
    return [f"{_root(config)}/{p}" for p in compare_predictions(config, w.task, w.protocol, w.frac, w.seed)]


def compare_args(config: dict, wildcards) -> str:
    """Command-line arguments of workflow_scripts/compare.py for one compare job."""
    w = wildcards
    task = config["tasks"][w.task]
    models = compare_models(config, w.task, w.protocol, w.frac, w.seed)
    ev = config.get("evaluate", {})
    q = shlex.quote
    args = [
        "--models", *map(q, models), "--task-type", q(task["type"]),
        "--n-boot", str(int(ev.get("n_boot", 1000))), "--seed", str(int(ev.get("seed", 0))),
        "--task", q(w.task), "--protocol", q(w.protocol), "--fraction", q(str(w.frac)), "--train-seed", str(w.seed),
    ]
    if task["type"] != "regression":
        classes = _task_classes(task)
        if classes:
            args += ["--classes", *(q(str(c)) for c in classes)]
    return " ".join(args)


def _task_classes(task: dict) -> list[str]:
    if hasattr(rfc, "task_classes"):
        try:
            return rfc.task_classes(task)
        except (KeyError, TypeError):
            pass
    return [str(c) for c in task.get("classes") or []]


def saliency_inputs(config: dict, wildcards) -> dict:
    """Input function of rule saliency: the explained checkpoint and the task's prepared store."""
    run = saliency_run(config, wildcards.task)
    if run is None:
        raise ValueError(f"task {wildcards.task!r} has no saliency maps (types {SALIENCY_TYPES})")
    dataset = config["tasks"][wildcards.task]["dataset"]
    return {
        "best": f"{_root(config)}/{run.dir}/best.pth",
        "store": f"{_root(config)}/data/{dataset}/manifest.parquet",
    }


def saliency_args(config: dict, wildcards) -> str:
    """Command-line arguments of workflow_scripts/saliency.py (store folder, label, title, run)."""
    run = saliency_run(config, wildcards.task)
    task = config["tasks"][wildcards.task]
    title = (f"{wildcards.task}: {run.model} ({run.protocol}), label fraction {rfc.fraction_tag(run.fraction)}, "
             f"seed {run.seed}; test images")
    q = shlex.quote
    return " ".join([
        "--store", q(f"{_root(config)}/data/{task['dataset']}"), "--label", q(task["label"]),
        "--title", q(title), "--run", q(run.dir), "--device", q(str(config.get("device", "auto"))),
    ])
