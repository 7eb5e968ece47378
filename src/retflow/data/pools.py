"""Which images of a prepared store a pretraining (or generator) pool may use.

A ``pretrain`` role dataset is all split ``pool``: it gives the pool every image. A labelled (or
external) dataset named in a pool gives only the splits in ``pretrain.labelled_pool_splits``
(schema default ``[train]``): its test images -- and by default its validation images -- never
reach the encoder that its own tasks then evaluate. :func:`pool_mask` is the one place this rule
lives; the pretraining pool (:func:`retflow.train.pretrain.build_pool`), the generator's pool
(:class:`retflow.synth.pool.PoolImages`), the leakage check and the pre-flight gate all call it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

POOL_SPLIT = "pool"  # the split of every image of a role: pretrain dataset


def pool_mask(manifest: pd.DataFrame, labelled_splits: Sequence[str]) -> np.ndarray:
    """Boolean mask of the manifest rows a pool may use: split ``pool``, or one of ``labelled_splits``."""
    return manifest["split"].isin([POOL_SPLIT, *labelled_splits]).to_numpy()


def pool_indices(manifest: pd.DataFrame, labelled_splits: Sequence[str]) -> np.ndarray:
    """Store indices (the manifest's ``index``, in manifest order) of the rows a pool may use."""
    return manifest["index"].to_numpy()[pool_mask(manifest, labelled_splits)]


def pool_members(config: dict) -> dict[str, list[str]]:
    """``{dataset: [config key of each pool it is in]}`` for the pools the workflow trains on:
    ``pretrain.pools.<modality>`` of every modality with a pretraining run on real images, and
    the generator's pools (``synth.pools.<modality>``, default the pretraining pool) when
    ``synth.enabled``."""
    from retflow import config as rfc

    out: dict[str, list[str]] = {}
    real = {modality for run, modality in rfc.pretrain_runs(config) if rfc.parse_pretrain_run(run)[1] != "synthetic"}
    for modality in sorted(real):
        for name in config["pretrain"]["pools"].get(modality) or []:
            out.setdefault(name, []).append(f"pretrain.pools.{modality}")
    if config["synth"]["enabled"]:
        from retflow.synth import settings as synth_cfg

        for modality in synth_cfg.modalities(config):
            for name in synth_cfg.pools(config, modality):
                out.setdefault(name, []).append(f"synth.pools.{modality}")
    return out


def pool_splits(config: dict) -> dict[str, list[str]]:
    """``{dataset: labelled splits it gives a pool}`` for every pool member (see :func:`pool_members`)."""
    splits = list(config["pretrain"]["labelled_pool_splits"])
    return {name: splits for name in sorted(pool_members(config))}
