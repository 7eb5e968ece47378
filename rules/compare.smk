# Report inputs beyond metrics.json: paired model comparisons and saliency maps.
# Target lists and input functions: retflow.report.targets (pure functions of the config).
from retflow.report import targets as report_targets  # noqa: E402

COMPARE_JSONS = report_targets.compare_outputs(config)
SALIENCY_PNGS = report_targets.saliency_outputs(config)


rule compare:
    """Paired test of every model pair on the internal test set (DeLong / paired bootstrap)."""
    input:
        lambda w: report_targets.compare_inputs(config, w),
    output:
        f"{RESULTS}/compare/{{task}}/{{protocol}}/frac{{frac}}/seed{{seed}}.json",
    log:
        "logs/compare/{task}/{protocol}/frac{frac}/seed{seed}.log",
    benchmark:
        "benchmarks/compare/{task}/{protocol}/frac{frac}/seed{seed}.tsv"
    container:
        CONTAINERS["cpu"]
    threads: 1
    resources:
        mem_mb=res("evaluate", "mem_mb"),
        runtime=res("evaluate", "runtime"),
    params:
        args=lambda w: report_targets.compare_args(config, w),
    shell:
        "python workflow_scripts/compare.py --predictions {input} {params.args}"
        " --out {output} > {log} 2>&1"


rule saliency:
    """Attention rollout + Grad-CAM for a few test images per class of one task's model."""
    input:
        unpack(lambda w: report_targets.saliency_inputs(config, w)),
    output:
        png=report(
            f"{RESULTS}/saliency/{{task}}.png",
            caption="captions/saliency.rst",
            category="Saliency maps",
            labels={"task": "{task}"},
        ),
        meta=f"{RESULTS}/saliency/{{task}}.json",
    log:
        "logs/saliency/{task}.log",
    benchmark:
        "benchmarks/saliency/{task}.tsv"
    container:
        CONTAINERS["cpu"]
    threads: 1
    resources:
        mem_mb=res("evaluate", "mem_mb"),
        runtime=res("evaluate", "runtime"),
    params:
        args=lambda w: report_targets.saliency_args(config, w),
    shell:
        "OMP_NUM_THREADS={threads} python workflow_scripts/saliency.py --checkpoint {input.best}"
        " {params.args} --out {output.png} --meta {output.meta} > {log} 2>&1"
