"""Configuration helpers shared by the Snakefile and the entry points.

The JSON schema (``config/schema.yaml``) checks types, names and defaults; this module checks
what a schema cannot: cross-references between sections (a task naming an unknown dataset, a
model naming a pretraining method that is not run, ...) and paths that must exist on disk.
It also expands the config into the DAG's fan-out (task x model x fraction x [fold x] seed).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from retflow.layout import fraction_tag  # noqa: F401 - re-exported
from retflow.settings.load import ConfigError  # noqa: F401 - one ConfigError, re-exported

#: phantom kinds that write OCT volumes (volumes/*.nii.gz, id column ``volume``; retflow.phantoms.generate)
VOLUME_KINDS = ("oct_volume", "oct_offcentre")


def dataset_path(config: dict, name: str, key: str = "path") -> Path | None:
    """Absolute path of a dataset's ``path``/``images`` entry, resolved against ``data_root``."""
    value = config["datasets"][name].get(key)
    if value is None:
        return None
    path = Path(value)
    if not path.is_absolute():
        path = Path(config["data_root"]) / path
    return path


def semantic_errors(config: dict) -> list[str]:
    """Every cross-reference problem in a schema-valid config, each naming its key."""
    errors: list[str] = []
    datasets = config["datasets"]
    for name, ds in datasets.items():
        if ds["source"] == "phantom" and "phantom" not in ds:
            errors.append(f"datasets.{name}: source 'phantom' needs a 'phantom:' block")
        if ds["source"] != "phantom" and "path" not in ds:
            errors.append(f"datasets.{name}: source '{ds['source']}' needs 'path'")
        if "folds" in ds and ds["role"] != "labelled":  # optional override: no default
            errors.append(f"datasets.{name}.folds: only labelled datasets are cross-validated "
                          f"(role '{ds['role']}'); remove the key")
        phantom = ds.get("phantom") or {}  # phantom datasets only
        if phantom.get("kind") == "oct_offcentre" and phantom["n_slices"] < 3:
            errors.append(f"datasets.{name}.phantom.n_slices: phantom kind oct_offcentre needs >= 3 B-scans per "
                          f"volume (a central one and off-centre ones), got {phantom['n_slices']}; set it to 3 or more")
        if ds.get("label_columns") == []:  # an explicit empty list, never "every column"
            from retflow.data.ingest import empty_label_columns

            errors.append(empty_label_columns(name))
    pools = config["pretrain"]["pools"]
    for modality, names in pools.items():
        for name in names:
            if name not in datasets:
                errors.append(f"pretrain.pools.{modality}: unknown dataset '{name}'")
            elif datasets[name]["modality"] != modality:
                errors.append(
                    f"pretrain.pools.{modality}: dataset '{name}' has modality "
                    f"'{datasets[name]['modality']}'"
                )
    methods = set(config["pretrain"]["methods"])
    for name, model in config["models"].items():
        if model["init"] == "pretrained" and model.get("method") not in methods:
            errors.append(
                f"models.{name}: method '{model.get('method')}' is not in pretrain.methods "
                f"{sorted(methods)}"
            )
        if model["init"] == "file" and not model.get("path"):
            errors.append(f"models.{name}: init 'file' needs 'path'")
        data = model_data(config, model) if model["init"] == "pretrained" else "real"
        if data != "real" and not (config.get("synth") or {}).get("enabled"):
            errors.append(f"models.{name}: data '{data}' needs synthetic images (synth.enabled: true)")
        if model.get("data") and model["init"] != "pretrained":
            errors.append(f"models.{name}: 'data' applies to init 'pretrained' only")
    teacher = config["pretrain"]["token_recon"].get("teacher_checkpoint")  # no default: optional
    if "token_recon" in methods and not teacher:
        errors.append("pretrain.token_recon.teacher_checkpoint: token reconstruction needs a teacher "
                      "(a method in pretrain.methods, e.g. mae, or a local checkpoint file)")
    if teacher == "token_recon":
        errors.append("pretrain.token_recon.teacher_checkpoint: the teacher cannot be token_recon itself")
    for name, task in config["tasks"].items():
        for model in task.get("models") or []:
            if model not in config["models"]:
                errors.append(f"tasks.{name}.models: unknown model '{model}'")
        ds = task["dataset"]
        if ds not in datasets:
            errors.append(f"tasks.{name}.dataset: unknown dataset '{ds}'")
            continue
        if datasets[ds]["role"] != "labelled":
            errors.append(f"tasks.{name}.dataset: '{ds}' has role '{datasets[ds]['role']}', not 'labelled'")
        modality = datasets[ds]["modality"]
        if any(m["init"] == "pretrained" for m in config["models"].values()) and not pools.get(modality):
            errors.append(f"tasks.{name}: no pretraining pool for modality '{modality}' (pretrain.pools.{modality})")
        for entry in external_sets(task):
            ext = entry["dataset"]
            if ext not in datasets:
                errors.append(f"tasks.{name}.external: unknown dataset '{ext}'")
            elif datasets[ext]["modality"] != modality:
                errors.append(f"tasks.{name}.external: '{ext}' is {datasets[ext]['modality']}, task is {modality}")
            if entry.get("map") is not None:
                # the external map takes the MODEL's classes to the external set's own 'classes'; a
                # raw-value -> class mapping of the external dataset belongs in its label_map
                targets = [str(c) for c in entry.get("classes", [])]
                model = [str(c) for c in task.get("classes", [])]
                pairs = [(str(k), str(v)) for k, v in entry["map"].items()]
                shape = ", ".join(f'"{k}": "{v}"' for k, v in pairs[:4]) + (", ..." if len(pairs) > 4 else "")
                label_map = (f"datasets.{ext}.label_map: {{{entry.get('label', task.get('label'))}: {{{shape}}}}} "
                             f"(and drop this 'map')")
                if pairs and all(v in model for _, v in pairs):  # its values are the model's classes
                    hint = (f"; this one maps raw values to the task's classes {model}, which belongs in "
                            f"{label_map}")
                else:
                    hint = (f"; to map the dataset's raw values to the task's classes, use {label_map}")
                if not targets:
                    errors.append(f"tasks.{name}.external.{ext}: a 'map' (model class -> external class) needs "
                                  f"the external 'classes'{hint}")
                    continue
                unmapped = [c for c in model if c not in {k for k, _ in pairs}]
                bad = [v for _, v in pairs if v not in targets]
                if unmapped:
                    errors.append(f"tasks.{name}.external.{ext}.map: no entry for model classes {unmapped}{hint}")
                if bad:
                    errors.append(f"tasks.{name}.external.{ext}.map: values {bad} not in its classes {targets}")
        if task["type"] == "segmentation":  # masks instead of a label column
            errors += segmentation_errors(config, name)
            continue
        kind = task["type"]
        labels = task["label"] if isinstance(task["label"], list) else [task["label"]]
        if (kind == "multilabel") != isinstance(task["label"], list):
            errors.append(f"tasks.{name}.label: multilabel tasks take a list of 0/1 columns, other types one column")
        if kind in ("binary", "multiclass", "ordinal") and not task.get("classes"):
            errors.append(f"tasks.{name}.classes: required for {kind} tasks")
        if kind == "binary" and len(task.get("classes", [])) != 2:
            errors.append(f"tasks.{name}.classes: a binary task has exactly 2 classes")
        if kind == "multilabel" and task.get("classes") and len(task["classes"]) != len(labels):
            errors.append(f"tasks.{name}.classes: one name per label column ({len(labels)})")
        if len(set(map(str, task.get("classes", [])))) != len(task.get("classes", [])):
            errors.append(f"tasks.{name}.classes: duplicate class names")
    from retflow.fusion_config import errors as fusion_errors
    from retflow.settings.checks import pretrain_errors
    from retflow.volume_config import errors as volume_errors

    errors += fusion_errors(config)
    errors += pretrain_errors(config)
    errors += volume_errors(config)
    splits = config["splits"]
    total = sum(splits[k] for k in ("train", "val", "test"))
    if abs(total - 1.0) > 1e-6:
        errors.append(f"splits: train + val + test must be 1, got {total:g}")
    return errors


