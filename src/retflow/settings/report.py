"""Typed, frozen settings of the evaluation and reporting jobs, and their builders.

* :class:`EvaluationSettings` - one ``evaluate`` job (rules/evaluate.smk): a run's predictions on
  one eval set, scored in that set's label scheme with the ``evaluate`` bootstrap;
* :class:`CompareSettings` - one ``compare`` job (rules/compare.smk): every model pair of a task x
  protocol x label fraction x seed;
* :class:`SaliencySettings` - one ``saliency`` job: the run whose model is explained;
* :class:`ReportSettings` - the ``report`` job: exactly what the report reads of the config.

Built once from the validated config (:func:`retflow.settings.validate`) by the functions below;
the rules hand them to the entry points as JSON (``--settings``) and a library user calls the same
builders::

    config = load_config("config.yaml")
    build_report(Layout(config["results"]).root, "benchmarks", report(config), "report.html")

No field has a default (``config/schema.yaml`` holds them all). Each job records what it ran with:
metrics.json, the compare JSON and the saliency JSON carry their settings under ``"settings"``,
the report writes ``report.settings.json`` beside ``report.html`` (:meth:`retflow.layout.Layout.report_settings`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from retflow import config as rfc
from retflow.settings.frozen import Frozen
from retflow.settings.load import ConfigError
from retflow.settings.stages import METHOD_SETTINGS, EvaluateSettings

frozen = dataclasses.dataclass(frozen=True)


# ------------------------------------------------------------------------------ jobs
@frozen
class EvaluationSettings(Frozen):
    """One ``evaluate`` job: a run's predictions on ``eval_set`` (``internal`` or an external dataset),
    of ``task_type`` with ``classes`` (the external set's own scheme where it declares one; () for
    regression), scored with the ``evaluate`` bootstrap."""

    task: str
    task_type: str
    classes: tuple[str, ...]
    protocol: str
    model: str
    fraction: float
    seed: int
    eval_set: str
    evaluate: EvaluateSettings


@frozen
class CompareSettings(Frozen):
    """One ``compare`` job: every pair of ``models`` (config order) trained on the same subset with
    the same ``seed``, on the internal test set, with the ``evaluate`` bootstrap."""

    task: str
    task_type: str
    classes: tuple[str, ...]  # () for regression
    protocol: str
    fraction: float
    seed: int  # the runs' training seed
    models: tuple[str, ...]
    evaluate: EvaluateSettings


@frozen
class SameEyesSettings(Frozen):
    """One ``same_eyes`` job (rules/fusion.smk): the fusion run of ``task`` (``model``, ``fraction``,
    ``seed``) and the ``protocol`` runs of its ``compare_with`` tasks (``tasks``: modality -> task) with
    the same model, fraction and seed, scored on the test eyes all of them predicted, with the
    ``evaluate`` bootstrap."""

    task: str
    task_type: str
    classes: tuple[str, ...]  # () for regression
    protocol: str  # the single-modality runs'
    model: str
    fraction: float
    seed: int
    tasks: Mapping[str, str]
    evaluate: EvaluateSettings


@frozen
class SaliencySettings(Frozen):
    """One ``saliency`` job: the run whose model is explained (:func:`retflow.report.targets.saliency_run`),
    the task's labelled dataset and label column, and the device."""

    task: str
    dataset: str
    label: str
    protocol: str
    model: str
    fraction: float
    seed: int
    device: str

    def description(self) -> str:
        """``glaucoma: mae (finetune), label fraction 1, seed 0`` (the figure's title, the report's caption)."""
        return (f"{self.task}: {self.model} ({self.protocol}), label fraction {format(self.fraction, 'g')}, "
                f"seed {self.seed}")


# ------------------------------------------------------------------------------ the report
@frozen
class ReportDataset(Frozen):
    """A dataset as the report's configuration section lists it."""

    name: str
    modality: str
    role: str
    source: str
    path: str | None  # csv / imagefolder / volumes
    phantom: Mapping[str, Any] | None  # source phantom (schema defaults filled)


@frozen
class ExternalSet(Frozen):
    """An external test set of a task; ``classes`` / ``map`` when it is scored in its own label scheme."""

    dataset: str
    classes: tuple[str, ...]  # () = the task's classes
    map: Mapping[str, str] | None  # model class -> external class


