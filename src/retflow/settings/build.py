"""Build each stage's settings (:mod:`retflow.settings.stages`) from a validated config.

The rules call these (``rules/common.smk``) and hand the result to the entry points as JSON; a
library user calls them on ``retflow.settings.load_config(path)`` and gets the same recipe::

    config = load_config("config.yaml")
    s = build.finetune(config, "finetune", "glaucoma", 1.0, 0, model="scratch")   # as the workflow

A task's ``tasks.<name>.recipe.<protocol>`` and then a model's ``models.<name>.recipe.<protocol>``
override the protocol section's keys (applied here, once, so the rules and a library user get the
same recipe).
"""

from __future__ import annotations

import dataclasses

from retflow import config as rfc
from retflow.layout import Layout
from retflow.settings import stages as S


def _pick(record: type[S.Frozen], *sources: dict, **fixed) -> dict:
    """The record's fields from ``sources`` (later sources win) plus ``fixed`` values."""
    out = {}
    for f in dataclasses.fields(record):
        for src in sources:
            if f.name in src:
                out[f.name] = src[f.name]
    out.update(fixed)
    return out


def vit(config: dict, modality: str) -> S.ViTSettings:
    return S.ViTSettings.from_dict(rfc.vit_settings(config, modality), "vit")


def normalize(config: dict, modality: str) -> S.NormalizeSettings:
    return S.NormalizeSettings.from_dict(config["preprocess"][modality]["normalize"],
                                         f"preprocess.{modality}.normalize")


def task(config: dict, name: str) -> S.TaskSettings:
    spec = config["tasks"][name]
    label = spec.get("label")  # segmentation tasks have none (the schema requires it for the others)
    return S.TaskSettings(name=name, type=spec["type"], label=tuple(label) if isinstance(label, list) else label,
                          classes=tuple(rfc.task_classes(spec)))


def evaluate(config: dict) -> S.EvaluateSettings:
    return S.EvaluateSettings.from_dict(config["evaluate"], "evaluate")


def model_recipe(config: dict, model: str | None, protocol: str) -> dict:
    """The keys ``models.<model>.recipe.<protocol>`` overrides (none without a model)."""
    if model is None:
        return {}
    return config["models"][model]["recipe"].get(protocol) or {}  # only the keys this model overrides


def task_recipe(config: dict, task_name: str, protocol: str) -> dict:
    """The keys ``tasks.<task>.recipe.<protocol>`` overrides, for every model of the task."""
    return config["tasks"][task_name]["recipe"].get(protocol) or {}  # only the keys this task overrides


def finetune(config: dict, protocol: str, task_name: str, fraction: float, seed: int,
             model: str | None = None) -> S.FinetuneSettings:
    """One fine-tune / probe run: the protocol's section (with the task's and then ``model``'s recipe
    for it applied) + the task, its modality's ViT, the run. Without ``model``: no model recipe."""
    if config["tasks"][task_name]["type"] == "segmentation":
        raise rfc.ConfigError(f"task '{task_name}' is a segmentation task: its runs are built by "
                              f"retflow.settings.build.segment (rule segment), not finetune")
    modality = rfc.task_modality(config, task_name)
    data = _pick(S.FinetuneSettings, config[protocol], {"normalize": normalize(config, modality)},
                 task_recipe(config, task_name, protocol), model_recipe(config, model, protocol),
                 protocol=protocol, task=task(config, task_name), vit=vit(config, modality),
                 fraction=float(fraction), seed=int(seed), device=config["device"])
    return S.FinetuneSettings.from_dict(data, protocol)


def segment(config: dict, task_name: str, model: str, fraction: float, seed: int,
            protocol: str = "finetune") -> S.SegmentSettings:
    """One segmentation run: the ``segment`` section (with the task's and then ``model``'s recipe for
    it applied) + the task, its modality's ViT, the run."""
    modality = rfc.task_modality(config, task_name)
    data = _pick(S.SegmentSettings, config["segment"], {"normalize": normalize(config, modality)},
                 task_recipe(config, task_name, "segment"), model_recipe(config, model, "segment"),
                 protocol=protocol, model=model, task=task(config, task_name), vit=vit(config, modality),
                 fraction=float(fraction), seed=int(seed), device=config["device"], evaluate=evaluate(config))
    return S.SegmentSettings.from_dict(data, "segment")


def teacher_checkpoint(config: dict, modality: str, layout: Layout) -> str:
    """token_recon's frozen teacher: the DAG's own run of a method, or a local file (one, or per modality)."""
    teacher = config["pretrain"]["token_recon"]["teacher_checkpoint"]
    if teacher in config["pretrain"]["methods"]:
        return layout.pretrain_checkpoint(teacher, modality)
    return teacher if isinstance(teacher, str) else teacher[modality]


def pretrain(config: dict, run: str, modality: str, layout: Layout | None = None) -> S.PretrainSettings:
    """One pretraining run (``method[-data]``, see :func:`retflow.config.pretrain_run`) of one modality."""
    layout = layout or Layout(config["results"])
    p = config["pretrain"]
    method, data = rfc.parse_pretrain_run(run)
    recipe = p["recipes"].get(method) or {}  # only the keys this method overrides
    sections = {m: None for m in S.METHOD_SETTINGS}
    if method in S.METHOD_SETTINGS:
        section = dict(p[method])
        if method == "token_recon":
            section["teacher_checkpoint"] = teacher_checkpoint(config, modality, layout)
        sections[method] = S.METHOD_SETTINGS[method].from_dict(section, f"pretrain.{method}")
    fields = _pick(S.PretrainSettings, p, recipe, method=method, data=data, modality=modality,
                   mask_ratio=p["mask_ratio"][modality], vit=vit(config, modality),
                   normalize=normalize(config, modality), seed=config["seeds"][0], device=config["device"],
                   **sections)
    return S.PretrainSettings.from_dict(fields, f"pretrain ({run}, {modality})")