def missing_paths(config: dict) -> list[str]:
    """Dataset and weight files named in the config that do not exist, as ``key: path`` lines."""
    missing = []
    for name, ds in config["datasets"].items():
        if ds["source"] == "phantom":
            continue
        for key in ("path", "images"):
            path = dataset_path(config, name, key)
            if path is not None and not path.exists():
                missing.append(f"datasets.{name}.{key}: {path}")
    return missing + [f"{key}: {path}" for key, path in weights_files(config) if not Path(path).exists()]


def weights_files(config: dict) -> list[tuple[str, str]]:
    """``(key, path)`` of every local weights file / export folder the config names."""
    weights = [("pretrain.init", config["pretrain"]["init"])]
    teacher = config["pretrain"]["token_recon"].get("teacher_checkpoint")  # no default: optional
    methods = config["pretrain"]["methods"]
    if "token_recon" in methods and teacher and teacher not in methods:  # a method name: its run in the DAG
        weights += [(f"pretrain.token_recon.teacher_checkpoint{'.' + k if k else ''}", p)
                    for k, p in (teacher.items() if isinstance(teacher, dict) else [("", teacher)])]
    for name, model in config["models"].items():
        if model["init"] == "file":
            paths = model.get("path") or {}
            weights += [(f"models.{name}.path{'.' + k if k else ''}", p)
                        for k, p in (paths.items() if isinstance(paths, dict) else [("", paths)])]
    return [(key, str(path)) for key, path in weights if path]


