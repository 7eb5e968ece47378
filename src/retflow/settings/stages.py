"""Typed, frozen settings of each stage: what one job of that stage runs with.

Built once from the validated config by :mod:`retflow.settings.build` (the rules hand them to
the entry points as JSON; a library user calls the same builders), written next to the job's
outputs as ``settings.json``. No field has a default: every value comes from the config, whose
defaults live in ``config/schema.yaml`` alone. ``tests/test_settings.py`` checks that each
record's fields are exactly its schema section's keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from retflow.settings.frozen import Frozen

frozen = dataclasses.dataclass(frozen=True)


# ------------------------------------------------------------------------------ shared parts
@frozen
class ViTSettings(Frozen):
    """The ``vit`` section for one modality (``in_chans`` resolved)."""

    arch: str
    img_size: int
    patch_size: int
    in_chans: int
    model_kwargs: Mapping[str, Any]

    def spec(self):
        from retflow.models.vit import ViTSpec

        return ViTSpec.from_dict(self.to_dict())


@frozen
class ViT3DSettings(Frozen):
    """The ``vit3d`` section: the 3-D ViT of volume models and of mae3d (:mod:`retflow.models.mae3d`)."""

    img_size: tuple[int, int, int]
    tubelet: tuple[int, int, int]
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float

    def spec(self):
        from retflow.models.mae3d import ViT3DSpec

        return ViT3DSpec.from_dict(self.to_dict())


@frozen
class NormalizeSettings(Frozen):
    """Model-input intensity normalisation of a modality (``preprocess.<modality>.normalize``)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


@frozen
class TaskSettings(Frozen):
    """What a downstream job needs of its task (``tasks.<name>``)."""

    name: str
    type: str
    label: Any  # one column; a tuple of 0/1 columns (multilabel); None (segmentation)
    classes: tuple[str, ...]


@frozen
class EvaluateSettings(Frozen):
    """``evaluate``: the bootstrap."""

    n_boot: int
    seed: int


@frozen
class Schedule(Frozen):
    """A warmup + cosine learning-rate schedule over ``epochs`` (lr = blr x batch / 256, resolved)."""

    lr: float
    min_lr: float
    warmup_epochs: int
    epochs: int

    @classmethod
    def of(cls, s, batch: int) -> "Schedule":
        """The schedule of a record with ``blr``, ``min_lr``, ``warmup_epochs``, ``epochs`` at an (effective) batch."""
        return cls(lr=s.blr * batch / 256, min_lr=s.min_lr, warmup_epochs=s.warmup_epochs, epochs=s.epochs)


# ------------------------------------------------------------------------------ downstream
@frozen
class FoldSettings(Frozen):
    """A cross-validation run's fold (``splits.folds`` >= 2; :func:`retflow.data.splits.fold_split`):
    ``fold`` of ``folds``, the validation share of its training part (``splits.val / (train + val)``)
    and the seed of that carve (``splits.seed``)."""

    fold: int
    folds: int
    val_share: float
    seed: int


@frozen
class TrainingRun(Frozen):
    """What a fine-tune / probe run and a segmentation run share: the recipe keys both schema
    sections have, and the run itself."""

    epochs: int
    batch_size: int
    blr: float
    layer_decay: float
    weight_decay: float
    drop_path: float
    warmup_epochs: int
    min_lr: float
    crop_scale: tuple[float, float]
    min_steps: int
    num_workers: int
    # the run
    protocol: str
    task: TaskSettings
    vit: ViTSettings | None  # None: a volume model's run (FinetuneSettings.vit3d)
    normalize: NormalizeSettings
    fraction: float
    seed: int
    device: str
    fold: FoldSettings | None  # a cross-validation run's fold; None: the fixed split

    def schedule(self, batch: int) -> Schedule:
        return Schedule.of(self, batch)


