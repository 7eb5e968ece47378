# Pretraining stage: self-supervised ViT per (method, modality) on the unlabelled pool.


rule pretrain:
    """Self-supervised pretraining (MAE, SimCLR, DINO, MoCo-v3, token reconstruction) under torchrun,
    on real, synthetic or scheduled data (run name `method[-data]`); resumes from resume/last.pth.
    """
    input:
        pretrain_inputs,
        preflight=preflight_report(),
    output:
        checkpoint=LAYOUT.pretrain_checkpoint("{method}", "{modality}"),
        log=LAYOUT.pretrain_log("{method}", "{modality}"),
        figure=LAYOUT.pretrain_figure("{method}", "{modality}"),
    log:
        "logs/pretrain/{method}_{modality}.log",
    benchmark:
        "benchmarks/pretrain/{method}_{modality}.tsv"
    wildcard_constraints:
        modality="cfp|oct",
        method=r"[a-z0-9_]+(-[a-z_]+[0-9.]*)?",
    priority: 10  # the critical path of the DAG
    container:
        CONTAINERS["gpu"]
    threads: res("pretrain", "threads")
    resources:
        # gpu + cpus_per_gpu (one node) or nodes + gres + mpi (several), and the checkpoint
        # signal before the time limit: retflow.train.launch.slurm_resources
        **launch.slurm_resources(rfc.resources(config, "pretrain")),
    params:
        settings=pretrain_settings,
        stores=pretrain_stores,
        synthetic=lambda w: " ".join(pretrain_synthetic(w)),
        launch=pretrain_launch,
        out=lambda w, output: str(Path(output.checkpoint).parent),
    shell:
        # exec: no shell between SLURM's signal and the workers that checkpoint on it
        "exec {params.launch} workflow_scripts/pretrain.py --settings {params.settings:q}"
        " --stores {params.stores} --synthetic-stores {params.synthetic} --out-dir {params.out}"
        " > {log} 2>&1"


rule pretrain_all:
    """Every pretraining run that a downstream model needs."""
    input:
        [LAYOUT.pretrain_checkpoint(m, mod) for m, mod in PRETRAIN],
