# Report: one self-contained HTML page aggregating every result.


report: "captions/workflow.rst"


rule report:
    """Aggregate metrics, comparisons, figures, saliency maps, QC and compute cost into results/report.html."""
    input:
        metrics=all_metrics(),
        compare=COMPARE_JSONS,
        saliency=SALIENCY_PNGS,
        pretrain=[f"{RESULTS}/pretrain/{m}/{mod}/figure.png" for m, mod in PRETRAIN],
        qc=[f"{RESULTS}/data/{d}/qc.json" for d in DATASETS],
        synth=SYNTH_REPORT_INPUTS if config["synth"]["enabled"] else [],
    output:
        report(
            f"{RESULTS}/report.html",
            caption="captions/report.rst",
            category="Report",
        ),
    log:
        "logs/report.log",
    benchmark:
        "benchmarks/report.tsv"
    container:
        CONTAINERS["cpu"]
    threads: 1
    resources:
        mem_mb=res("default", "mem_mb"),
        runtime=res("default", "runtime"),
    params:
        config=as_json(config),
        results=lambda w, output: str(Path(output[0]).parent),
    shell:
        "python workflow_scripts/report.py --results {params.results} --benchmarks benchmarks"
        " --config-json {params.config:q} --out {output} > {log} 2>&1"
