"""Typed, frozen settings of the synthetic branch (``synth:``; rules/synth.smk, :mod:`retflow.synth`).

Built once from the validated config by :func:`retflow.synth.settings.modality_settings` and
:func:`retflow.synth.settings.quality_settings` (the rules hand them to the entry points as JSON;
a library user calls the same builders), written next to each job's outputs as ``settings.json``.
No field has a default: every value comes from the config, whose defaults live in
``config/schema.yaml`` alone. The per-modality keys of the section (``condition.<modality>``,
``prompts.<modality>``, ``quality.tstr_dataset``) arrive resolved for the job's modality.
"""

from __future__ import annotations

import dataclasses

from retflow.settings.frozen import Frozen
from retflow.settings.stages import NormalizeSettings, ViTSettings

frozen = dataclasses.dataclass(frozen=True)


@frozen
class ConditionSettings(Frozen):
    """``synth.condition.<modality>``: the pools' label column a generator is conditioned on."""

    label: str
    classes: tuple[str, ...]  # class names as strings, in class-index order


@frozen
class AutoencoderSettings(Frozen):
    """``synth.autoencoder``: the KL autoencoder (MONAI ``AutoencoderKL``) and its training."""

    channels: tuple[int, ...]
    latent_channels: int
    num_res_blocks: int
    norm_num_groups: int
    kl_weight: float
    edge_weight: float
    epochs: int
    batch_size: int
    lr: float


@frozen
class UNetSettings(Frozen):
    """``synth.unet``: the latent diffusion UNet (MONAI ``DiffusionModelUNet``) and its training;
    with ``sd_checkpoint`` only ``epochs``, ``batch_size``, ``lr`` and ``cond_drop`` are used."""

    channels: tuple[int, ...]
    attention_levels: tuple[bool, ...]
    num_res_blocks: int
    num_head_channels: int
    norm_num_groups: int
    cond_drop: float
    epochs: int
    batch_size: int
    lr: float


#: the training stages of a generator and their records' field in :class:`SynthSettings`
STAGES = ("autoencoder", "unet")


@frozen
class SynthSettings(Frozen):
    """The generator of one modality: its training (rule ``synth_train``) and its sampling (``synth_sample``)."""

    modality: str
    condition: ConditionSettings | None  # None: unconditional
    image_size: int
    hflip: bool
    autoencoder: AutoencoderSettings
    unet: UNetSettings
    ema_decay: float
    train_timesteps: int
    beta_schedule: str
    prediction: str
    guidance_scale: float
    scheduler: str
    steps: int
    n_images: int
    shard_size: int
    sample_batch: int
    seed: int
    class_balance: str
    checkpoint_every_steps: int
    sd_checkpoint: str | None  # a local Stable-Diffusion pipeline folder to fine-tune instead of the MONAI model
    labelled_pool_splits: tuple[str, ...]  # pretrain.labelled_pool_splits: what a labelled pool member gives
    prompts: tuple[str, ...] | None  # with sd_checkpoint: one per class (or the one of an unconditional generator)
    device: str

    def stage(self, name: str) -> AutoencoderSettings | UNetSettings:
        """The settings of training stage ``name`` (``autoencoder`` | ``unet``)."""
        if name not in STAGES:
            raise ValueError(f"unknown generator training stage {name!r} (expected one of {list(STAGES)})")
        return getattr(self, name)

    @property
    def n_shards(self) -> int:
        """Sampling jobs: ``n_images`` cut into ``shard_size`` pieces."""
        return -(-int(self.n_images) // int(self.shard_size))


@frozen
class SynthQualitySettings(Frozen):
    """The quality checks of one modality's synthetic store (``synth.quality`` + the run; rule ``synth_quality``)."""

    encoder_method: str
    tstr_dataset: str | None  # resolved: the given one, else the first task's dataset reading the label
    max_synthetic: int
    max_real: int
    nn_size: int
    grid_per_class: int
    modality: str
    condition: ConditionSettings | None
    vit: ViTSettings  # the encoder's architecture (the modality's ViT)
    normalize: NormalizeSettings
    seed: int  # synth.seed
    device: str
