# Data stage: phantom generation (demo) and per-dataset preprocessing into a store, the leakage
# check, and the pre-flight gate that every expensive rule waits for.
from retflow.data.pools import pool_splits  # noqa: E402
from retflow.preflight_data import gate_checks, task_names  # noqa: E402
from retflow.preflight_weights import weight_uses  # noqa: E402

# the gate's thresholds: judged by rule preflight, so they are no parameter of prepare_dataset
GATE_KEYS = ("max_quarantine_fraction", "max_unusable_label_fraction")
# which tasks read each label use: it only names them in the gate's messages, so a task added or
# renamed over labels already checked must not rerun the gate (and every job after it)
GATE_TASK_NAMES = as_json(task_names(config))
# every (local weights file, ViT) pair a model will be loaded from: checked before anything expensive
WEIGHT_USES = weight_uses(config)


rule phantom_dataset:
    """Generate one procedural phantom dataset (fundus photos, B-scans or NIfTI volumes)."""
    output:
        directory(LAYOUT.raw("{dataset}")),
    log:
        "logs/data/phantom_{dataset}.log",
    benchmark:
        "benchmarks/data/phantom_{dataset}.tsv"
    wildcard_constraints:
        dataset="|".join(phantom_names()) or "no_phantoms",
    priority: data_priority  # the critical path: pretraining waits on the pools
    threads: res("data", "threads")
    resources:
        mem_mb=res("data", "mem_mb"),
        runtime=res("data", "runtime"),
    params:
        spec=lambda w: DATASETS[w.dataset]["phantom"],
    shell:
        "python workflow_scripts/phantoms.py --kind {params.spec[kind]} --n {params.spec[n]}"
        " --seed {params.spec[seed]} --style {params.spec[style]} --size {params.spec[size]}"
        " --n-slices {params.spec[n_slices]} --labelled {params.spec[labelled]}"
        " --masks {params.spec[masks]}"
        " --out {output} > {log} 2>&1"


rule prepare_dataset:
    """Ingest, preprocess, split by patient, check leakage, quarantine bad inputs, store."""
    input:
        unpack(prepare_inputs),
    output:
        shards=directory(LAYOUT.shards("{dataset}")),
        manifest=LAYOUT.manifest("{dataset}"),
        quarantine=LAYOUT.quarantine("{dataset}"),
        qc=LAYOUT.qc("{dataset}"),
    log:
        "logs/data/prepare_{dataset}.log",
    benchmark:
        "benchmarks/data/prepare_{dataset}.tsv"
    priority: data_priority  # the critical path: pretraining waits on the pools
    threads: res("data", "threads")
    resources:
        mem_mb=res("data", "mem_mb"),
        runtime=res("data", "runtime"),
    params:
        spec=lambda w: as_json(DATASETS[w.dataset]),
        location=prepare_location,
        images=images_option,
        prep=as_json(
            {k: v for k, v in config["preprocess"].items() if k not in GATE_KEYS}
        ),
        splits=lambda w: as_json(dataset_splits(w.dataset)),
        labels=allowed_labels,
        leakage=as_json(config["leakage"]),
        out=lambda w, output: str(Path(output.manifest).parent),
        # a failed job keeps its quarantine.csv and qc.json here (Snakemake deletes its outputs)
        keep=lambda w: f"logs/data/prepare_{w.dataset}.failed",
    shell:
        "python workflow_scripts/prepare_dataset.py --name {wildcards.dataset} --spec {params.spec:q}"
        " --location {params.location:q} {params.images} --preprocess {params.prep:q}"
        " --splits {params.splits:q} --labels {params.labels:q} --leakage {params.leakage:q}"
        " --workers {threads} --out-dir {params.out} --keep-on-failure {params.keep} > {log} 2>&1"


rule leakage_check:
    """Pretraining pools and training splits against every other dataset's test images, and each
    pool member against itself; writes every finding (rule preflight stops on errors).
    """
    input:
        [store_manifest(d) for d in sorted(DATASETS)],
    output:
        leakage_report(),
    log:
        "logs/data/leakage_check.log",
    benchmark:
        "benchmarks/data/leakage_check.tsv"
    priority: 10
    threads: 1
    resources:
        mem_mb=res("data", "mem_mb"),
        runtime=res("data", "runtime"),
    params:
        leakage=as_json(config["leakage"]),
        stores=[store_dir(d) for d in sorted(DATASETS)],  # config key order must not rerun it
        pools=as_json(pool_splits(config)),
    shell:
        "python workflow_scripts/leakage_check.py --stores {params.stores} --leakage {params.leakage:q}"
        " --pool-splits {params.pools:q} --out {output} > {log} 2>&1"


rule preflight_weights:
    """Every local weights file the config starts a model from, read memory-mapped and checked
    against the ViT it will be loaded into (shapes only); the gate lists its problems.
    """
    input:
        # a missing file (missing_data: warn) is not an input: the check names it
        sorted({u["path"] for u in WEIGHT_USES if Path(u["path"]).exists()}),
    output:
        LAYOUT.preflight_weights(),
    log:
        "logs/data/preflight_weights.log",
    benchmark:
        "benchmarks/data/preflight_weights.tsv"
    priority: 10
    threads: 1
    resources:
        mem_mb=res("data", "mem_mb"),
        runtime=res("data", "runtime"),
    params:
        uses=as_json(WEIGHT_USES),
    shell:
        "python workflow_scripts/preflight_weights.py --uses {params.uses:q} --out {output} > {log} 2>&1"


localrules:
    preflight,


rule preflight:
    """The pre-flight gate: every dataset's checks (quarantine, labels against each task's classes,
    usable labels per split, pools, leakage) at once, before anything expensive; prints `ready`.
    """
    input:
        manifests=[store_manifest(d) for d in sorted(DATASETS)],
        qc=[LAYOUT.qc(d) for d in sorted(DATASETS)],
        quarantine=[LAYOUT.quarantine(d) for d in sorted(DATASETS)],
        leakage=leakage_report(),
        weights=[LAYOUT.preflight_weights()] if WEIGHT_USES else [],
    output:
        preflight_report(),
    log:
        "logs/data/preflight.log",
    benchmark:
        "benchmarks/data/preflight.tsv"
    priority: 10
    threads: 1
    resources:
        mem_mb=res("data", "mem_mb"),
        runtime=res("data", "runtime"),
    params:
        checks=as_json(gate_checks(config)),  # only what decides the verdict: see retflow.preflight_data
        stores=[store_dir(d) for d in sorted(DATASETS)],
        # a function of `input`: Snakemake counts it as derived and does not rerun on its change
        names=lambda w, input: GATE_TASK_NAMES,
        weights=lambda w, input: (
            f"--weights-report {input.weights}" if WEIGHT_USES else ""
        ),
    shell:
        # on the console too (`snakemake preflight` prints its summary and `ready`)
        "python workflow_scripts/preflight.py --stores {params.stores} --leakage-report {input.leakage}"
        " --checks {params.checks:q} --names {params.names:q} {params.weights} --out {output} 2>&1 | tee {log}"


rule data_all:
    """All prepared datasets, the cross-dataset leakage check and the pre-flight gate."""
    input:
        [store_manifest(d) for d in DATASETS],
        leakage_report(),
        preflight_report(),
