# Segmentation tasks (type: segmentation): ViT encoder + UNETR-style decoder, one job per run.
# Writes the fine-tuning run layout (RUN_DIR/metrics.json, best.pth, train_log.csv) directly,
# so the report and all_metrics() see it; the classification rules never see these tasks:
# `segment` only matches segmentation tasks with the finetune protocol, and the rule orders
# below give it precedence over finetune/evaluate_internal, whose patterns match any task.


ruleorder: segment > evaluate_internal
ruleorder: segment > finetune


rule segment:
    """Fine-tune encoder + decoder on one segmentation task; test Dice/IoU with bootstrap CIs."""
    input:
        store=lambda w: store_manifest(TASKS[w.task]["dataset"]),
        init=init_checkpoint,
        preflight=preflight_report(),
    output:
        metrics=f"{RUN_DIR}/metrics.json",
        best=f"{RUN_DIR}/best.pth",
        log=f"{RUN_DIR}/train_log.csv",
        summary=f"{RUN_DIR}/train_summary.json",
        overlay=report(
            f"{RUN_DIR}/overlay.png",
            caption="captions/segmentation.rst",
            category="Segmentation",
            labels={
                "task": "{task}",
                "model": "{model}",
                "fraction": "{frac}",
                "seed": "{seed}",
            },
        ),
    log:
        f"logs/{RUN_LOG}/segment.log",
    benchmark:
        f"benchmarks/{RUN_LOG}/train.tsv"
    wildcard_constraints:
        protocol="finetune",
        task="|".join(SEGMENTATION_TASKS) or "no_segmentation_tasks",
    container:
        CONTAINERS["gpu"]
    threads: res("finetune", "threads")
    resources:
        **launch.slurm_resources(
            rfc.resources(config, "finetune"), checkpoint_signal=False
        ),
    params:
        settings=segment_settings,
        store=lambda w: store_dir(TASKS[w.task]["dataset"]),
        init=init_option,
        out=lambda w, output: str(Path(output.metrics).parent),
    shell:
        "OMP_NUM_THREADS={threads} python workflow_scripts/segment.py --settings {params.settings:q}"
        " --store {params.store} --init '{params.init}' --out-dir {params.out} > {log} 2>&1"
