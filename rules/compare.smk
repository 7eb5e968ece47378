# Report inputs beyond metrics.json: paired model comparisons and saliency maps.
# Targets and input functions: retflow.report.targets; each job's settings: retflow.settings.report
# (report_settings, imported in rules/common.smk).
from retflow.report import targets as report_targets  # noqa: E402

COMPARE_JSONS = report_targets.compare_outputs(config, LAYOUT)
SALIENCY_PNGS = report_targets.saliency_outputs(config, LAYOUT)


rule compare:
    """Paired test of every model pair on the internal test set (DeLong / paired bootstrap)."""
    input:
        lambda w: report_targets.compare_inputs(config, LAYOUT, w),
    output:
        LAYOUT.compare_json("{task}", "{protocol}", "{frac}", "{seed}", "{fold}"),
    log:
        "logs/compare/{task}/{protocol}/frac{frac}/{fold}seed{seed}.log",
    benchmark:
        "benchmarks/compare/{task}/{protocol}/frac{frac}/{fold}seed{seed}.tsv"
    container:
        CONTAINERS["cpu"]
    threads: 1
    resources:
        mem_mb=res("evaluate", "mem_mb"),
        runtime=res("evaluate", "runtime"),
    params:
        settings=lambda w: report_settings.compare(
            config, w.task, w.protocol, w.frac, w.seed, w.fold
        ).to_json(),
    shell:
        "python workflow_scripts/compare.py --settings {params.settings:q} --predictions {input}"
        " --out {output} > {log} 2>&1"


rule saliency:
    """Attention rollout + Grad-CAM for a few test images per class of one task's model."""
    input:
        unpack(lambda w: report_targets.saliency_inputs(config, LAYOUT, w)),
    output:
        png=report(
            LAYOUT.saliency_png("{task}"),
            caption="captions/saliency.rst",
            category="Saliency maps",
            labels={"task": "{task}"},
        ),
        meta=LAYOUT.saliency_json("{task}"),
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
        settings=lambda w: report_settings.saliency(config, w.task).to_json(),
        store=lambda w: LAYOUT.store(TASKS[w.task]["dataset"]),
    shell:
        "OMP_NUM_THREADS={threads} python workflow_scripts/saliency.py --settings {params.settings:q}"
        " --checkpoint {input.best} --store {params.store} --out {output.png} --meta {output.meta}"
        " > {log} 2>&1"
