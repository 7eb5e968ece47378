# Evaluation: metrics with bootstrap confidence intervals for every prediction file.


rule evaluate_internal:
    """Metrics + 95 % bootstrap CIs on the internal test split."""
    input:
        f"{RUN_DIR}/predictions.parquet",
    output:
        f"{RUN_DIR}/metrics.json",
    log:
        f"logs/{RUN_LOG}/evaluate.log",
    benchmark:
        f"benchmarks/{RUN_LOG}/evaluate.tsv"
    container:
        CONTAINERS["cpu"]
    threads: 1
    resources:
        mem_mb=res("evaluate", "mem_mb"),
        runtime=res("evaluate", "runtime"),
    params:
        settings=lambda w: evaluate_settings(w, "internal"),
    shell:
        "python workflow_scripts/evaluate.py --settings {params.settings:q} --predictions {input}"
        " --out {output} > {log} 2>&1"


rule evaluate_external:
    """Metrics + 95 % bootstrap CIs on an external validation set."""
    input:
        f"{RUN_DIR}/external/{{external}}/predictions.parquet",
    output:
        f"{RUN_DIR}/external/{{external}}/metrics.json",
    log:
        f"logs/{RUN_LOG}/evaluate_{{external}}.log",
    benchmark:
        f"benchmarks/{RUN_LOG}/evaluate_{{external}}.tsv"
    container:
        CONTAINERS["cpu"]
    threads: 1
    resources:
        mem_mb=res("evaluate", "mem_mb"),
        runtime=res("evaluate", "runtime"),
    params:
        settings=lambda w: evaluate_settings(w, w.external),
    shell:
        "python workflow_scripts/evaluate.py --settings {params.settings:q} --predictions {input}"
        " --out {output} > {log} 2>&1"


for _task in TASKS:

    rule:
        name:
            f"task_{_task}"
        input:
            all_metrics(_task),
        localrule: True
