# Pretraining stage: self-supervised ViT per (method, modality) on the unlabelled pool.


rule pretrain:
    """Masked-autoencoder pretraining under torchrun (resumes from resume/last.pth)."""
    input:
        lambda w: [store_manifest(d) for d in config["pretrain"]["pools"][w.modality]],
    output:
        checkpoint=f"{RESULTS}/pretrain/{{method}}/{{modality}}/checkpoint.pth",
        log=f"{RESULTS}/pretrain/{{method}}/{{modality}}/log.csv",
        recon=f"{RESULTS}/pretrain/{{method}}/{{modality}}/recon.png",
    log:
        "logs/pretrain/{method}_{modality}.log",
    benchmark:
        "benchmarks/pretrain/{method}_{modality}.tsv"
    wildcard_constraints:
        modality="cfp|oct",
    priority: 10  # the critical path of the DAG
    threads: res("pretrain", "threads")
    resources:
        mem_mb=res("pretrain", "mem_mb"),
        runtime=res("pretrain", "runtime"),
        gpu=res("pretrain", "gpu"),
    params:
        settings=pretrain_settings,
        stores=lambda w: [store_dir(d) for d in config["pretrain"]["pools"][w.modality]],
        nproc=n_processes,
        out=lambda w, output: str(Path(output.checkpoint).parent),
    shell:
        "OMP_NUM_THREADS={threads} torchrun --standalone --nnodes=1 --nproc_per_node={params.nproc}"
        " workflow_scripts/pretrain.py --settings {params.settings:q} --stores {params.stores}"
        " --out-dir {params.out} > {log} 2>&1"


rule pretrain_all:
    """Every pretraining run that a downstream model needs."""
    input:
        [f"{RESULTS}/pretrain/{m}/{mod}/checkpoint.pth" for m, mod in PRETRAIN],
