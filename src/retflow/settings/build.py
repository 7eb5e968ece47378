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
from retflow.settings.checks import VOLUME, VOLUME_METHOD, volume_recipe_errors


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


def vit3d(config: dict) -> S.ViT3DSettings:
    return S.ViT3DSettings.from_dict(config["vit3d"], "vit3d")


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


def model_pool(config: dict, model: str | None) -> str:
    """How ``model``'s classifier pools the encoder's tokens (``models.<model>.pool``); without a
    model, the schema's default for it."""
    if model is None:
        from retflow.settings.load import section_defaults

        return section_defaults("models", {"_": {"init": "random"}})["_"]["pool"]
    return config["models"][model]["pool"]


def model_input(config: dict, model: str | None) -> str:
    """What ``model`` takes (``models.<model>.input``: image | volume); without a model, the schema's default."""
    if model is None:
        from retflow.settings.load import section_defaults

        return section_defaults("models", {"_": {"init": "random"}})["_"]["input"]
    return config["models"][model]["input"]


def lora(protocol: str, *sources: dict) -> S.LoraSettings | None:
    """Protocol ``lora``'s adapters from its section and recipes (later sources win); None for the others."""
    if protocol != "lora":
        return None
    return S.LoraSettings.from_dict(_pick(S.LoraSettings, *sources), "lora")


def fold(config: dict, task_name: str, k) -> S.FoldSettings | None:
    """Fold ``k`` of a task's cross-validation (:func:`retflow.config.task_folds`); None (or ``""``,
    a run without folds) gives None. A fold outside the task's folds is a ConfigError."""
    from retflow.layout import parse_fold

    k = parse_fold(k)
    folds = rfc.task_folds(config, task_name)
    if k is None and folds == [None]:
        return None
    if k not in folds:
        raise rfc.ConfigError(f"task '{task_name}': fold {k} is not one of its folds {folds} "
                              f"(splits.folds / datasets.<name>.folds)")
    splits = config["splits"]
    return S.FoldSettings(fold=int(k), folds=len(folds), seed=int(splits["seed"]),
                          val_share=float(splits["val"] / max(1e-9, splits["train"] + splits["val"])))


def finetune(config: dict, protocol: str, task_name: str, fraction: float, seed: int,
             model: str | None = None, fold_k=None) -> S.FinetuneSettings:
    """One fine-tune / probe run: the protocol's section (with the task's and then ``model``'s recipe
    for it applied) + the task, its modality's ViT, the run (``fold_k``: its cross-validation fold,
    None for the fixed split). Without ``model``: no model recipe."""
    if config["tasks"][task_name]["type"] == "segmentation":
        raise rfc.ConfigError(f"task '{task_name}' is a segmentation task: its runs are built by "
                              f"retflow.settings.build.segment (rule segment), not finetune")
    modality = rfc.task_modality(config, task_name)
    kind = model_input(config, model)
    volume = kind == VOLUME
    data = _pick(S.FinetuneSettings, config[protocol], {"normalize": normalize(config, modality)},
                 task_recipe(config, task_name, protocol), model_recipe(config, model, protocol),
                 protocol=protocol, task=task(config, task_name), vit=None if volume else vit(config, modality),
                 fraction=float(fraction), seed=int(seed), device=config["device"], pool=model_pool(config, model),
                 fold=fold(config, task_name, fold_k), input=kind, vit3d=vit3d(config) if volume else None,
                 lora=lora(protocol, config[protocol], task_recipe(config, task_name, protocol),
                           model_recipe(config, model, protocol)))
    if volume:
        problems = volume_recipe_errors(data, protocol, f"models.{model} on task {task_name}")
        if problems:
            raise rfc.ConfigError(problems)
    return S.FinetuneSettings.from_dict(data, protocol)


def segment(config: dict, task_name: str, model: str, fraction: float, seed: int,
            protocol: str = "finetune", fold_k=None) -> S.SegmentSettings:
    """One segmentation run: the ``segment`` section (with the task's and then ``model``'s recipe for
    it applied) + the task, its modality's ViT, the run."""
    modality = rfc.task_modality(config, task_name)
    data = _pick(S.SegmentSettings, config["segment"], {"normalize": normalize(config, modality)},
                 task_recipe(config, task_name, "segment"), model_recipe(config, model, "segment"),
                 protocol=protocol, model=model, task=task(config, task_name), vit=vit(config, modality),
                 fraction=float(fraction), seed=int(seed), device=config["device"], evaluate=evaluate(config),
                 fold=fold(config, task_name, fold_k))
    return S.SegmentSettings.from_dict(data, "segment")


def _fusion_block(config: dict, task_name: str) -> dict:
    block = config["tasks"][task_name].get("fusion")  # optional: only fusion tasks have one
    if block is None:
        raise rfc.ConfigError(f"task '{task_name}' has no 'fusion' block: it is not a fusion task "
                              f"(add tasks.{task_name}.fusion: {{cfp: <dataset>, oct: <dataset>}})")
    return block


def pairing(config: dict, task_name: str) -> S.PairingSettings:
    """Pairing the two stores of fusion task ``task_name`` (one job per task, every run of it reads the pairs)."""
    block = _fusion_block(config, task_name)
    label_from = config["datasets"][config["tasks"][task_name]["dataset"]]["modality"]
    return S.PairingSettings(task=task(config, task_name), cfp=block["cfp"], oct=block["oct"], label_from=label_from,
                             visit=block["visit"], splits=dict(config["splits"]))


def fusion(config: dict, task_name: str, model: str | None, fraction: float, seed: int,
           protocol: str = "fusion") -> S.FusionSettings:
    """One late-fusion run: the ``fusion`` section (with the task's and then ``model``'s ``recipe.fusion``
    applied) + the task's ``fusion`` block (each modality's dataset, ViT, normalisation) + the run."""
    block = _fusion_block(config, task_name)
    own = block["normalize"]  # only the modalities this task normalises its own way
    inputs = {m: S.FusionInput(dataset=block[m], vit=vit(config, m),
                               normalize=S.NormalizeSettings.from_dict(own[m], f"tasks.{task_name}.fusion.normalize.{m}")
                               if m in own else normalize(config, m))
              for m in ("cfp", "oct")}
    data = _pick(S.FusionSettings, config["fusion"], task_recipe(config, task_name, "fusion"),
                 model_recipe(config, model, "fusion"), visit=block["visit"], encoders=block["encoders"],
                 protocol=protocol, task=task(config, task_name), pool=model_pool(config, model),
                 fraction=float(fraction), seed=int(seed), device=config["device"], **inputs)
    return S.FusionSettings.from_dict(data, "fusion")


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
    # mae3d: the 3-D ViT on whole volumes, from random weights (pretrain.init is a 2-D checkpoint)
    vits = {"vit": None, "vit3d": vit3d(config), "init": None} if method == VOLUME_METHOD else \
        {"vit": vit(config, modality), "vit3d": None}
    fields = _pick(S.PretrainSettings, p, recipe, method=method, data=data, modality=modality,
                   mask_ratio=p["mask_ratio"][modality], normalize=normalize(config, modality),
                   seed=config["seeds"][0], device=config["device"], **vits, **sections)
    return S.PretrainSettings.from_dict(fields, f"pretrain ({run}, {modality})")
