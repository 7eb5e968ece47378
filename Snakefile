# retflow: retinal foundation models, from images to a report, as one Snakemake DAG.
# Default config = the embedded demo (phantoms, tiny ViTs, CPU minutes);
# config/retfound_paper.yaml = the RETFound paper at full scale.
import sys
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from retflow.settings import startup  # noqa: E402

# The config: `--configfile X` replaces the default config.yaml (the demo), which is read here so
# that a YAML error names its line. Validated against config/schema.yaml (defaults filled in),
# cross-references, paths and CSV headers: every problem is one line, then exit 1
# (retflow.settings.startup).
startup.apply(
    config, workflow.config_settings.configfiles, Path(workflow.basedir) / "config.yaml"
)


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
include: "rules/fusion.smk"
include: "rules/compare.smk"
include: "rules/report.smk"
include: "rules/onerror.smk"


localrules:
    all,


rule all:
    default_target: True
    input:
        LAYOUT.report(),
