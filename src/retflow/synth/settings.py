"""The ``synth:`` config section: which modalities are synthesised, from which pools, how.

The schema (``config/schema.yaml``) fills the defaults and checks types; every function here takes
the validated config. :func:`errors` checks what the schema cannot (cross-references, network
shapes) and names the key of each problem; :func:`modality_settings` / :func:`quality_settings`
build the typed, frozen settings of the jobs (:mod:`retflow.settings.synth`), which the rules hand
to the entry points as JSON.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from retflow.layout import Layout
from retflow.settings.synth import SynthQualitySettings, SynthSettings

#: label columns of the phantom generator's fundus / B-scan datasets (retflow.phantoms.generate)
PHANTOM_LABELS = {"cfp": {"dr_grade", "glaucoma", "cdr"}, "oct": {"diagnosis", "drusen", "irf", "srf", "ped"},
                  "oct_volume": {"diagnosis", "drusen", "irf", "srf", "ped"},
                  "oct_offcentre": {"extrafoveal_irf", "foveal_drusen"}}
CLASSIFICATION = ("binary", "multiclass", "ordinal")
#: how the default Stable-Diffusion prompts name a modality ("<modality text>, <label> <class>")
MODALITY_TEXT = {"cfp": "a colour fundus photograph", "oct": "an OCT B-scan"}
#: what a diffusers Stable-Diffusion pipeline folder must hold (StableDiffusionPipeline.save_pretrained)
SD_COMPONENTS = ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                 "tokenizer", "scheduler/scheduler_config.json")


def enabled(config: dict) -> bool:
    return bool(config["synth"]["enabled"])


def _pretrain_pools(config: dict) -> dict:
    """``pretrain.pools`` (an optional key: a config may pretrain nothing)."""
    return config["pretrain"].get("pools") or {}


def modalities(config: dict) -> list[str]:
    """Synthesised modalities: ``synth.modalities``, default every modality with a pretraining pool."""
    if config["synth"]["modalities"]:
        return list(config["synth"]["modalities"])
    return [m for m, names in _pretrain_pools(config).items() if names]


def pools(config: dict, modality: str) -> list[str]:
    """Real datasets the generator of ``modality`` learns from (default: the pretraining pools)."""
    own = config["synth"]["pools"]
    if modality in own:
        return list(own[modality])
    return list(_pretrain_pools(config).get(modality) or [])


def condition(config: dict, modality: str) -> dict | None:
    """``{"label": column, "classes": [...]}`` for a class-conditional generator, else None."""
    cond = config["synth"]["condition"].get(modality)  # a modality not named there is unconditional
    if not cond:
        return None
    return {"label": cond["label"], "classes": [str(c) for c in cond["classes"]]}


def sd_prompts(config: dict, modality: str) -> list[str]:
    """Text prompts of a Stable-Diffusion fine-tune: one per class of ``synth.condition.<modality>`` (in
    class order), or the one fixed prompt of an unconditional generator. ``synth.prompts.<modality>``
    gives them (``{class: prompt}``, or a string when unconditional); a class without an entry gets
    ``"<modality text>, <label> <class>"``, e.g. ``"a colour fundus photograph, dr_grade 3"``."""
    given = config["synth"]["prompts"].get(modality)  # optional per modality
    cond = condition(config, modality)
    default = default_prompts(modality, cond)
    if cond is None:
        return [given if isinstance(given, str) else default[0]]
    given = {str(k): v for k, v in given.items()} if isinstance(given, dict) else {}
    return [given.get(c, d) for c, d in zip(cond["classes"], default)]


def default_prompts(modality: str, cond: dict | None) -> list[str]:
    """``"<modality text>, <label> <class>"`` per class, or the modality text alone when unconditional."""
    text = MODALITY_TEXT.get(modality, modality)
    return [text] if cond is None else [f"{text}, {cond['label']} {c}" for c in cond["classes"]]


def sd_folder_errors(folder: str | Path | None, key: str = "synth.sd_checkpoint") -> list[str]:
    """Problems of a local Stable-Diffusion pipeline folder (layout only: nothing is loaded), naming the path."""
    path = Path(str(folder))
    if not path.exists():
        return [f"{key}: no Stable-Diffusion pipeline folder at '{path}' (nothing is downloaded: give a local "
                f"folder written by diffusers' StableDiffusionPipeline.save_pretrained)"]
    if not path.is_dir():
        return [f"{key}: '{path}' is a file, not a diffusers Stable-Diffusion pipeline folder"]
    missing = [c for c in SD_COMPONENTS if not (path / c).exists()]
    if missing:
        return [f"{key}: the Stable-Diffusion pipeline folder '{path}' lacks {', '.join(missing)} (expected the "
                f"layout of StableDiffusionPipeline.save_pretrained: model_index.json, unet/, vae/, text_encoder/, "
                f"tokenizer/, scheduler/)"]
    return []


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _sd_errors(out: list[str], config: dict, mods: list[str]) -> None:
    """Checks of the Stable-Diffusion fine-tuning path (``synth.sd_checkpoint``, ``synth.prompts``)."""
    synth = config["synth"]
    folder = synth["sd_checkpoint"]
    problems = sd_folder_errors(folder)
    absent = problems and not Path(str(folder)).exists()
    if problems and not (absent and config["missing_data"] == "warn"):
        out.extend(problems)
    g = float(synth["guidance_scale"])
    if 0.0 < g < 1.0:
        out.append(f"synth.guidance_scale: {g} is between 0 and 1, which the Stable-Diffusion pipeline does not "
                   f"guide with (it guides above 1); use 0 (unconditional), 1 (prompt only) or more")
    for m, given in synth["prompts"].items():
        if m not in mods:
            out.append(f"synth.prompts.{m}: modality '{m}' is not synthesised (synth.modalities {mods})")
            continue
        cond = condition(config, m)
        if cond is None and not isinstance(given, str):
            out.append(f"synth.prompts.{m}: the generator of '{m}' is unconditional (no synth.condition.{m}), "
                       f"so it takes one prompt (a string), not a mapping")
        elif cond is not None and isinstance(given, str):
            out.append(f"synth.prompts.{m}: give one prompt per class of synth.condition.{m} "
                       f"({{class: prompt}}), not one string")
        elif cond is not None:
            unknown = sorted(str(k) for k in given if str(k) not in cond["classes"])
            if unknown:
                out.append(f"synth.prompts.{m}: classes {unknown} are not in synth.condition.{m}.classes "
                           f"{cond['classes']}")
    if problems:
        return
    path = Path(str(folder))
    vae, unet = _read_json(path / "vae/config.json"), _read_json(path / "unet/config.json")
    down = 2 ** (len(vae.get("block_out_channels") or [0]) - 1) * 2 ** (len(unet.get("down_block_types") or [0]) - 1)
    size = int(synth["image_size"])
    if size % down:
        out.append(f"synth.image_size: {size} is not divisible by {down}, the downsampling of the VAE and UNet "
                   f"of {path} (Stable Diffusion v1/v2: a multiple of 64)")
    timesteps = _read_json(path / "scheduler/scheduler_config.json").get("num_train_timesteps")
    if timesteps and int(synth["steps"]) > int(timesteps):
        out.append(f"synth.steps: {synth['steps']} > the {timesteps} training timesteps of {path}/scheduler")


def n_shards(config: dict) -> int:
    synth = config["synth"]
    return -(-int(synth["n_images"]) // int(synth["shard_size"]))


def shard_ids(config: dict) -> list[str]:
    """The ``{shard}`` wildcard values of the sampling jobs (:meth:`retflow.layout.Layout.synth_shard`)."""
    return [Layout.synth_shard(k) for k in range(n_shards(config))]


def tstr_dataset(config: dict, modality: str) -> str | None:
    """Labelled real dataset whose test split scores the train-on-synthetic classifier:
    ``synth.quality.tstr_dataset``, else the dataset of the first classification task of this
    modality that reads the conditioning label; None for an unconditional generator."""
    cond = condition(config, modality)
    if cond is None:
        return None
    given = config["synth"]["quality"]["tstr_dataset"]
    if given:
        return given
    for task in config["tasks"].values():
        ds = config["datasets"].get(task["dataset"])  # an unknown name is reported by retflow.config
        if (ds is not None and ds["modality"] == modality and task["type"] in CLASSIFICATION
                and task["label"] == cond["label"]):
            return task["dataset"]
    return None


def _check_levels(errors: list[str], key: str, net: dict, attention: bool) -> None:
    channels = net["channels"]
    groups = net["norm_num_groups"]
    bad = [c for c in channels if c % groups]
    if bad:
        errors.append(f"{key}.channels: {bad} not divisible by {key}.norm_num_groups {groups}")
    if attention:
        levels = net["attention_levels"]
        if len(levels) != len(channels):
            errors.append(f"{key}.attention_levels: {len(levels)} entries for {len(channels)} channels")
        heads = net["num_head_channels"]
        bad = [c for c, a in zip(channels, levels) if a and c % heads]
        if bad:
            errors.append(f"{key}.num_head_channels: {heads} does not divide the attention channels {bad}")


def _monai_errors(out: list[str], synth: dict) -> None:
    """Shapes and sampler settings of the MONAI autoencoder + diffusion UNet."""
    size = int(synth["image_size"])
    down = 2 ** (len(synth["autoencoder"]["channels"]) - 1)
    latent = size // down
    if size % down:
        out.append(f"synth.image_size: {size} is not divisible by the autoencoder's downsampling {down} "
                   f"(2 ** (len(synth.autoencoder.channels) - 1))")
    unet_down = 2 ** (len(synth["unet"]["channels"]) - 1)
    if latent % unet_down:
        out.append(f"synth.unet.channels: {len(synth['unet']['channels'])} levels downsample the {latent}x{latent} "
                   f"latent grid by {unet_down}, which does not divide it")
    _check_levels(out, "synth.autoencoder", synth["autoencoder"], attention=False)
    _check_levels(out, "synth.unet", synth["unet"], attention=True)
    if synth["scheduler"] == "ddpm" and int(synth["steps"]) != int(synth["train_timesteps"]):
        out.append(f"synth.steps: the DDPM sampler takes every one of the {synth['train_timesteps']} "
                   f"training timesteps (got {synth['steps']}); use scheduler: ddim for fewer steps")
    if int(synth["steps"]) > int(synth["train_timesteps"]):
        out.append(f"synth.steps: {synth['steps']} > synth.train_timesteps {synth['train_timesteps']}")


def errors(config: dict) -> list[str]:
    """Every problem of the ``synth`` section of a schema-valid config, each naming its key."""
    synth = config["synth"]
    if not synth["enabled"]:
        return []
    out: list[str] = []
    datasets = config["datasets"]
    mods = modalities(config)
    sd = bool(synth["sd_checkpoint"])
    if sd:
        _sd_errors(out, config, mods)
    elif synth["prompts"]:
        out.append("synth.prompts: text prompts are only used when fine-tuning a Stable-Diffusion pipeline "
                   "(synth.sd_checkpoint); remove them or set synth.sd_checkpoint")
    if not mods:
        out.append("synth.modalities: nothing to synthesise (no pretrain.pools and no synth.modalities)")
    for key in ("pools", "condition"):
        for m in synth[key]:
            if m not in mods:
                out.append(f"synth.{key}.{m}: modality '{m}' is not synthesised (synth.modalities {mods})")
    for m in mods:
        names = pools(config, m)
        if not names:
            out.append(f"synth.pools.{m}: no real dataset to learn from (set synth.pools.{m} or pretrain.pools.{m})")
        for name in names:
            if name not in datasets:
                out.append(f"synth.pools.{m}: unknown dataset '{name}'")
            elif datasets[name]["modality"] != m:
                out.append(f"synth.pools.{m}: dataset '{name}' has modality '{datasets[name]['modality']}'")
        cond = condition(config, m)
        if cond is not None:
            _check_condition(out, config, m, cond, [n for n in names if n in datasets])
    if not sd:  # the MONAI networks; a Stable-Diffusion fine-tune brings its own
        _monai_errors(out, synth)
    method = synth["quality"]["encoder_method"]
    if method not in config["pretrain"]["methods"]:
        out.append(f"synth.quality.encoder_method: '{method}' is not in pretrain.methods "
                   f"{list(config['pretrain']['methods'])} (its checkpoint is the feature space)")
    tstr = synth["quality"]["tstr_dataset"]
    if tstr is not None and tstr not in datasets:
        out.append(f"synth.quality.tstr_dataset: unknown dataset '{tstr}'")
    return out


def _check_condition(out: list[str], config: dict, m: str, cond: dict, names: list[str]) -> None:
    key = f"synth.condition.{m}"
    if len(set(cond["classes"])) != len(cond["classes"]):
        out.append(f"{key}.classes: duplicate class names {cond['classes']}")
    for name in names:  # phantoms: the label columns are known before the data exist
        ds = config["datasets"][name]
        ph = ds.get("phantom")  # only phantom datasets have the section (its absence: retflow.config's check)
        if ds["source"] != "phantom" or ph is None:
            continue
        if not ph["labelled"]:
            out.append(f"{key}.label: pool '{name}' is an unlabelled phantom (phantom.labelled: false), so it has "
                       f"no '{cond['label']}' column; set it labelled or drop the condition (unconditional)")
        elif cond["label"] not in PHANTOM_LABELS[ph["kind"]]:
            out.append(f"{key}.label: phantom pool '{name}' ({ph['kind']}) has no column '{cond['label']}' "
                       f"(it has {sorted(PHANTOM_LABELS[ph['kind']])})")
    tstr = tstr_dataset(config, m)
    if tstr is not None and tstr in config["datasets"] and config["datasets"][tstr]["modality"] != m:
        out.append(f"synth.quality.tstr_dataset: dataset '{tstr}' has modality "
                   f"'{config['datasets'][tstr]['modality']}', not '{m}'")


def _section(record: type, section: dict, **fixed) -> dict:
    """The record's fields from a config section plus ``fixed`` values (which win)."""
    out = {f.name: section[f.name] for f in dataclasses.fields(record) if f.name in section}
    out.update(fixed)
    return out


def modality_settings(config: dict, modality: str) -> SynthSettings:
    """The generator of ``modality``: what its training and sampling jobs run with (rules/synth.smk)."""
    synth = config["synth"]
    sd = synth["sd_checkpoint"]
    data = _section(SynthSettings, synth, modality=modality, condition=condition(config, modality),
                    sd_checkpoint=str(sd) if sd else None, prompts=sd_prompts(config, modality) if sd else None,
                    labelled_pool_splits=config["pretrain"]["labelled_pool_splits"],
                    device=config["device"])
    return SynthSettings.from_dict(data, f"synth ({modality})")


def quality_settings(config: dict, modality: str) -> SynthQualitySettings:
    """The quality checks of ``modality``'s synthetic store: ``synth.quality``, the TSTR set, the encoder's ViT."""
    from retflow.settings import build

    data = _section(SynthQualitySettings, config["synth"]["quality"], modality=modality,
                    condition=condition(config, modality), tstr_dataset=tstr_dataset(config, modality),
                    vit=build.vit(config, modality), normalize=build.normalize(config, modality),
                    seed=config["synth"]["seed"], device=config["device"])
    return SynthQualitySettings.from_dict(data, f"synth.quality ({modality})")
