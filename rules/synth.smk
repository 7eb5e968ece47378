# Synthetic images (DERETFound-style): a latent diffusion generator per modality, trained on the
# real pools -> sampling fanned out in shards -> one store in the prepared-dataset format
# (manifest column `synthetic`) -> quality checks for the report. Included by the Snakefile only
# when synth.enabled; helpers in synth_common.smk, all logic in retflow.synth.


include: "synth_common.smk"


wildcard_constraints:
    shard=r"\d\d\d\d\d+",  # 5 digits or more (no {m,n}: the comma would split the wildcard)


rule synth_train:
    """Train the latent diffusion generator of one modality (resumes from resume/last.pth)."""
    input:
        lambda w: [store_manifest(d) for d in synth_cfg.pools(config, w.modality)],
        leakage=leakage_report(),
    output:
        model=f"{SYNTH_DIR}/ldm/model.pth",
        log=f"{SYNTH_DIR}/ldm/log.csv",
        recon=f"{SYNTH_DIR}/ldm/recon.png",
    log:
        "logs/synth/train_{modality}.log",
    benchmark:
        "benchmarks/synth/train_{modality}.tsv"
    wildcard_constraints:
        modality="|".join(SYNTH_MODALITIES),
    container:
        synth_container("train")
    threads: synth_resources("train")["threads"]
    resources:
        **launch.slurm_resources(synth_resources("train")),
    params:
        settings=lambda w: as_json(synth_cfg.modality_settings(config, w.modality)),
        stores=synth_pool_stores,
        out=lambda w, output: str(Path(output.model).parent),
    shell:
        # exec: SLURM's pre-timeout SIGTERM reaches the trainer, which checkpoints and exits
        "exec python workflow_scripts/synth_train.py --settings {params.settings:q} --stores {params.stores}"
        " --threads {threads} --out-dir {params.out} > {log} 2>&1"


rule synth_sample:
    """Sample one shard of synthetic images into a store part (a small store of its own)."""
    input:
        model=f"{SYNTH_DIR}/ldm/model.pth",
    output:
        shards=directory(f"{SYNTH_DIR}/parts/{{shard}}/shards"),
        manifest=f"{SYNTH_DIR}/parts/{{shard}}/manifest.parquet",
    log:
        "logs/synth/sample_{modality}_{shard}.log",
    benchmark:
        "benchmarks/synth/sample_{modality}_{shard}.tsv"
    wildcard_constraints:
        modality="|".join(SYNTH_MODALITIES),
    container:
        synth_container("sample")
    threads: synth_resources("sample")["threads"]
    resources:
        **launch.slurm_resources(synth_resources("sample"), checkpoint_signal=False),
    params:
        settings=lambda w: as_json(synth_cfg.modality_settings(config, w.modality)),
        out=lambda w, output: str(Path(output.manifest).parent),
    shell:
        "python workflow_scripts/synth_sample.py --model {input.model} --settings {params.settings:q}"
        " --shard {wildcards.shard} --threads {threads} --out-dir {params.out} > {log} 2>&1"


rule synth_store:
    """Merge the sampled parts into the synthetic store (shards first, manifest last)."""
    input:
        lambda w: [
            f"{RESULTS}/synth/{w.modality}/parts/{k}/manifest.parquet"
            for k in SYNTH_SHARDS
        ],
    output:
        shards=directory(f"{SYNTH_DIR}/store/shards"),
        manifest=f"{SYNTH_DIR}/store/manifest.parquet",
        qc=f"{SYNTH_DIR}/store/qc.json",
    log:
        "logs/synth/store_{modality}.log",
    benchmark:
        "benchmarks/synth/store_{modality}.tsv"
    wildcard_constraints:
        modality="|".join(SYNTH_MODALITIES),
    threads: 1
    resources:
        mem_mb=res("default", "mem_mb"),
        runtime=res("default", "runtime"),
    params:
        parts=lambda w, input: [str(Path(p).parent) for p in input],
        out=lambda w, output: str(Path(output.manifest).parent),
    shell:
        "python workflow_scripts/synth_merge.py --parts {params.parts} --out-dir {params.out} > {log} 2>&1"


rule synth_quality:
    """Frechet distance (our encoder), memorisation check and train-on-synthetic score, with figures."""
    input:
        unpack(synth_tstr_inputs),
        synth=f"{SYNTH_DIR}/store/manifest.parquet",
        encoder=synth_encoder,
        pools=lambda w: [store_manifest(d) for d in synth_cfg.pools(config, w.modality)],
    output:
        json=f"{SYNTH_DIR}/quality/quality.json",
        samples=f"{SYNTH_DIR}/quality/samples.png",
        memorisation=f"{SYNTH_DIR}/quality/memorisation.png",
        nearest=f"{SYNTH_DIR}/quality/nearest.png",
    log:
        "logs/synth/quality_{modality}.log",
    benchmark:
        "benchmarks/synth/quality_{modality}.tsv"
    wildcard_constraints:
        modality="|".join(SYNTH_MODALITIES),
    threads: res("default", "threads")
    resources:
        mem_mb=res("default", "mem_mb"),
        runtime=res("default", "runtime"),
    params:
        settings=lambda w: as_json(synth_cfg.quality_settings(config, w.modality)),
        synth=lambda w, input: str(Path(input.synth).parent),
        pools=synth_pool_stores,
        tstr=synth_tstr_option,
        out=lambda w, output: str(Path(output.json).parent),
    shell:
        "python workflow_scripts/synth_quality.py --synth-store {params.synth} --real-stores {params.pools}"
        " --encoder {input.encoder} {params.tstr} --settings {params.settings:q} --threads {threads}"
        " --out-dir {params.out} > {log} 2>&1"


rule synth_all:
    """Every synthetic store and its quality checks."""
    input:
        SYNTH_REPORT_INPUTS,
