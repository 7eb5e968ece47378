"""What 3-D (volume) models add to the config: which models and datasets they are, their pool, their checks.

A model with ``models.<name>.input: volume`` is a 3-D ViT (``vit3d``) that reads a volume dataset's
stored whole volumes (``preprocess.oct.volume``; :mod:`retflow.data.volume_store`) and predicts one
row per volume, under the ``image_id`` of the volume's first B-scan row, so that with
``preprocess.oct.bscans: 1`` its predictions pair with a 2-D model's on the same eyes. It starts
from random weights (the 3-D scratch baseline), from the DAG's ``mae3d`` run, which pretrains on
the volume datasets of ``pretrain.pools.oct`` (:func:`pool`), or from an mae3d ``checkpoint.pth`` of
another run (``init: file``; the pre-flight weights check reads it against ``vit3d``). Volume models run the protocols
finetune, lora, probe_adamw, probe_lars and probe_logreg, and predict external volume sets; not
segmentation or fusion.

:func:`errors` are the startup checks (one line each, naming the key and the fix), run by
:func:`retflow.config.semantic_errors`; the other functions are pure functions of the validated config.
"""

from __future__ import annotations

from retflow.settings.checks import VOLUME, VOLUME_METHOD, vit3d_section_errors, volume_recipe_errors

_VOLUME_SOURCES = "source volumes, or phantom kind oct_volume / oct_offcentre"


def is_volume_model(config: dict, model: str) -> bool:
    return config["models"][model]["input"] == VOLUME


def is_volume_dataset(config: dict, name: str) -> bool:
    """Whether dataset ``name`` holds OCT volumes (:func:`retflow.data.ingest.is_volume_dataset`)."""
    from retflow.data.ingest import is_volume_dataset as volume_spec

    return volume_spec(config["datasets"][name])


def pool(config: dict) -> list[str]:
    """The datasets mae3d pretrains on: the volume datasets of ``pretrain.pools.oct``, in order."""
    names = config["pretrain"]["pools"].get("oct") or []  # a modality without a pool has no key
    return [n for n in names if n in config["datasets"] and is_volume_dataset(config, n)]


def volume_tasks(config: dict) -> dict[str, list[str]]:
    """``{task: its volume models}`` for every task that lists (or, by default, takes) a volume model."""
    from retflow import config as rfc

    out = {}
    for task in config["tasks"]:
        models = [m for m in rfc.task_models(config, task) if m in config["models"] and is_volume_model(config, m)]
        if models:
            out[task] = models
    return out


def _models_errors(config: dict) -> list[str]:
    errors = []
    for name, model in config["models"].items():
        method = model.get("method")  # only init: pretrained models name one
        if model["input"] == VOLUME and model["init"] == "pretrained" and method != VOLUME_METHOD:
            errors.append(f"models.{name}: input 'volume' needs method 'mae3d' (a 3-D ViT), got '{method}'; "
                          f"set method: mae3d or input: image")
        if method == VOLUME_METHOD and model["input"] != VOLUME:
            errors.append(f"models.{name}: method 'mae3d' pretrains a 3-D ViT on whole volumes; set "
                          f"models.{name}.input: volume")
        data = model.get("data") or config["pretrain"]["data"]  # the model's own, else the section's
        if method == VOLUME_METHOD and model["init"] == "pretrained" and data != "real":
            errors.append(f"models.{name}: mae3d pretrains on real volumes only (synthetic images are 2-D), got data "
                          f"'{data}'; set models.{name}.data: real")
    return errors


def _task_errors(config: dict, task: str, models: list[str]) -> list[str]:
    from retflow import config as rfc

    spec, shown = config["tasks"][task], ", ".join(models)
    fix = f"list only 2-D models in tasks.{task}.models"
    if spec.get("fusion") is not None:  # optional block: only fusion tasks have one
        return [f"tasks.{task}: volume model(s) {shown} cannot join a fusion task (it pairs 2-D encoders); {fix}"]
    if spec["type"] == "segmentation":
        return [f"tasks.{task}: volume model(s) {shown} do not segment (segmentation is 2-D); {fix}"]
    errors = []
    ds = spec["dataset"]
    if ds in config["datasets"] and not is_volume_dataset(config, ds):
        errors.append(f"tasks.{task}: volume model(s) {shown} need a volume dataset ({_VOLUME_SOURCES}), "
                      f"'{ds}' is not one; {fix}")
    for ext in rfc.external_sets(spec):  # predicted whole, like the task's own volumes
        name = ext["dataset"]
        if name in config["datasets"] and not is_volume_dataset(config, name):
            errors.append(f"tasks.{task}.external: volume model(s) {shown} predict whole volumes, external set "
                          f"'{name}' holds none ({_VOLUME_SOURCES}); {fix} or move '{name}' to a task without them")
    images = [m for m in rfc.task_models(config, task) if m in config["models"] and not is_volume_model(config, m)]
    bscans = config["preprocess"]["oct"]["bscans"]
    if images and bscans != 1:
        errors.append(f"tasks.{task}: compares 2-D model(s) {', '.join(images)} with volume model(s) {shown} on the "
                      f"same eyes, which needs one B-scan per volume: set preprocess.oct.bscans: 1 (got {bscans})")
    protocols, _, _ = rfc.task_fanout(config, task)
    for protocol in protocols:
        for model in models:
            recipe = {**config[protocol], **(spec["recipe"].get(protocol) or {}),
                      **(config["models"][model]["recipe"].get(protocol) or {})}  # section, task, model
            errors += volume_recipe_errors(recipe, protocol, f"models.{model} on task {task}")
    return errors


def errors(config: dict) -> list[str]:
    """Every problem of the config's volume models and mae3d pretraining (module docstring), one line each."""
    from retflow import config as rfc

    out = _models_errors(config)
    tasks = volume_tasks(config)
    for task, models in tasks.items():
        out += _task_errors(config, task, models)
    methods = config["pretrain"]["methods"]
    if not tasks and VOLUME_METHOD not in methods:
        return out
    out += vit3d_section_errors(config["vit3d"])
    volume = config["preprocess"]["oct"]["volume"]
    if tasks and volume is None:
        used = sorted({m for models in tasks.values() for m in models})
        out.append(f"preprocess.oct.volume: null, but volume model(s) {', '.join(used)} "
                   f"read stored whole volumes; set it to {{depth, height, width}} = vit3d.img_size "
                   f"{list(config['vit3d']['img_size'])}")
    elif volume is not None and list(config["vit3d"]["img_size"]) != [volume[k] for k in ("depth", "height", "width")]:
        dims = [volume[k] for k in ("depth", "height", "width")]
        out.append(f"vit3d.img_size: {list(config['vit3d']['img_size'])} is not preprocess.oct.volume's "
                   f"[depth, height, width] {dims}; a volume model takes the stored volumes as they are: make them equal")
    if any(rfc.parse_pretrain_run(run)[0] == VOLUME_METHOD for run, _ in rfc.pretrain_runs(config)) and not pool(config):
        given = config["pretrain"]["pools"].get("oct") or []
        out.append(f"pretrain.pools.oct: mae3d pretrains on whole volumes, but none of {given} is a volume dataset "
                   f"({_VOLUME_SOURCES}); add one")
    if config["pretrain"]["token_recon"].get("teacher_checkpoint") == VOLUME_METHOD:  # optional key
        out.append("pretrain.token_recon.teacher_checkpoint: mae3d is a 3-D model; token reconstruction needs a 2-D "
                   "teacher (e.g. mae)")
    return out
