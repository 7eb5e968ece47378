# Synthetic images (DERETFound-style): a latent diffusion generator per modality, trained on the
# real pools -> sampling fanned out in shards -> one store in the prepared-dataset format
# (manifest column `synthetic`) -> quality checks for the report. Included by the Snakefile only
# when synth.enabled; helpers in synth_common.smk, paths from LAYOUT (retflow.layout), settings
# from retflow.synth.settings (each job writes them next to its outputs as settings.json), all
# logic in retflow.synth.


include: "synth_common.smk"


wildcard_constraints:
    shard=r"\d\d\d\d\d+",  # 5 digits or more (no {m,n}: the comma would split the wildcard)


rule synth_train:
    """Train the latent diffusion generator of one modality (resumes from resume/last.pth)."""
    input:
        synth_pool_manifests,
        preflight=preflight_report(),
    output:
        model=LAYOUT.synth_model("{modality}"),
        log=LAYOUT.synth_train_log("{modality}"),
        recon=LAYOUT.synth_recon("{modality}"),
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
        settings=synth_settings,
        stores=synth_pool_stores,
        out=lambda w, output: str(Path(output.model).parent),
    shell:
        # exec: SLURM's pre-timeout SIGTERM reaches the trainer, which checkpoints and exits
        "exec python workflow_scripts/synth_train.py --settings {params.settings:q} --stores {params.stores}"
        " --threads {threads} --out-dir {params.out} > {log} 2>&1"


rule synth_sample:
    """Sample one shard of synthetic images into a store part (a small store of its own)."""
    input:
        model=LAYOUT.synth_model("{modality}"),
    output:
        shards=directory(LAYOUT.synth_part_shards("{modality}", "{shard}")),
        manifest=LAYOUT.synth_part_manifest("{modality}", "{shard}"),
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
        settings=synth_settings,
        out=lambda w, output: str(Path(output.manifest).parent),
    shell:
        "python workflow_scripts/synth_sample.py --model {input.model} --settings {params.settings:q}"
        " --shard {wildcards.shard} --threads {threads} --out-dir {params.out} > {log} 2>&1"


rule synth_store:
    """Merge the sampled parts into the synthetic store (shards first, manifest last)."""
    input:
        lambda w: [LAYOUT.synth_part_manifest(w.modality, k) for k in SYNTH_SHARDS],
    output:
        shards=directory(LAYOUT.synth_store_shards("{modality}")),
        manifest=LAYOUT.synth_store_manifest("{modality}"),
        qc=LAYOUT.synth_store_qc("{modality}"),
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
        synth=LAYOUT.synth_store_manifest("{modality}"),
        encoder=synth_encoder,
        pools=synth_pool_manifests,
    output:
        json=LAYOUT.synth_quality_json("{modality}"),
        samples=LAYOUT.synth_quality_png("{modality}", "samples"),
        memorisation=LAYOUT.synth_quality_png("{modality}", "memorisation"),
        nearest=LAYOUT.synth_quality_png("{modality}", "nearest"),
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
        settings=synth_quality_settings,
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
