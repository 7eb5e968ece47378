# Helpers of the synthetic branch (rules/synth.smk includes this file): config checks, paths and
# settings (checked at startup); all logic lives in retflow.synth. rules/pretrain.smk may call synthetic_store(m) /
# synthetic_store_manifest(m) when synth.enabled.
from retflow.synth import paths as synth_paths  # noqa: E402
from retflow.synth import settings as synth_cfg  # noqa: E402

# synth_cfg.errors(config) ran at startup (retflow.settings.startup)
SYNTH_MODALITIES = synth_cfg.modalities(config)
SYNTH_SHARDS = synth_cfg.shard_ids(config)
SYNTH_DIR = f"{RESULTS}/synth/{{modality}}"


def synthetic_store(modality):
    """Folder of the synthetic store of ``modality`` (read it like a prepared dataset)."""
    return synth_paths.store_dir(RESULTS, modality)


def synthetic_store_manifest(modality):
    """The file a rule takes as input to depend on the synthetic store of ``modality``."""
    return synth_paths.store_manifest(RESULTS, modality)


def synth_resources(kind):
    """train: resources.pretrain overlaid with synth.resources.train; sample: default + synth.resources.sample."""
    out = rfc.resources(config, "pretrain" if kind == "train" else "default")
    out.update(config["synth"]["resources"].get(kind) or {})
    out.pop("nodes", None)  # one node: the generator trains in one process
    return out


def synth_container(kind):
    return CONTAINERS["gpu"] if synth_resources(kind).get("gpu") else CONTAINERS["cpu"]


def synth_pool_stores(wildcards):
    return [store_dir(d) for d in synth_cfg.pools(config, wildcards.modality)]


def synth_encoder(wildcards):
    """Our own pretrained encoder of the modality: the feature space of the quality checks."""
    method = config["synth"]["quality"]["encoder_method"]
    return f"{RESULTS}/pretrain/{method}/{wildcards.modality}/checkpoint.pth"


def synth_tstr_inputs(wildcards):
    ds = synth_cfg.tstr_dataset(config, wildcards.modality)
    return {"tstr": store_manifest(ds)} if ds else {}


def synth_tstr_option(wildcards):
    ds = synth_cfg.tstr_dataset(config, wildcards.modality)
    return f"--tstr-store {store_dir(ds)}" if ds else ""


SYNTH_REPORT_INPUTS = [
    f"{RESULTS}/synth/{m}/quality/quality.json" for m in SYNTH_MODALITIES
] + [synthetic_store_manifest(m) for m in SYNTH_MODALITIES]
