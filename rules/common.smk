# Config helpers: all logic lives in retflow.config; this file only wires it into the DAG.
# The config is validated (schema defaults, cross-references, paths, CSV headers) in the
# Snakefile by retflow.settings.startup before this file is read.
import json
from pathlib import Path

from retflow import config as rfc  # noqa: E402
from retflow import fusion_config  # noqa: E402
from retflow.layout import FOLD_WILDCARD, Layout  # noqa: E402
from retflow.settings import build  # noqa: E402
from retflow.settings import report as report_settings  # noqa: E402 (`report`: Snakemake's)
from retflow.train import launch  # noqa: E402
from retflow.data.labels import label_specs  # noqa: E402

RESULTS = config["results"]
LAYOUT = Layout(RESULTS)  # every results path (retflow.layout)
CONTAINERS = config["containers"]
DATASETS = config["datasets"]
TASKS = config["tasks"]
MODELS = config["models"]
# segmentation tasks: one `segment` job writes metrics.json (rules/segment.smk), finetune protocol only
SEGMENTATION_TASKS = [t for t, s in TASKS.items() if s["type"] == "segmentation"]
# {fold}: "fold<k>/" for a cross-validation run, "" for the fixed split (retflow.layout.fold_tag)
RUN_DIR = LAYOUT.run_dir("{protocol}", "{task}", "{model}", "{frac}", "{seed}", "{fold}")
RUN_LOG = "{protocol}/{task}/{model}/frac{frac}/{fold}seed{seed}"
PRETRAIN = rfc.pretrain_runs(config)


def as_json(obj):
    return json.dumps(obj, sort_keys=True)


def res(kind, key):
    return rfc.resources(config, kind)[key]


def dataset_splits(dataset):
    """The splits section a dataset is prepared with: its own number of folds (retflow.config.dataset_folds)."""
    return {**config["splits"], "folds": rfc.dataset_folds(config, dataset)}


def store_dir(dataset):
    return LAYOUT.store(dataset)


def store_manifest(dataset):
    return LAYOUT.manifest(dataset)


def run_metrics(run):
    """All metrics.json files of one downstream run: internal test + each external set."""
    d = LAYOUT.run(run)
    out = [f"{d}/metrics.json"]
    out += [
        f"{LAYOUT.external_dir(d, e['dataset'])}/metrics.json"
        for e in rfc.external_sets(TASKS[run.task])
    ]
    return out


def all_metrics(task=None):
    return [
        m
        for run in rfc.downstream_runs(config, task)
        if run.task not in SEGMENTATION_TASKS or run.protocol == "finetune"
        for m in run_metrics(run)
    ]


def phantom_names():
    return [n for n, d in DATASETS.items() if d["source"] == "phantom"]


def data_priority(wildcards):
    """Pretraining pools first: pretraining (the longest jobs) waits on them, the rest only on the gate."""
    return 20 if DATASETS[wildcards.dataset]["role"] == "pretrain" else 10


def run_priority(wildcards):
    """Runs with external test sets first: their chain to the report is a prediction job longer."""
    return 1 if TASKS[wildcards.task]["external"] else 0


def prepare_inputs(wildcards):
    ds = DATASETS[wildcards.dataset]
    if ds["source"] == "phantom":
        return {"raw": LAYOUT.raw(wildcards.dataset)}
    paths = {}
    for key in ("path", "images"):
        p = rfc.dataset_path(config, wildcards.dataset, key)
        if p is not None and p.exists():
            paths[key] = str(p)
    return paths


def prepare_location(wildcards):
    ds = DATASETS[wildcards.dataset]
    if ds["source"] == "phantom":
        return LAYOUT.raw(wildcards.dataset)
    return str(rfc.dataset_path(config, wildcards.dataset, "path"))


def allowed_labels(wildcards):
    return as_json(label_specs(config, wildcards.dataset))


def leakage_report():
    return LAYOUT.leakage()


def preflight_report():
    """The pre-flight gate's output (rules/data.smk): the input of every expensive rule."""
    return LAYOUT.preflight()


def images_option(wildcards):
    p = rfc.dataset_path(config, wildcards.dataset, "images")
    return f"--images '{p}'" if p is not None else ""


