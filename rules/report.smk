# Report: one self-contained HTML page aggregating every result.


report: "captions/workflow.rst"


rule report:
    """Aggregate metrics, comparisons, figures, saliency maps, QC and compute cost into results/report.html;
    the script reads exactly the declared input files (passed file by file)."""
    input:
        metrics=all_metrics(),
        compare=COMPARE_JSONS,
        saliency=SALIENCY_PNGS,
        fusion=report_targets.same_eyes_outputs(config, LAYOUT),  # rules/fusion.smk
        pretrain=[LAYOUT.pretrain_figure(m, mod) for m, mod in PRETRAIN],
        qc=[LAYOUT.qc(d) for d in DATASETS],
        synth=SYNTH_REPORT_INPUTS if config["synth"]["enabled"] else [],
    output:
        html=report(
            LAYOUT.report(),
            caption="captions/report.rst",
            category="Report",
        ),
        settings=LAYOUT.report_settings(),
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
        settings=report_settings.report(config).to_json(),
        results=lambda w, output: str(Path(output.html).parent),  # LAYOUT.root
    shell:
        "python workflow_scripts/report.py --settings {params.settings:q} --results {params.results}"
        " --metrics {input.metrics:q} --compare {input.compare:q} --saliency {input.saliency:q}"
        " --pretrain {input.pretrain:q} --qc {input.qc:q} --fusion {input.fusion:q}"
        " --benchmarks benchmarks --out {output.html} --settings-out {output.settings} > {log} 2>&1"
