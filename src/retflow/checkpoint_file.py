"""Reading a checkpoint from disk: the one place retflow calls ``torch.load`` or safetensors.

:func:`read_file` reads

* a torch file (``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt``, zip or legacy format) with
  ``torch.load(weights_only=True)``, memory-mapped where the format allows it (a large file's
  optimizer state is then never read into memory); ``argparse.Namespace`` and numpy scalars /
  dtypes are allow-listed (MAE / RETFound / timm training checkpoints store their ``args`` and
  metrics that way);
* a ``.safetensors`` file (a flat dict of tensors);
* a folder written by ``retflow export`` (``config.json`` + ``model.safetensors``), or that
  ``model.safetensors`` itself: ``{"model": <tensors>, "export_config": <config.json>}``.

Every other reader (layouts, encoder loading, MAE init, resume / ``best.pth`` state, the SSL
teacher, synthetic-image models) goes through it.  Problems are :class:`CheckpointError` (a
``ValueError``) or ``FileNotFoundError``, one line naming the file.  A pickle that needs anything
besides tensor containers (``os.system``, ``datetime.date``, a numpy array ...) is refused by
torch's safe unpickler; :class:`RefusedCheckpoint` then names the file and the refused globals,
read from the pickle's opcodes without executing any of them.  Nothing ever turns the safe
unpickler off.

This module imports nothing heavy at import time (the startup config check uses
:func:`export_folder_problem`).
"""
from __future__ import annotations

import io
import json
import pickle
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any, Iterator

from retflow.errors import UserError

__all__ = [
    "EXPORT_CONFIG",
    "EXPORT_WEIGHTS",
    "CheckpointError",
    "RefusedCheckpoint",
    "export_folder_problem",
    "read_file",
    "refused_globals",
    "safe_globals",
]

EXPORT_CONFIG = "config.json"
EXPORT_WEIGHTS = "model.safetensors"

