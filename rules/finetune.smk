# Downstream training: protocol x task x model x label fraction x [cross-validation fold x] seed.


wildcard_constraints:
    protocol="|".join(rfc.protocols()),
    task="|".join(TASKS),
    model="|".join(MODELS),
    frac=r"[0-9.]+",
    seed=r"\d+",
    fold=FOLD_WILDCARD,


rule finetune:
    """Fine-tune (or linear-probe) one model on one task at one label fraction and seed."""
    input:
        store=lambda w: store_manifest(TASKS[w.task]["dataset"]),
        init=init_checkpoint,
        preflight=preflight_report(),
    output:
        best=f"{RUN_DIR}/best.pth",
        log=f"{RUN_DIR}/train_log.csv",
        predictions=f"{RUN_DIR}/predictions.parquet",
        summary=f"{RUN_DIR}/train_summary.json",  # kept epoch, chance level: read by the report
    log:
        f"logs/{RUN_LOG}/train.log",
    benchmark:
        f"benchmarks/{RUN_LOG}/train.tsv"
    wildcard_constraints:
        protocol=rfc.FINETUNE_PROTOCOLS,  # not fusion: rules/fusion.smk trains those runs
    container:
        CONTAINERS["gpu"]
    priority: run_priority
    threads: res("finetune", "threads")
    resources:
        **launch.slurm_resources(
            rfc.resources(config, "finetune"), checkpoint_signal=False
        ),
    params:
        settings=finetune_settings,
        store=lambda w: store_dir(TASKS[w.task]["dataset"]),
        init=init_option,
        out=lambda w, output: str(Path(output.best).parent),
    shell:
        "OMP_NUM_THREADS={threads} python workflow_scripts/finetune.py --settings {params.settings:q}"
        " --store {params.store} --init '{params.init}' --out-dir {params.out} > {log} 2>&1"


rule predict_external:
    """Apply a trained model, unchanged, to an external validation set (on the device and with the
    resources of fine-tuning: it runs the same model in the GPU image)."""
    input:
        best=f"{RUN_DIR}/best.pth",
        store=lambda w: store_manifest(w.external),
    output:
        f"{RUN_DIR}/external/{{external}}/predictions.parquet",
    log:
        f"logs/{RUN_LOG}/predict_{{external}}.log",
    benchmark:
        f"benchmarks/{RUN_LOG}/predict_{{external}}.tsv"
    container:
        CONTAINERS["gpu"]
    threads: res("finetune", "threads")
    resources:
        **launch.slurm_resources(
            rfc.resources(config, "finetune"), checkpoint_signal=False
        ),
    params:
        store=lambda w: store_dir(w.external),
        args=predict_external_args,
        device=config["device"],
    shell:
        "OMP_NUM_THREADS={threads} python workflow_scripts/predict.py --checkpoint {input.best}"
        " --store {params.store} {params.args} --device {params.device}"
        " --out {output} > {log} 2>&1"
