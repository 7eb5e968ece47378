# CFP+OCT fusion tasks (tasks.<name>.fusion; retflow.fusion_config): the pairs of the two stores
# (one job per task, after the gate), one late-fusion run per model x label fraction x seed (protocol
# `fusion`, the fine-tuning run layout: evaluate_internal and compare read it as any run), and the
# fusion model vs the compare_with tasks' single-modality models on the same test eyes (same_eyes).
# No jobs for a config without fusion tasks.
# (fusion_store, fusion_init: rules/common.smk)
from retflow.report import targets as report_targets  # noqa: E402

FUSION_TASK_RE = "|".join(fusion_config.fusion_tasks(config)) or "no_fusion_tasks"


rule pair_eyes:
    """Pair a fusion task's CFP and OCT images by patient + eye (+ visit); every unpaired eye with its reason."""
    input:
        cfp=lambda w: fusion_store(w, "cfp"),
        oct=lambda w: fusion_store(w, "oct"),
        preflight=preflight_report(),
    output:
        pairs=LAYOUT.pairs("{task}"),
        unpaired=LAYOUT.unpaired("{task}"),
        summary=LAYOUT.pairing_json("{task}"),
    log:
        "logs/data/pair_eyes_{task}.log",
    benchmark:
        "benchmarks/data/pair_eyes_{task}.tsv"
    wildcard_constraints:
        task=FUSION_TASK_RE,
    container:
        CONTAINERS["cpu"]
    threads: 1
    resources:
        mem_mb=res("data", "mem_mb"),
        runtime=res("data", "runtime"),
    params:
        settings=lambda w: build.pairing(config, w.task).to_json(),
        cfp=lambda w: store_dir(TASKS[w.task]["fusion"]["cfp"]),
        oct=lambda w: store_dir(TASKS[w.task]["fusion"]["oct"]),
        out=lambda w, output: str(Path(output.pairs).parent),
    shell:
        "python workflow_scripts/pair_eyes.py --settings {params.settings:q} --cfp-store {params.cfp}"
        " --oct-store {params.oct} --out-dir {params.out} > {log} 2>&1"


rule fusion:
    """Train one late-fusion model (a CFP and an OCT encoder, pooled embeddings -> head) on a task's pairs."""
    input:
        pairs=lambda w: LAYOUT.pairs(w.task),
        cfp=lambda w: fusion_store(w, "cfp"),
        oct=lambda w: fusion_store(w, "oct"),
        init_cfp=lambda w: fusion_init(w, "cfp"),
        init_oct=lambda w: fusion_init(w, "oct"),
        preflight=preflight_report(),
    output:
        best=f"{RUN_DIR}/best.pth",
        log=f"{RUN_DIR}/train_log.csv",
        predictions=f"{RUN_DIR}/predictions.parquet",
        summary=f"{RUN_DIR}/train_summary.json",
    log:
        f"logs/{RUN_LOG}/train.log",
    benchmark:
        f"benchmarks/{RUN_LOG}/train.tsv"
    wildcard_constraints:
        protocol=fusion_config.FUSION,
        task=FUSION_TASK_RE,
    container:
        CONTAINERS["gpu"]
    threads: res("finetune", "threads")
    resources:
        **launch.slurm_resources(
            rfc.resources(config, "finetune"), checkpoint_signal=False
        ),
    params:
        settings=lambda w: build.fusion(
            config, w.task, w.model, w.frac, w.seed, w.protocol
        ).to_json(),
        cfp=lambda w: store_dir(TASKS[w.task]["fusion"]["cfp"]),
        oct=lambda w: store_dir(TASKS[w.task]["fusion"]["oct"]),
        init_cfp=lambda w: fusion_init(w, "cfp"),
        init_oct=lambda w: fusion_init(w, "oct"),
        out=lambda w, output: str(Path(output.best).parent),
    shell:
        "OMP_NUM_THREADS={threads} python workflow_scripts/fusion.py --settings {params.settings:q}"
        " --pairs {input.pairs} --cfp-store {params.cfp} --oct-store {params.oct}"
        " --init-cfp '{params.init_cfp}' --init-oct '{params.init_oct}' --out-dir {params.out} > {log} 2>&1"


rule same_eyes:
    """The fusion model vs the compare_with tasks' single-modality models on the same test eyes: each
    scored (bootstrap CI) and every pair tested (DeLong / paired bootstrap)."""
    input:
        unpack(lambda w: report_targets.same_eyes_inputs(config, LAYOUT, w)),
    output:
        LAYOUT.same_eyes_json("{task}", "{protocol}", "{model}", "{frac}", "{seed}"),
    log:
        "logs/same_eyes/{task}/{protocol}/{model}/frac{frac}/seed{seed}.log",
    benchmark:
        "benchmarks/same_eyes/{task}/{protocol}/{model}/frac{frac}/seed{seed}.tsv"
    wildcard_constraints:
        task=FUSION_TASK_RE,
    container:
        CONTAINERS["cpu"]
    threads: 1
    resources:
        mem_mb=res("evaluate", "mem_mb"),
        runtime=res("evaluate", "runtime"),
    params:
        settings=lambda w: report_settings.same_eyes(
            config, w.task, w.protocol, w.model, w.frac, w.seed
        ).to_json(),
        single=lambda w, input: " ".join(
            f"--{m} {input[m]}" for m in fusion_config.MODALITIES if m in input.keys()
        ),
    shell:
        "python workflow_scripts/same_eyes.py --settings {params.settings:q} --pairs {input.pairs}"
        " --fusion {input.fusion} {params.single} --out {output} > {log} 2>&1"