def weights_errors(config: dict) -> list[str]:
    """A weights path that exists but is a folder without a `retflow export` in it (cheap: nothing is read)."""
    from retflow.checkpoint_file import export_folder_problem

    errors = []
    for key, path in weights_files(config):
        problem = export_folder_problem(Path(path)) if Path(path).is_dir() else None
        if problem:
            errors.append(f"{key}: {path} ({problem})")
    return errors


def model_weights_file(config: dict, model: str, modality: str) -> str | None:
    """The local weights file a ``init: file`` model starts from for ``modality``."""
    path = config["models"][model].get("path")
    if isinstance(path, dict):
        if modality not in path:
            raise ConfigError(f"models.{model}.path has no entry for modality '{modality}'")
        return path[modality]
    return path


def task_modality(config: dict, task: str) -> str:
    return config["datasets"][config["tasks"][task]["dataset"]]["modality"]


def task_modalities(config: dict, task: str) -> list[str]:
    """The modalities a task's models take: its dataset's, or both for a fusion task (retflow.fusion_config)."""
    from retflow.fusion_config import MODALITIES, is_fusion

    return list(MODALITIES) if is_fusion(config, task) else [task_modality(config, task)]


@dataclass(frozen=True)
class Run:
    """One downstream training run: the unit a user reruns (its folder: ``retflow.layout.Layout.run``).
    ``fold``: the cross-validation fold (``splits.folds`` >= 2), None for the fixed split."""

    protocol: str
    task: str
    model: str
    fraction: float
    seed: int
    fold: int | None = None


def task_classes(task: dict) -> list[str]:
    """Output names of a task: its classes; multilabel default: the label columns; regression: the column."""
    label = task.get("label")  # segmentation tasks have none
    if task["type"] == "regression":
        return [label]
    if task["type"] == "multilabel" and not task.get("classes"):
        return list(label)
    return [str(c) for c in task["classes"]]