@frozen
class ReportTask(Frozen):
    """A task with its fan-out resolved (its own protocols / fractions / seeds / models, else the global ones)."""


    name: str
    dataset: str
    label: Any  # one column; a tuple of 0/1 columns (multilabel); None (segmentation)
    type: str
    classes: tuple[str, ...]  # () for regression
    external: tuple[ExternalSet, ...]
    models: tuple[str, ...]
    protocols: tuple[str, ...]
    fractions: tuple[float, ...]
    seeds: tuple[int, ...]
    reference: Mapping[str, Any] | None  # published values {metric: value, ..., "source": citation}


@frozen
class ReportModel(Frozen):
    """A downstream model: how it is initialised, and the pretraining run it starts from."""

    name: str
    init: str  # pretrained | random | file
    method: str | None
    path: Any  # init file: one file or {modality: file}; else None
    pretrain_run: str | None  # init pretrained: results/pretrain/<pretrain_run>/ (retflow.config.pretrain_run)
    input: str  # image (the 2-D ViT on stored images) | volume (the 3-D ViT on whole volumes)


@frozen
class ConfigSection(Frozen):
    """A config section the report shows verbatim (key -> value, schema defaults filled)."""

    name: str
    values: Mapping[str, Any]


@frozen
class ReportSettings(Frozen):
    """What the report reads of the config (rules/report.smk passes it as ``--settings``)."""


    datasets: tuple[ReportDataset, ...]
    tasks: tuple[ReportTask, ...]  # config order: the report's task order
    models: tuple[ReportModel, ...]  # config order: colours and row order
    protocols: tuple[str, ...]  # the global run grid
    fractions: tuple[float, ...]
    seeds: tuple[int, ...]
    evaluate: EvaluateSettings  # the bootstrap of every CI (the report says how many resamples)
    gpus: Mapping[str, float]  # GPUs one job holds (gpu x nodes): pretrain, finetune
    synth_modalities: tuple[str, ...]  # () when synth is off
    sections: tuple[ConfigSection, ...]  # vit, pretrain and each protocol's section that runs
    chance_margin: float  # report.chance_margin: a run whose lowest training loss stays above
    #                       chance_loss x (1 - chance_margin) "never left chance"

    def task(self, name: str) -> ReportTask | None:
        return next((t for t in self.tasks if t.name == name), None)

    def model(self, name: str) -> ReportModel | None:
        return next((m for m in self.models if m.name == name), None)


# ------------------------------------------------------------------------------ builders
def _classes(spec: dict) -> tuple[str, ...]:
    """A task's output names (:func:`retflow.config.task_classes`); none for regression."""
    return () if spec["type"] == "regression" else tuple(rfc.task_classes(spec))


def evaluation(config: dict, protocol: str, task: str, model: str, fraction, seed,
               eval_set: str = "internal") -> EvaluationSettings:
    """One evaluate job; an external set with its own ``classes`` + ``map`` is scored in that scheme."""
    spec = config["tasks"][task]
    kind, classes = spec["type"], _classes(spec)
    if eval_set != "internal":
        ext = rfc.external_eval(config, task, eval_set)
        kind = ext["type"]
        classes = () if kind == "regression" else tuple(ext["classes"]) or classes
    return EvaluationSettings.from_dict({
        "task": task, "task_type": kind, "classes": classes, "protocol": protocol, "model": model,
        "fraction": float(fraction), "seed": int(seed), "eval_set": eval_set, "evaluate": config["evaluate"]},
        "evaluate")


def compare(config: dict, task: str, protocol: str, fraction, seed, fold=None) -> CompareSettings:
    """One compare job (a group of :func:`retflow.report.targets.compare_groups`; ``fold``: its
    cross-validation fold or tag, None / "" without folds -- the path carries it, not the record)."""
    from retflow.report import targets

    tag = rfc.fraction_tag(fraction)
    models = targets.compare_models(config, task, protocol, tag, seed, fold)
    if len(models) < 2:
        raise ConfigError(f"compare {task}/{protocol}/frac{tag}/seed{seed}: not a comparison of this config "
                          f"(it needs two or more models of a non-segmentation task; models: {models})")
    spec = config["tasks"][task]
    return CompareSettings.from_dict({
        "task": task, "task_type": spec["type"], "classes": _classes(spec), "protocol": protocol,
        "fraction": float(fraction), "seed": int(seed), "models": models, "evaluate": config["evaluate"]}, "compare")


