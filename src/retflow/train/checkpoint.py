"""Atomic checkpoint writing and safe (``weights_only``) reading.

Checkpoints are read by :func:`retflow.checkpoint_file.read_file` (the one reader of
every stage: ``torch.load(weights_only=True)``, memory-mapped), which refuses
arbitrary pickled objects with a one-line message naming the file and the global.
Checkpoint dicts must therefore hold only tensors, numbers, strings, ``None``,
lists, tuples and dicts: model / optimizer / GradScaler ``state_dict()``s qualify;
numpy arrays, ``pathlib.Path`` etc. do not.  RNG states are stored as tensors via
:func:`capture_rng_state` / :func:`restore_rng_state`.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retflow.atomic import atomic_path
from retflow.checkpoint_file import read_file

__all__ = ["save_atomic", "load_state", "capture_rng_state", "restore_rng_state"]


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` via :func:`retflow.atomic.atomic_path`, fsynced before the rename.

    A crash leaves either the old file or the new one, never a partial file;
    the temp file is removed on error.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
    try:  # persist the rename itself (best effort; not possible on every OS)
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def load_state(path: str | os.PathLike) -> Any:
    """A checkpoint's object on CPU (``weights_only=True``; see :func:`retflow.checkpoint_file.read_file`).

    Raises ``FileNotFoundError`` or :class:`retflow.checkpoint_file.CheckpointError` (a
    ``ValueError``), one line naming the file.
    """
    return read_file(Path(path))


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA, if initialised) RNG states as weights_only-safe values."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA state restored only if present and CUDA is available)."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
