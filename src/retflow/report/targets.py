"""DAG targets of the report's own steps (pairwise model comparison, saliency maps).

Pure functions of the validated config, used by ``rules/compare.smk`` and ``rules/report.smk``;
every path comes from the :class:`retflow.layout.Layout` the caller passes (the rules' ``LAYOUT``).
What each job runs with is built by :mod:`retflow.settings.report` (``compare``, ``saliency``).

* **compare**: one job per (task, protocol, label fraction, seed[, cross-validation fold]) that has at
  least two models in :func:`retflow.config.downstream_runs`; it compares the models' internal test
  predictions (models paired within the same fold and seed).
  Segmentation tasks are left out (their predictions are masks, not per-image scores).
* **same_eyes**: one job per :func:`retflow.fusion_config.same_eyes_jobs` entry: a fusion run and
  its ``compare_with`` tasks' runs of one protocol (same model, fraction, seed) on the same test eyes.
* **saliency**: one job per classification task (binary, multiclass, ordinal; not a fusion task, whose
  model takes two images) on one run: the
  ``finetune`` protocol when it is run (else the first protocol), the first 2-D model initialised
  from our pretraining (else the first 2-D model; 3-D volume models are not explained, and a task with
  only those has none), the largest label fraction, the first fold and seed.
"""

from __future__ import annotations

from collections import OrderedDict

from .. import config as rfc
from ..layout import Layout

SKIP_COMPARE_TYPES = frozenset({"segmentation"})
SALIENCY_TYPES = ("binary", "multiclass", "ordinal")


def compare_groups(config: dict) -> "OrderedDict[tuple[str, str, str, int, int | None], list[str]]":
    """``{(task, protocol, fraction tag, seed, fold): [model, ...]}`` for groups with >= 2 models
    (fold None without cross-validation)."""
    groups: OrderedDict = OrderedDict()
    for run in rfc.downstream_runs(config):
        if config["tasks"][run.task]["type"] in SKIP_COMPARE_TYPES:
            continue
        key = (run.task, run.protocol, rfc.fraction_tag(run.fraction), int(run.seed), run.fold)
        models = groups.setdefault(key, [])
        if run.model not in models:
            models.append(run.model)
    return OrderedDict((k, v) for k, v in groups.items() if len(v) >= 2)


def compare_models(config: dict, task: str, protocol: str, frac: str, seed, fold=None) -> list[str]:
    """Models of one compare job, in config order ([] when the config has no such job); ``fold``: an
    int, a fold tag (``"fold2/"``, ``""``) or None."""
    from ..layout import parse_fold

    return compare_groups(config).get((task, protocol, str(frac), int(seed), parse_fold(fold)), [])


def saliency_run(config: dict, task: str) -> rfc.Run | None:
    """The run whose model the saliency maps of ``task`` explain (module docstring), or None."""
    if config["tasks"][task]["type"] not in SALIENCY_TYPES or config["tasks"][task].get("fusion"):  # optional
        return None
    runs = rfc.downstream_runs(config, task)
    if not runs:
        return None
    protocols = list(dict.fromkeys(r.protocol for r in runs))
    protocol = "finetune" if "finetune" in protocols else protocols[0]
    runs = [r for r in runs if r.protocol == protocol]
    # saliency reads 2-D models: a task's 3-D (volume) models are not explained
    models = [m for m in dict.fromkeys(r.model for r in runs) if config["models"][m]["input"] == "image"]
    if not models:
        return None
    pretrained = [m for m in models if config["models"][m]["init"] == "pretrained"]
    model = (pretrained or models)[0]
    runs = [r for r in runs if r.model == model]
    frac = max(r.fraction for r in runs)
    runs = [r for r in runs if r.fraction == frac]
    runs = [r for r in runs if r.fold == runs[0].fold]
    seeds = list(dict.fromkeys(r.seed for r in runs))
    return next(r for r in runs if r.seed == seeds[0])


def saliency_tasks(config: dict) -> list[str]:
    return [t for t in config["tasks"] if saliency_run(config, t) is not None]


# ---------------------------------------------------------------- rule helpers (paths from the Layout)
def compare_outputs(config: dict, layout: Layout) -> list[str]:
    """Every compare JSON of the config (an input of the report rule)."""
    return [layout.compare_json(*key) for key in compare_groups(config)]


def saliency_outputs(config: dict, layout: Layout) -> list[str]:
    """Every saliency PNG of the config (an input of the report rule)."""
    return [layout.saliency_png(t) for t in saliency_tasks(config)]


def compare_inputs(config: dict, layout: Layout, wildcards) -> list[str]:
    """Input function of rule compare: the models' internal test predictions (the models' order)."""
    w = wildcards
    return [f"{layout.run_dir(w.protocol, w.task, model, w.frac, w.seed, w.fold)}/predictions.parquet"
            for model in compare_models(config, w.task, w.protocol, w.frac, w.seed, w.fold)]


def same_eyes_outputs(config: dict, layout: Layout) -> list[str]:
    """Every same-eyes compare.json of the config (an input of the report rule)."""
    from ..fusion_config import same_eyes_jobs

    return [layout.same_eyes_json(j.task, j.protocol, j.model, j.fraction, j.seed) for j in same_eyes_jobs(config)]


def same_eyes_inputs(config: dict, layout: Layout, wildcards) -> dict:
    """Input function of rule same_eyes: the task's pairs, the fusion run's and each compare_with
    task's run's predictions (keys ``pairs``, ``fusion``, ``cfp`` / ``oct``)."""
    from ..fusion_config import FUSION, compare_tasks

    w = wildcards
    out = {"pairs": layout.pairs(w.task),
           "fusion": f"{layout.run_dir(FUSION, w.task, w.model, w.frac, w.seed)}/predictions.parquet"}
    for modality, task in compare_tasks(config, w.task).items():
        out[modality] = f"{layout.run_dir(w.protocol, task, w.model, w.frac, w.seed)}/predictions.parquet"
    return out


def saliency_inputs(config: dict, layout: Layout, wildcards) -> dict:
    """Input function of rule saliency: the explained checkpoint and the task's prepared store."""
    run = saliency_run(config, wildcards.task)
    if run is None:
        raise ValueError(f"task {wildcards.task!r} has no saliency maps (types {SALIENCY_TYPES})")
    return {"best": f"{layout.run(run)}/best.pth",
            "store": layout.manifest(config["tasks"][wildcards.task]["dataset"])}