# how a few dangerous callables are spelled in a pickle, and the name a user knows them by
_ALIASES = {"posix": "os", "nt": "os", "__builtin__": "builtins"}
_STRING_OPS = frozenset({"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
                         "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_NO_PUSH_OPS = frozenset({"PROTO", "FRAME", "MEMOIZE", "STOP", "MARK", "POP", "POP_MARK"}) | _PUT_OPS


class CheckpointError(UserError):
    """A file that is not a usable checkpoint; the message (one line) names the file."""


class RefusedCheckpoint(CheckpointError):
    """A pickle that references non-tensor globals; refused without unpickling anything."""

    def __init__(self, path: str | Path, globals_: list[str]):
        self.path = str(path)
        self.globals = list(globals_)
        shown = ", ".join(_display(g) for g in self.globals[:5])
        more = f" and {len(self.globals) - 5} more" if len(self.globals) > 5 else ""
        verb = "is" if len(self.globals) == 1 else "are"
        super().__init__(
            f"{path}: refused to unpickle: the file references {shown}{more}, which {verb} not part of a "
            "checkpoint of tensors and could run code when unpickled; nothing in it was executed. Use weights "
            "published as .safetensors, or convert this file's state dict to .safetensors in a trusted, "
            "isolated environment (safetensors.torch.save_file)"
        )


def _display(name: str) -> str:
    module, _, attr = name.rpartition(".")
    alias = _ALIASES.get(module)
    return f"{name} (= {alias}.{attr})" if alias else name


# ------------------------------------------------------------------------------ export folders
def export_folder_problem(folder: str | Path) -> str | None:
    """``None`` when ``folder`` holds a ``retflow export`` (config.json + model.safetensors), else why not.

    Cheap (no tensor is read): the startup check calls it for every configured weights folder.
    """
    folder = Path(folder)
    cfg = folder / EXPORT_CONFIG
    weights = folder / EXPORT_WEIGHTS
    if not cfg.is_file() and not weights.is_file():
        return (f"a folder without {EXPORT_CONFIG} and {EXPORT_WEIGHTS}, not an exported model "
                "(give a weights file, or a folder written by `retflow export`)")
    if not cfg.is_file():
        return f"an export folder without {EXPORT_CONFIG} (`retflow export` writes it next to {EXPORT_WEIGHTS})"
    if not weights.is_file():
        return f"an export folder without {EXPORT_WEIGHTS} (`retflow export` writes it next to {EXPORT_CONFIG})"
    return None


def _read_export(folder: Path) -> dict[str, Any]:
    problem = export_folder_problem(folder)
    if problem:
        raise CheckpointError(f"{folder}: {problem}")
    cfg_path = folder / EXPORT_CONFIG
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{cfg_path}: unreadable export config ({type(exc).__name__}: {exc})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: the export config is a {type(cfg).__name__}, not a JSON object")
    return {"model": _read_safetensors(folder / EXPORT_WEIGHTS), "export_config": cfg}


# ------------------------------------------------------------------------------ reading
def safe_globals() -> list:
    """Globals allow-listed besides torch's own: ``argparse.Namespace``, numpy scalars and dtypes."""
    import argparse

    allowed: list = [argparse.Namespace]
    try:  # numpy scalars / dtypes in saved metrics (allow-listed the way torch documents it)
        import numpy as np

        try:
            from numpy._core.multiarray import scalar
        except ImportError:  # numpy < 2
            from numpy.core.multiarray import scalar  # type: ignore[no-redef]
        allowed += [scalar, np.dtype]
        allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    except Exception:  # pragma: no cover - numpy missing or unusual
        pass
    return allowed


def read_file(path: str | Path) -> Any:
    """The object stored in a checkpoint file or export folder (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        return _read_export(path)
    if path.name == EXPORT_WEIGHTS and (path.parent / EXPORT_CONFIG).is_file():
        return _read_export(path.parent)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file (a device, FIFO or socket), not a checkpoint")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _read_torch(path)


def _read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(exc).__name__}: "
                              f"{_first_line(str(exc))})") from None


def _read_torch(path: Path) -> Any:
    import warnings

    import torch

    try:
        with torch.serialization.safe_globals(safe_globals()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            try:  # memory-mapped: tensors are paged in on use
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except pickle.UnpicklingError:  # refused by the safe unpickler: no second try
                raise
            except (RuntimeError, OSError, ValueError):  # legacy (non-zip) format, or no mmap here
                return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        refused = refused_globals(path)
        if not refused:  # the scan missed it: take the name from torch's own message
            m = re.search(r"GLOBAL ([\w.]+)", str(exc))
            refused = [m.group(1)] if m else []
        if refused:
            raise RefusedCheckpoint(path, refused) from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({type(exc).__name__}: {_torch_detail(exc)})") \
            from None


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _torch_detail(exc: BaseException) -> str:
    """The useful line of a torch.load error, without torch's advice to turn the safe unpickler off."""
    text = str(exc)
    m = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    line = _first_line(m.group(1)) if m else _first_line(text)
    if re.search(r"weights_only", line) and re.search(r"False", line):
        line = "refused by the safe unpickler"
    return line or "unreadable"


# ------------------------------------------------------------------------------ naming refused globals
def _pickle_streams(path: Path) -> Iterator[bytes]:
    """The pickles of a torch file: ``*/data.pkl`` of a zip checkpoint, else the file itself."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                for name in zf.namelist():
                    if name.endswith(".pkl"):
                        yield zf.read(name)
            return
        with open(path, "rb") as fh:
            yield fh.read(64 << 20)  # legacy format: a few pickles, then raw storages
    except (OSError, zipfile.BadZipFile, RuntimeError):
        return


def _globals_in(data: bytes) -> list[str]:
    """``module.name`` of every GLOBAL / INST / STACK_GLOBAL in consecutive pickles; nothing is executed."""
    found: list[str] = []
    stream = io.BytesIO(data)
    for _ in range(8):  # the legacy format stores several pickles back to back
        start = stream.tell()
        if start >= len(data):
            break
        memo: dict[Any, Any] = {}
        recent: list[Any] = []  # values of the last pushes (None: not a string)
        try:
            for op, arg, _pos in pickletools.genops(stream):
                name = op.name
                if name in ("GLOBAL", "INST"):
                    module, _, attr = str(arg).partition(" ")
                    found.append(f"{module}.{attr}")
                    recent.append(None)
                elif name == "STACK_GLOBAL":
                    module, attr = recent[-2:] if len(recent) >= 2 else (None, None)
                    if module and attr:  # else not resolvable here: torch's message names it
                        found.append(f"{module}.{attr}")
                    recent.append(None)
                elif name in _STRING_OPS:
                    recent.append(arg.decode("latin-1") if isinstance(arg, bytes) else str(arg))
                elif name == "MEMOIZE":
                    memo[len(memo)] = recent[-1] if recent else None
                elif name in _PUT_OPS:
                    memo[arg] = recent[-1] if recent else None
                elif name in _GET_OPS:
                    recent.append(memo.get(arg))
                elif name not in _NO_PUSH_OPS:
                    recent.append(None)
                del recent[:-4]
        except Exception:  # not (or no longer) a pickle: the raw data after the legacy pickles
            break
        if stream.tell() == start:
            break
    return found


def _allowed_names() -> set[str]:
    names = {f"{o.__module__}.{o.__qualname__}" for o in safe_globals()}
    try:  # torch's own allow-list (private; the name-prefix rule below covers its absence)
        from torch._weights_only_unpickler import _get_allowed_globals

        names |= set(_get_allowed_globals())
    except Exception:  # pragma: no cover
        pass
    return names


def refused_globals(path: str | Path) -> list[str]:
    """Globals a torch file's pickle references that the safe unpickler does not allow (in order, once each).

    Read from the pickle opcodes with :mod:`pickletools`, which executes nothing.  torch's own
    types and rebuild functions count as allowed.
    """
    allowed = _allowed_names()
    out: list[str] = []
    for data in _pickle_streams(Path(path)):
        for name in _globals_in(data):
            module = name.split(".", 1)[0]
            if name in allowed or module == "torch" or name in out:
                continue
            out.append(name)
    return out
