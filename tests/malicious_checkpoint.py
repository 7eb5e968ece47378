"""A checkpoint whose pickle runs ``os.system`` when unpickled freely, and what a refusal must say.

``write(path, fmt)`` writes one into ``path``: ``torch`` (``torch.save``, zip format, the payload
next to real weights), ``legacy`` (torch's pre-1.6 format) or ``pickle2`` / ``pickle5``
(``pickle.dump`` at that protocol, as a hand-made ``.pth``).  The payload writes ``MARKER`` into
the current directory: tests run with ``monkeypatch.chdir(tmp_path)`` and assert it never appears.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

MARKER = "marker"
FORMATS = ("torch", "legacy", "pickle2", "pickle5")


class Payload:
    def __reduce__(self):
        return (os.system, (f"echo pwned > {MARKER}",))


def write(path: Path, fmt: str = "torch") -> Path:
    obj = {"model": {"blocks.0.attn.qkv.weight": torch.zeros(2, 2)}, "args": Payload()}
    if fmt == "torch":
        torch.save(obj, path)
    elif fmt == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as fh:
            pickle.dump(obj, fh, protocol=int(fmt[-1]))
    return path


def assert_refusal(message: str, path: Path, cwd: Path) -> None:
    """Refused in one line naming the file and the global, no advice to turn the protection off,
    and the payload did not run."""
    assert "\n" not in message.strip(), message
    assert str(path) in message or path.name in message, message
    assert "posix.system" in message and "os.system" in message, message
    assert "refused" in message, message
    lowered = message.lower()
    assert "weights_only=false" not in lowered.replace(" ", "") and "set to false" not in lowered, message
    assert not (cwd / MARKER).exists(), "the payload ran"