@frozen
class LoraSettings(Frozen):
    """LoRA adapters of a ``lora`` run (``lora.rank``, ``alpha``, ``dropout``, ``target_modules``)."""

    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]


@frozen
class FinetuneSettings(TrainingRun):
    """One fine-tuning or linear-probe run (``finetune`` / ``probe_*`` section + the run)."""

    label_smoothing: float
    select_by: str
    augment: str
    auto_augment: str
    reprob: float
    color_jitter: float
    mixup: float
    cutmix: float
    mixup_prob: float
    mixup_switch_prob: float
    class_weights: str
    # protocol lora's adapters (the lora section's keys beyond the recipe); None for the other protocols
    lora: LoraSettings | None
    # the model's (models.<name>.pool): avg = mean patch token + fresh fc_norm (RETFound-MAE);
    # token = class token after the encoder's final norm (DINOv2 / RETFound-DINOv2)
    pool: str
    # the model's (models.<name>.input): image = the 2-D ViT (``vit``) on stored images; volume = the 3-D
    # ViT (``vit3d``; ``vit`` is then None) on the store's whole volumes (retflow.train.volume)
    input: str
    vit3d: ViT3DSettings | None  # None for an image model's run


@frozen
class SegmentSettings(TrainingRun):
    """One segmentation run (``segment`` section + the run)."""

    hflip: bool
    feature_size: int
    n_overlay: int
    model: str
    evaluate: EvaluateSettings


@frozen
class FusionInput(Frozen):
    """One modality of a fusion task (``tasks.<name>.fusion.cfp`` / ``oct``): its dataset, ViT and normalisation."""

    dataset: str
    vit: ViTSettings
    normalize: NormalizeSettings


@frozen
class PairingSettings(Frozen):
    """Pairing the two stores of a fusion task (:mod:`retflow.data.pairing`): by patient + eye
    (+ ``visit``), the label read from ``label_from``'s store (the task's ``dataset``), the
    ``splits`` section for re-splitting pairs whose stores disagree."""

    task: TaskSettings
    cfp: str
    oct: str
    label_from: str  # cfp | oct: the modality of tasks.<name>.dataset
    visit: str | None
    splits: Mapping[str, Any]


@frozen
class FusionSettings(Frozen):
    """One late-fusion run (``fusion`` section + the task's ``fusion`` block + the run;
    :mod:`retflow.train.fusion`)."""

    epochs: int
    batch_size: int
    blr: float
    layer_decay: float
    weight_decay: float
    drop_path: float
    label_smoothing: float
    warmup_epochs: int
    min_lr: float
    crop_scale: tuple[float, float]
    hflip: bool
    min_steps: int
    select_by: str
    class_weights: str
    num_workers: int
    # the task's fusion block
    cfp: FusionInput
    oct: FusionInput
    visit: str | None
    encoders: str  # frozen | finetune
    # the run
    protocol: str
    task: TaskSettings
    pool: str
    fraction: float
    seed: int
    device: str

    def schedule(self, batch: int) -> Schedule:
        return Schedule.of(self, batch)


# ------------------------------------------------------------------------------ pretraining
@frozen
class DecoderSettings(Frozen):
    """MAE's decoder (``pretrain.decoder``)."""

    embed_dim: int
    depth: int
    num_heads: int


@frozen
class ColourViews(Frozen):
    """The colour steps of a two-view method's augmentation (:mod:`retflow.data.ssl_views`)."""

    color_jitter: float
    grayscale_p: float
    solarize_p: float


VIEW_KEYS = tuple(f.name for f in dataclasses.fields(ColourViews))


@frozen
class SimCLRSettings(Frozen):
    proj_hidden_dim: int
    proj_dim: int
    proj_layers: int
    temperature: float
    drop_path_rate: float
    color_jitter: float
    grayscale_p: float
    solarize_p: float