def same_eyes(config: dict, task: str, protocol: str, model: str, fraction, seed) -> SameEyesSettings:
    """One same-eyes comparison (:func:`retflow.fusion_config.same_eyes_jobs`)."""
    from retflow import fusion_config

    job = fusion_config.SameEyes(task, protocol, model, float(fraction), int(seed))
    if job not in fusion_config.same_eyes_jobs(config):
        raise ConfigError(f"same_eyes {task}/{protocol}/{model}/frac{rfc.fraction_tag(fraction)}/seed{seed}: not a "
                          f"comparison of this config (tasks.{task}.fusion.compare_with and the runs they share)")
    spec = config["tasks"][task]
    return SameEyesSettings.from_dict({
        "task": task, "task_type": spec["type"], "classes": _classes(spec), "protocol": protocol, "model": model,
        "fraction": float(fraction), "seed": int(seed), "tasks": fusion_config.compare_tasks(config, task),
        "evaluate": config["evaluate"]}, "same_eyes")


def saliency(config: dict, task: str) -> SaliencySettings:
    """The saliency job of ``task`` (:func:`retflow.report.targets.saliency_run` picks the run)."""
    from retflow.report import targets

    run = targets.saliency_run(config, task)
    if run is None:
        raise ConfigError(f"tasks.{task}: no saliency maps for a {config['tasks'][task]['type']} task "
                          f"(only {', '.join(targets.SALIENCY_TYPES)})")
    spec = config["tasks"][task]
    return SaliencySettings.from_dict({
        "task": task, "dataset": spec["dataset"], "label": spec["label"], "protocol": run.protocol,
        "model": run.model, "fraction": float(run.fraction), "seed": int(run.seed),
        "device": rfc.stage_device(config, "evaluate")},
        "saliency")


def _gpus(config: dict, kind: str) -> float:
    res = rfc.resources(config, kind)
    nodes = res["nodes"] if "nodes" in res else 1  # resources.<kind>.nodes: absent = one node
    return float(res["gpu"] * nodes)


def _shown(config: dict, key: str) -> dict:
    """A config section as the report shows it; ``pretrain`` without the sections of methods that do not run."""
    if key != "pretrain":
        return config[key]
    methods = config["pretrain"]["methods"]
    return {k: v for k, v in config["pretrain"].items() if k not in METHOD_SETTINGS or k in methods}


def report(config: dict) -> ReportSettings:
    """The report job's settings: what the report reads of the validated ``config``."""
    from retflow.synth import settings as synth_cfg

    datasets = [{"name": n, "modality": d["modality"], "role": d["role"], "source": d["source"],
                 "path": d.get("path"), "phantom": d.get("phantom")}  # optional keys without a default
                for n, d in config["datasets"].items()]
    tasks = []
    for name, spec in config["tasks"].items():
        protocols, fractions, seeds = rfc.task_fanout(config, name)
        external = [{"dataset": e["dataset"], "classes": [str(c) for c in e.get("classes") or ()],
                     "map": {str(k): str(v) for k, v in e["map"].items()} if e.get("map") else None}
                    for e in rfc.external_sets(spec)]
        label = spec.get("label")  # segmentation tasks have none
        tasks.append({"name": name, "dataset": spec["dataset"], "type": spec["type"], "classes": _classes(spec),
                      "label": tuple(label) if isinstance(label, list) else label, "external": external,
                      "models": rfc.task_models(config, name), "protocols": protocols,
                      "fractions": [float(f) for f in fractions], "seeds": [int(s) for s in seeds],
                      "reference": spec.get("reference")})  # optional, no default
    models = [{"name": n, "init": m["init"], "method": m.get("method"), "path": m.get("path"),
               "pretrain_run": rfc.pretrain_run(config, m) if m["init"] == "pretrained" else None,
               "input": m["input"]}
              for n, m in config["models"].items()]
    shown = ["vit", "pretrain", *dict.fromkeys(p for t in tasks for p in t["protocols"])]  # the protocols that run
    return ReportSettings.from_dict({
        "datasets": datasets, "tasks": tasks, "models": models,
        "protocols": config["protocols"], "fractions": [float(f) for f in config["fractions"]],
        "seeds": config["seeds"], "evaluate": config["evaluate"], "gpus": {k: _gpus(config, k) for k in ("pretrain", "finetune")},
        "synth_modalities": synth_cfg.modalities(config) if config["synth"]["enabled"] else [],
        "sections": [{"name": k, "values": _shown(config, k)} for k in shown],
        "chance_margin": float(config["report"]["chance_margin"]),
    }, "report")