def task_models(config: dict, task: str) -> list[str]:
    """The models a task compares: its own ``models`` list, else every model."""
    return config["tasks"][task].get("models") or list(config["models"])


def protocols() -> tuple[str, ...]:
    """Every downstream protocol the schema knows (``definitions.protocol``)."""
    from retflow.settings.load import schema

    return tuple(schema()["definitions"]["protocol"]["enum"])


#: the protocols rule finetune trains (every protocol but fusion, whose runs rule fusion trains), as a regex
FINETUNE_PROTOCOLS = "|".join(p for p in protocols() if p != "fusion")


def task_fanout(config: dict, task: str) -> tuple[list, list, list]:
    """(protocols, fractions, seeds) of a task: its own overrides, else the global lists; a fusion
    task's only protocol is ``fusion`` (retflow.fusion_config)."""
    from retflow.fusion_config import FUSION, is_fusion

    spec = config["tasks"][task]
    protocols = [FUSION] if is_fusion(config, task) else spec.get("protocols") or config["protocols"]
    return (protocols,
            spec.get("fractions") or config["fractions"],
            spec.get("seeds") or config["seeds"])


def dataset_folds(config: dict, dataset: str) -> int:
    """A dataset's number of cross-validation folds: ``datasets.<name>.folds``, else ``splits.folds``
    (1: the fixed split); always 1 for pretraining pools and external sets."""
    ds = config["datasets"][dataset]
    if ds["role"] != "labelled":
        return 1
    return int(ds["folds"] if "folds" in ds else config["splits"]["folds"])  # the override has no default


def task_folds(config: dict, task: str) -> list[int | None]:
    """The folds a task's runs fan out over: ``[None]`` (the fixed split) or ``[0, ..., k-1]``."""
    k = dataset_folds(config, config["tasks"][task]["dataset"])
    return [None] if k < 2 else list(range(k))


def downstream_runs(config: dict, task: str | None = None) -> list[Run]:
    """The fan-out protocol x task x model x fraction x [fold x] seed (optionally for one task)."""
    tasks = [task] if task else list(config["tasks"])
    runs = []
    for t in tasks:
        protocols, fractions, seeds = task_fanout(config, t)
        runs += [Run(p, t, m, f, s, k) for p, m, f, k, s in
                 itertools.product(protocols, task_models(config, t), fractions, task_folds(config, t), seeds)]
    return runs


def external_sets(task: dict) -> list[dict]:
    """A task's external test sets as ``{dataset, label?, classes?, map?}`` dicts."""
    return [{"dataset": e} if isinstance(e, str) else dict(e) for e in task.get("external", [])]


def external_eval(config: dict, task_name: str, dataset: str) -> dict:
    """How predictions on an external set are evaluated: label column, classes, task type, map."""
    task = config["tasks"][task_name]
    ext = next(e for e in external_sets(task) if e["dataset"] == dataset)
    out = {"label": ext.get("label", task["label"]), "classes": [str(c) for c in task.get("classes", [])],
           "type": task["type"], "map": None}
    if ext.get("map"):
        out.update(classes=[str(c) for c in ext["classes"]], map={str(k): str(v) for k, v in ext["map"].items()},
                   type="binary" if len(ext["classes"]) == 2 else "multiclass")
    return out


def model_data(config: dict, model: dict) -> str:
    """A pretrained model's pretraining data schedule (``models.X.data``, else ``pretrain.data``)."""
    return model.get("data") or config["pretrain"]["data"]


def pretrain_run(config: dict, model: dict) -> str:
    """The pretraining run a model starts from: its method, tagged with a non-real data schedule
    (``mae``, ``mae-synthetic_then_real``, ``mae-mixed0.3``) - the ``results/pretrain/<run>/`` folder."""
    data = model_data(config, model)
    if data == "real":
        return model["method"]
    return f"{model['method']}-{data.replace('(', '').replace(')', '')}"