@frozen
class MoCoV3Settings(Frozen):
    proj_hidden_dim: int
    proj_dim: int
    pred_hidden_dim: int
    temperature: float
    momentum: float
    freeze_patch_embed: bool
    sincos_pos_embed: bool
    drop_path_rate: float
    color_jitter: float
    grayscale_p: float
    solarize_p: float


@frozen
class DINOSettings(Frozen):
    out_dim: int
    hidden_dim: int
    bottleneck_dim: int
    head_layers: int
    student_temp: float
    teacher_temp: float
    warmup_teacher_temp: float
    warmup_teacher_temp_frac: float
    center_momentum: float
    momentum: float
    freeze_last_layer_frac: float
    drop_path_rate: float
    local_crops: int
    local_size: int
    local_crop_scale: tuple[float, float]
    color_jitter: float
    grayscale_p: float
    solarize_p: float


@frozen
class TokenReconSettings(Frozen):
    teacher_checkpoint: str  # resolved to a file (the DAG's own run of a method, or a local file)
    teacher_vit: Mapping[str, Any] | None
    noise_std: tuple[float, float]
    mask_ratio: tuple[float, float]
    predictor_hidden_dim: int
    cls_weight: float
    drop_path_rate: float


@frozen
class MAE3DSettings(Frozen):
    """``pretrain.mae3d``: the 3-D MAE's masking, decoder and loss target (:mod:`retflow.models.mae3d`)."""

    mask_ratio: float
    decoder: DecoderSettings
    norm_pix_loss: bool


METHOD_SETTINGS = {"simclr": SimCLRSettings, "mocov3": MoCoV3Settings, "dino": DINOSettings,
                   "token_recon": TokenReconSettings, "mae3d": MAE3DSettings}


@frozen
class PretrainSettings(Frozen):
    """One pretraining run: ``pretrain`` (with ``recipes.<method>`` applied) for one method + modality.

    Only the run's own method section is set (the others are None), so another method's settings
    never make this run stale. An mae3d run (whole OCT volumes) has ``vit3d`` and ``mae3d`` and no
    ``vit`` (None) nor ``init``; every other run has ``vit`` and ``vit3d`` None."""

    method: str
    data: str
    modality: str
    mask_ratio: float
    synthetic_epochs: int | None
    gpu_augment: Any  # auto | true | false
    compile: bool
    clip_grad: float | None
    decoder: DecoderSettings
    norm_pix_loss: bool
    epochs: int
    batch_size: int
    accum_iter: int
    blr: float
    min_lr: float
    warmup_epochs: int
    weight_decay: float
    crop_scale: tuple[float, float]
    init: str | None
    labelled_pool_splits: tuple[str, ...]  # what a labelled dataset in the pool gives it (retflow.data.pools)
    num_workers: int
    checkpoint_every_steps: int
    simclr: SimCLRSettings | None
    mocov3: MoCoV3Settings | None
    dino: DINOSettings | None
    token_recon: TokenReconSettings | None
    mae3d: MAE3DSettings | None
    vit: ViTSettings | None  # None: an mae3d run
    vit3d: ViT3DSettings | None  # an mae3d run's 3-D ViT; None for the others
    normalize: NormalizeSettings
    seed: int
    device: str

    @property
    def method_settings(self) -> Frozen | None:
        """The run's method section (None for MAE)."""
        return getattr(self, self.method) if self.method in METHOD_SETTINGS else None

    @property
    def is_mae(self) -> bool:
        """Whether the method is a masked autoencoder (mae, mae3d): a mask ratio per batch, a reconstruction figure."""
        return self.method in ("mae", "mae3d")

    @property
    def run_mask_ratio(self) -> float:
        """The masked autoencoder's ratio: ``pretrain.mae3d.mask_ratio`` for mae3d, else the modality's."""
        return self.mae3d.mask_ratio if self.method == "mae3d" else self.mask_ratio

    def schedule(self, eff_batch: int) -> Schedule:
        return Schedule.of(self, eff_batch)
