"""Where the synthetic branch writes (relative to the workflow's ``results`` folder)."""

from __future__ import annotations


def synth_dir(results: str, modality: str) -> str:
    return f"{results}/synth/{modality}"


def store_dir(results: str, modality: str) -> str:
    """The synthetic store of a modality: ``shards/`` + ``manifest.parquet``, like a prepared dataset."""
    return f"{synth_dir(results, modality)}/store"


def store_manifest(results: str, modality: str) -> str:
    return f"{store_dir(results, modality)}/manifest.parquet"


def shard_name(k: int) -> str:
    """Sampling job ``k`` (the ``{shard}`` wildcard)."""
    return f"{k:05d}"