def pretrain_settings(wildcards):
    return build.pretrain(
        config, wildcards.method, wildcards.modality, LAYOUT
    ).to_json()


def pretrain_stores(wildcards):
    """The real pool of a pretraining run (none on synthetic images only; mae3d: the volume datasets)."""
    return [
        store_dir(d)
        for d in rfc.pretrain_pool(config, wildcards.method, wildcards.modality)
    ]


def pretrain_synthetic(wildcards):
    """The synthetic store a run's data schedule needs (rules/synth.smk), else nothing."""
    if rfc.parse_pretrain_run(wildcards.method)[1] == "real":
        return []
    return [synthetic_store(wildcards.modality)]


def pretrain_inputs(wildcards):
    """Manifests of the stores a pretraining run reads, and a token-reconstruction teacher."""
    out = [f"{s}/manifest.parquet" for s in pretrain_stores(wildcards)]
    out += [
        synthetic_store_manifest(wildcards.modality)
        for _ in pretrain_synthetic(wildcards)
    ]
    if rfc.parse_pretrain_run(wildcards.method)[0] == "token_recon":
        own_run = config["pretrain"]["token_recon"]["teacher_checkpoint"]
        # the DAG's own run (a method's name), not a local file
        if own_run in config["pretrain"]["methods"]:
            out.append(teacher_checkpoint(wildcards))
    return out


def teacher_checkpoint(wildcards):
    """token_recon's frozen teacher: the DAG's own run of a method, or a local file."""
    return build.teacher_checkpoint(config, wildcards.modality, LAYOUT)


def pretrain_launch(wildcards, threads, resources):
    """srun (nodes > 1 only) + the launcher that builds torchrun's rendezvous from SLURM's env."""
    return launch.launcher_command(
        rfc.resources(config, "pretrain"), threads, resources.get("gpu")
    )


def init_checkpoint(wildcards):
    model = MODELS[wildcards.model]
    modality = rfc.task_modality(config, wildcards.task)
    if model["init"] == "pretrained":
        return LAYOUT.pretrain_checkpoint(rfc.pretrain_run(config, model), modality)
    if model["init"] == "file":
        path = rfc.model_weights_file(config, wildcards.model, modality)
        return path if Path(path).exists() else []
    return []


def init_option(wildcards):
    model = MODELS[wildcards.model]
    if model["init"] == "random":
        return ""
    if model["init"] == "file":
        return rfc.model_weights_file(
            config, wildcards.model, rfc.task_modality(config, wildcards.task)
        )
    return init_checkpoint(wildcards)


def finetune_settings(wildcards):
    return build.finetune(
        config,
        wildcards.protocol,
        wildcards.task,
        wildcards.frac,
        wildcards.seed,
        model=wildcards.model,
        fold_k=wildcards.fold,
    ).to_json()


def evaluate_settings(wildcards, eval_set):
    """Settings of one evaluate job: the run, its eval set's label scheme, the bootstrap."""
    return report_settings.evaluation(
        config,
        wildcards.protocol,
        wildcards.task,
        wildcards.model,
        wildcards.frac,
        wildcards.seed,
        eval_set,
    ).to_json()


def predict_external_args(wildcards):
    ext = rfc.external_eval(config, wildcards.task, wildcards.external)
    label = ext["label"]
    args = f"--label {label}" if isinstance(label, str) else ""
    if ext["map"]:
        classes = " ".join(ext["classes"])
        args += f" --label-map '{json.dumps(ext['map'])}' --classes {classes}"
    return args


def segment_settings(wildcards):
    """Settings of one segmentation run (retflow.train.segment): the `segment` section + the run."""
    return build.segment(
        config,
        wildcards.task,
        wildcards.model,
        wildcards.frac,
        wildcards.seed,
        wildcards.protocol,
        fold_k=wildcards.fold,
    ).to_json()


def fusion_store(wildcards, modality):
    """The manifest of a fusion task's CFP or OCT store (rules/fusion.smk)."""
    return store_manifest(TASKS[wildcards.task]["fusion"][modality])


def fusion_init(wildcards, modality):
    """The checkpoint a fusion model's CFP or OCT encoder starts from (none: random init)."""
    path = fusion_config.init_checkpoint(config, LAYOUT, wildcards.model, modality)
    return path or []