def parse_pretrain_run(run: str) -> tuple[str, str]:
    """Inverse of :func:`pretrain_run`: ``(method, data)``."""
    method, _, tag = run.partition("-")
    if not tag:
        return method, "real"
    if tag.startswith("mixed"):
        return method, f"mixed({tag[len('mixed'):]})"
    return method, tag


def pretrain_pool(config: dict, run: str, modality: str) -> list[str]:
    """The datasets of a pretraining run's real pool: ``pretrain.pools.<modality>``; for mae3d its
    volume datasets (:func:`retflow.volume_config.pool`); none for a run on synthetic images only."""
    method, data = parse_pretrain_run(run)
    if data == "synthetic":
        return []
    if method == "mae3d":
        from retflow.volume_config import pool

        return pool(config)
    return list(config["pretrain"]["pools"][modality])


def pretrain_runs(config: dict) -> list[tuple[str, str]]:
    """(run, modality) pairs that some model needs (see :func:`pretrain_run`)."""
    needed = set()
    for name, model in config["models"].items():
        if model["init"] != "pretrained":
            continue
        for task in config["tasks"]:
            if name in task_models(config, task):
                needed |= {(pretrain_run(config, model), m) for m in task_modalities(config, task)}
    # a token-reconstruction teacher named by method is pretrained in the DAG too
    teacher = config["pretrain"]["token_recon"].get("teacher_checkpoint")
    for run, modality in list(needed):
        if parse_pretrain_run(run)[0] == "token_recon" and teacher in config["pretrain"]["methods"]:
            needed.add((teacher, modality))
    return sorted(needed)


def resources(config: dict, kind: str) -> dict:
    """Resources for a rule kind: ``resources.default`` (schema defaults) overlaid with the kind's entry."""
    return {**config["resources"]["default"], **(config["resources"].get(kind) or {})}


def stage_device(config: dict, kind: str) -> str:
    """The device a stage's jobs run on: the config's ``device``, except ``cpu`` where the config
    forces ``cuda`` but the stage asks for no GPU (``resources.<kind>.gpu: 0``; such a job gets none
    under SLURM, and runs in the CPU image)."""
    if config["device"] == "cuda" and not resources(config, kind)["gpu"]:
        return "cpu"
    return config["device"]


def vit_settings(config: dict, modality: str) -> dict:
    """The ``vit`` section for one modality (``in_chans`` may be given per modality)."""
    vit = dict(config["vit"])
    chans = vit["in_chans"]
    vit["in_chans"] = int(chans[modality] if isinstance(chans, dict) else chans)
    return vit


def normalize_settings(config: dict, modality: str) -> dict:
    """Model-input intensity normalisation (mean/std per channel) of a modality."""
    return dict(config["preprocess"][modality]["normalize"])


def segmentation_errors(config: dict, name: str) -> list[str]:
    """Problems of segmentation task ``name`` (its dataset must carry masks; internal test only;
    the finetune protocol only)."""
    task = config["tasks"][name]
    ds = config["datasets"][task["dataset"]]
    errors = []
    phantom = ds.get("phantom") or {}
    has_masks = bool(ds.get("mask_column")) or (ds["source"] == "phantom" and phantom.get("masks"))
    if not has_masks:
        errors.append(f"tasks.{name}: segmentation needs masks: datasets.{task['dataset']}.mask_column "
                      f"(or phantom.masks: true)")
    if ds["source"] in ("volumes", "imagefolder") or phantom.get("kind") in VOLUME_KINDS:
        errors.append(f"tasks.{name}: segmentation masks are read for 2-D csv/phantom datasets only "
                      f"('{task['dataset']}' is {phantom.get('kind') or ds['source']})")
    if task.get("external"):
        errors.append(f"tasks.{name}.external: not supported for segmentation tasks")
    if any(p != "finetune" for p in task.get("protocols") or []):
        errors.append(f"tasks.{name}.protocols: segmentation tasks run the 'finetune' protocol only")
    return errors
