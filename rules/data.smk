# Data stage: phantom generation (demo) and per-dataset preprocessing into a store.


rule phantom_dataset:
    """Generate one procedural phantom dataset (fundus photos, B-scans or NIfTI volumes)."""
    output:
        directory(f"{RESULTS}/raw/{{dataset}}"),
    log:
        "logs/data/phantom_{dataset}.log",
    benchmark:
        "benchmarks/data/phantom_{dataset}.tsv"
    wildcard_constraints:
        dataset="|".join(phantom_names()) or "no_phantoms",
    priority: 10  # the critical path: pretraining waits on these
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
        shards=directory(f"{RESULTS}/data/{{dataset}}/shards"),
        manifest=f"{RESULTS}/data/{{dataset}}/manifest.parquet",
        quarantine=f"{RESULTS}/data/{{dataset}}/quarantine.csv",
        qc=f"{RESULTS}/data/{{dataset}}/qc.json",
    log:
        "logs/data/prepare_{dataset}.log",
    benchmark:
        "benchmarks/data/prepare_{dataset}.tsv"
    priority: 10  # the critical path: pretraining waits on these
    threads: res("data", "threads")
    resources:
        mem_mb=res("data", "mem_mb"),
        runtime=res("data", "runtime"),
    params:
        spec=lambda w: as_json(DATASETS[w.dataset]),
        location=prepare_location,
        images=images_option,
        prep=as_json(config["preprocess"]),
        splits=as_json(config["splits"]),
        labels=allowed_labels,
        leakage=as_json(config["leakage"]),
        out=lambda w, output: str(Path(output.manifest).parent),
    shell:
        "python workflow_scripts/prepare_dataset.py --name {wildcards.dataset} --spec {params.spec:q}"
        " --location {params.location:q} {params.images} --preprocess {params.prep:q}"
        " --splits {params.splits:q} --labels {params.labels:q} --leakage {params.leakage:q}"
        " --workers {threads} --out-dir {params.out} > {log} 2>&1"


rule leakage_check:
    """Pretraining pools and training splits against every other dataset's test images."""
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
    shell:
        "python workflow_scripts/leakage_check.py --stores {params.stores} --leakage {params.leakage:q}"
        " --out {output} > {log} 2>&1"


rule data_all:
    """All prepared datasets and the cross-dataset leakage check."""
    input:
        [store_manifest(d) for d in DATASETS],
        leakage_report(),
