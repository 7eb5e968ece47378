# Helpers of the synthetic branch (rules/synth.smk includes this file): paths from LAYOUT
# (retflow.layout, rules/common.smk) and the jobs' settings from retflow.synth.settings (checked at
# startup); all logic lives in retflow.synth. rules/common.smk calls synthetic_store(m) /
# synthetic_store_manifest(m) when synth.enabled.
from retflow.synth import settings as synth_cfg  # noqa: E402

# synth_cfg.errors(config) ran at startup (retflow.settings.startup)
SYNTH_MODALITIES = synth_cfg.modalities(config)
SYNTH_SHARDS = synth_cfg.shard_ids(config)


def synthetic_store(modality):
    """Folder of the synthetic store of ``modality`` (read it like a prepared dataset)."""
    return LAYOUT.synth_store(modality)


def synthetic_store_manifest(modality):
    """The file a rule takes as input to depend on the synthetic store of ``modality``."""
    return LAYOUT.synth_store_manifest(modality)


def synth_settings(wildcards):
    """SynthSettings of the modality's generator (training and sampling), as JSON."""
    return synth_cfg.modality_settings(config, wildcards.modality).to_json()


def synth_quality_settings(wildcards):
    """SynthQualitySettings of the modality's quality checks, as JSON."""
    return synth_cfg.quality_settings(config, wildcards.modality).to_json()


def synth_resources(kind):
    """train: resources.pretrain overlaid with synth.resources.train; sample: default + synth.resources.sample."""
    out = rfc.resources(config, "pretrain" if kind == "train" else "default")
    # synth.resources.<kind> is optional (no schema default)
    out.update(config["synth"]["resources"].get(kind) or {})
    out["nodes"] = 1  # one node: the generator trains in one process
    return out


def synth_container(kind):
    return CONTAINERS["gpu"] if synth_resources(kind)["gpu"] else CONTAINERS["cpu"]


def synth_pool_manifests(wildcards):
    return [store_manifest(d) for d in synth_cfg.pools(config, wildcards.modality)]


def synth_pool_stores(wildcards):
    return [store_dir(d) for d in synth_cfg.pools(config, wildcards.modality)]


def synth_encoder(wildcards):
    """Our own pretrained encoder of the modality: the feature space of the quality checks."""
    method = config["synth"]["quality"]["encoder_method"]
    return LAYOUT.pretrain_checkpoint(method, wildcards.modality)


def synth_tstr_inputs(wildcards):
    ds = synth_cfg.tstr_dataset(config, wildcards.modality)
    return {"tstr": store_manifest(ds)} if ds else {}


def synth_tstr_option(wildcards):
    ds = synth_cfg.tstr_dataset(config, wildcards.modality)
    return f"--tstr-store {store_dir(ds)}" if ds else ""


SYNTH_REPORT_INPUTS = [LAYOUT.synth_quality_json(m) for m in SYNTH_MODALITIES] + [
    synthetic_store_manifest(m) for m in SYNTH_MODALITIES
]
