"""A resume checkpoint belongs to the run that wrote it.

Training jobs write ``<out>/resume/last.pth`` so a killed or requeued job continues where it
stopped.  The folder is not a Snakemake output, so it survives when Snakemake reruns the job
because its settings or inputs changed (new ``epochs``, another pretrained encoder, a rebuilt
store).  Continuing from that file would silently hand back the *old* run's weights, so every
resume checkpoint carries a fingerprint of what produced it: the settings (less the purely
operational keys), the process count, and the size + modification time of each input file.  A
checkpoint with another fingerprint (or none) is reported and ignored; the new run starts from
its first step and overwrites it at its first save.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

from retflow.train.checkpoint import load_state

__all__ = ["OPERATIONAL_KEYS", "file_stamp", "run_fingerprint", "load_resume"]

#: settings that change how a run is executed, not what it computes
OPERATIONAL_KEYS = frozenset({"num_workers", "checkpoint_every_steps", "device", "compile"})


def file_stamp(path: str | os.PathLike | None) -> list:
    """``[path, size, mtime_ns]`` of an input file (``[path, None, None]`` when absent or not given)."""
    if not path:
        return [None, None, None]
    try:
        st = Path(path).stat()
    except OSError:
        return [str(path), None, None]
    return [str(path), st.st_size, st.st_mtime_ns]


def run_fingerprint(settings, files: Iterable[str | os.PathLike | None] = (), **extra: Any) -> str:
    """SHA-256 of the settings (a settings record or a dict; without :data:`OPERATIONAL_KEYS`), the input
    files' stamps and ``extra``."""
    settings = settings.to_dict() if hasattr(settings, "to_dict") else settings
    kept = {k: v for k, v in settings.items() if k not in OPERATIONAL_KEYS}
    payload = [kept, [file_stamp(f) for f in files], extra]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def load_resume(path: str | os.PathLike, fingerprint: str, report: bool = True) -> dict | None:
    """The state in ``path`` if it exists and was written with ``fingerprint``; otherwise ``None``
    (a checkpoint of another run is left to be overwritten, and said on stdout when ``report``)."""
    path = Path(path)
    if not path.exists():
        return None
    state = load_state(path)
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        if report:
            print(f"ignoring {path}: written by a run with other settings or inputs; training from the start",
                  flush=True)
        return None
    return state


def resume_training(model, optimizer, out_dir: str | os.PathLike, fingerprint: str) -> tuple[int, float, list]:
    """``(start epoch, best validation score, epoch log)`` of a supervised run in ``out_dir``: from its
    ``resume/last.pth`` when that was written by this run (``fingerprint``) and its ``resume/best.pth``
    exists (model and optimizer restored), else a fresh start ``(0, -inf, [])``."""
    resume_path = Path(out_dir) / "resume" / "last.pth"
    state = load_resume(resume_path, fingerprint) if (Path(out_dir) / "resume" / "best.pth").exists() else None
    if state is None:
        return 0, -math.inf, []
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    print(f"Resuming from {resume_path}: epoch {state['epoch']}", flush=True)
    return state["epoch"], state["best"], state["log"]
