"""The 3-D (volume) parts of training: the mae3d pool, a volume run's rows and datasets, the 3-D classifier.

A volume model (``models.<name>.input: volume``, :mod:`retflow.volume_config`) reads a store's whole
volumes (``volume_shards/``) with :class:`~retflow.data.volume_dataset.VolumeDataset`: one item
per volume, the manifest row of its first B-scan (:func:`~retflow.data.volume_dataset.volume_rows`)
giving its split, label and ``image_id``. Everything else -- the epoch loop, targets, resume,
predictions -- is the 2-D code's (:mod:`retflow.train.finetune`, :mod:`retflow.train.pretrain`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from retflow.checkpoint_file import CheckpointError
from retflow.data.dataset import load_manifest
from retflow.data.pools import pool_mask
from retflow.data.volume_dataset import VolumeDataset, volume_rows
from retflow.models.mae3d import VisionTransformer3D, vit3d
from retflow.settings.checks import VOLUME  # FinetuneSettings.input / best.pth 'input' of a 3-D model
from retflow.settings.stages import FinetuneSettings


def volume_pool(stores: Sequence[str], normalize: dict, splits: Sequence[str],
                train: bool = True) -> torch.utils.data.ConcatDataset | None:
    """The volumes mae3d pretrains on: of each store the volumes a pool may use (a pretrain dataset's all,
    a labelled one's ``splits``: :func:`retflow.data.pools.pool_mask` on one row per volume); ``train``:
    random A-scan-axis flips."""
    if not stores:
        return None
    parts = []
    for store in stores:
        rows = volume_rows(load_manifest(store))
        parts.append(VolumeDataset(store, rows[pool_mask(rows, splits)], None, normalize, train=train))
    return torch.utils.data.ConcatDataset(parts)


def per_volume(manifest: pd.DataFrame, targets: np.ndarray, valid: np.ndarray
               ) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """A store's manifest rows (with their targets and validity) reduced to one per volume, the first of its
    B-scan rows (:func:`volume_rows`): its split, label and ``image_id`` are the volume's, in training and in
    prediction alike."""
    first = volume_rows(manifest.reset_index(drop=True)).index.to_numpy()
    return manifest.iloc[first].reset_index(drop=True), targets[first], valid[first]


def volume_datasets(s: FinetuneSettings, store: str, manifest: pd.DataFrame,
                    parts: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, VolumeDataset]:
    """``{split: VolumeDataset}`` of a volume run: ``parts`` maps a split to (rows of ``manifest``, one per
    volume; their targets); the training split flips (probe_logreg: embeddings of the volumes as stored)."""
    norm = s.normalize.to_dict()
    return {split: VolumeDataset(store, manifest.iloc[rows], labels, norm,
                                 train=split == "train" and s.protocol != "probe_logreg")
            for split, (rows, labels) in parts.items()}


def _pretraining_grid(state: Mapping) -> tuple[int, int, int] | None:
    """The tubelet grid an mae3d checkpoint was pretrained with (its ``args.vit3d``), if it says."""
    args = state.get("args")
    vit = args.get("vit3d") if isinstance(args, Mapping) else None
    if not isinstance(vit, Mapping):
        return None
    return tuple(int(s) // int(t) for s, t in zip(vit["img_size"], vit["tubelet"]))


def volume_classifier(s: FinetuneSettings, n_out: int, drop_path: float, init_path: str | None) -> VisionTransformer3D:
    """The run's 3-D ViT (``vit3d``, the model's pooling) with ``n_out`` outputs; its encoder from an
    mae3d ``checkpoint.pth`` at ``init_path`` (:func:`load_mae3d_encoder`; RETFound recipe: decoder dropped,
    head re-initialised, position table resized to the configured grid)."""
    model = vit3d(s.vit3d.spec(), num_classes=n_out, global_pool=s.pool, drop_path_rate=drop_path)
    if not init_path:
        return model
    report = load_mae3d_encoder(model, init_path)
    print(f"loaded 3-D encoder from {init_path}: {len(model.state_dict()) - len(report['missing'])} tensors, "
          f"fresh {', '.join(report['missing']) or 'none'}; dropped {len(report['dropped'])}", flush=True)
    return model


def load_mae3d_encoder(model: VisionTransformer3D, init_path: str | Path) -> dict[str, list[str]]:
    """Load the encoder of an mae3d ``checkpoint.pth`` at ``init_path`` (this DAG's run or a file from
    another: ``init: file``) into ``model`` (:meth:`VisionTransformer3D.load_encoder_from_mae`; a model on
    the ``meta`` device: shapes checked, nothing loaded); a problem is a CheckpointError naming the file."""
    from retflow.train.checkpoint import load_state

    state = load_state(init_path)
    weights = state.get("model") if isinstance(state, Mapping) else None
    if not isinstance(weights, Mapping):
        raise CheckpointError(f"{init_path}: no 'model' state dict; a volume model starts from an mae3d run's "
                              f"checkpoint.pth")
    try:
        return model.load_encoder_from_mae(weights, src_grid=_pretraining_grid(state))
    except CheckpointError as exc:
        raise CheckpointError(f"{init_path}: {exc}") from None


def volume_checkpoint(path: str | Path) -> Mapping | None:
    """The object of a volume model's fine-tuned ``best.pth`` (``input: volume``) at ``path``, else None (an
    export folder, a 2-D file: memory-mapped, so its tensors are not read); a bad file is a CheckpointError."""
    from retflow.train.checkpoint import load_state

    path = Path(path)
    if not path.is_file():
        return None
    state = load_state(path)
    return state if isinstance(state, Mapping) and state.get("input") == VOLUME else None


def load_volume_classifier(path: str | Path, state: Mapping) -> VisionTransformer3D:
    """The 3-D classifier of a volume model's ``best.pth`` (``state``: its object, :func:`volume_checkpoint`),
    rebuilt exactly from what it records (``spec`` = the vit3d section, ``task_spec``, ``pool``,
    ``probe_head``), in eval mode on CPU; a file that does not match raises a CheckpointError naming it."""
    from retflow.models.mae3d import ViT3DSpec
    from retflow.models.vit import attach_probe_head
    from retflow.settings.stages import TaskSettings
    from retflow.train.targets import n_outputs

    try:
        spec, task = ViT3DSpec.from_dict(state["spec"]), TaskSettings.from_dict(state["task_spec"])
        model = vit3d(spec, num_classes=n_outputs(task), global_pool=state["pool"], drop_path_rate=0.0)
        if state.get("probe_head"):
            attach_probe_head(model)
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a loadable volume model's best.pth ({first})") from None
    return model.eval()
