# Report: one self-contained HTML page aggregating every result.


rule report:
    """Aggregate metrics, figures, reconstructions, QC and timings into results/report.html."""
    input:
        metrics=all_metrics(),
        pretrain=[f"{RESULTS}/pretrain/{m}/{mod}/recon.png" for m, mod in PRETRAIN],
        qc=[f"{RESULTS}/data/{d}/qc.json" for d in DATASETS],
    output:
        f"{RESULTS}/report.html",
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
