# retflow: retinal foundation models, from images to a report, as one Snakemake DAG.
# Default config = the embedded demo (phantoms, tiny ViTs, CPU minutes);
# config/retfound_paper.yaml = the RETFound paper at full scale.
from snakemake.utils import min_version, validate

min_version("9.0")


# config.yaml (the demo) is the default; `--configfile X` replaces it instead of merging into it
if not workflow.config_settings.configfiles:

    configfile: "config.yaml"


validate(config, "config/schema.yaml")


# CPU image for every rule that names none; GPU rules name config["containers"]["gpu"]
container: config["containers"]["cpu"]


include: "rules/common.smk"
include: "rules/data.smk"


# synthetic images (latent diffusion): rules and synthetic_store(modality) only when enabled
if config["synth"]["enabled"]:

    include: "rules/synth.smk"


include: "rules/pretrain.smk"
include: "rules/finetune.smk"
include: "rules/evaluate.smk"
include: "rules/segment.smk"
include: "rules/compare.smk"
include: "rules/report.smk"


localrules:
    all,


rule all:
    default_target: True
    input:
        f"{RESULTS}/report.html",
