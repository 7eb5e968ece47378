"""Run a trained model on image files: embeddings and class probabilities.

Every input goes through the data stage's own reading, checks and preprocessing
(:func:`retflow.data.preprocess.preprocess_image`): an input the data stage would quarantine
(missing, not a regular file -- a device, FIFO or a link to one --, empty, not an image,
truncated, multi-frame, smaller than ``preprocess.min_side``, blank / near-constant, for CFP
grayscale or without a fundus field) is not scored but becomes a row with ``status``
``quarantined`` and the data stage's ``reason`` / ``detail``; nothing is skipped silently.  Scored
images: CFP fundus-field crop, pad to square, optional contrast enhancement, resize; OCT B-scans
robust intensity scaling, one channel; then the evaluation transform (resize to the model's input
size, /255, the model's normalisation).

Folders are searched recursively and every file in them is an input, as in the data stage's
image folders (hidden files, whose names start with ``.``, are left out there too).

Progress bars use ``tqdm`` when it is importable (it is no dependency of retflow), else a plain
counter on stderr.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from retflow.atomic import atomic_path
from retflow.models.checkpoint_layouts import LoadedModel

__all__ = [
    "STATUS_OK",
    "STATUS_QUARANTINED",
    "Skipped",
    "collect_images",
    "prepare_image",
    "embed_images",
    "predict_images",
    "write_embeddings",
    "write_probabilities",
    "pick_device",
    "progress",
]

MODALITIES = ("cfp", "oct")
STATUS_OK = "ok"
STATUS_QUARANTINED = "quarantined"
#: the columns every output row starts with
ROW_COLUMNS = ("path", "status", "reason", "detail")


@dataclasses.dataclass(frozen=True)
class Skipped:
    """An input that produced no output: the data stage's quarantine ``reason`` and ``detail``."""

    path: str
    reason: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


def collect_images(inputs: Iterable[str | Path], recursive: bool = True) -> tuple[list[Path], list[Skipped]]:
    """The inputs to score: paths as given (checked when read), and every file of a folder.

    A folder contributes every entry that is not a folder and not hidden (sorted), whatever its
    type or suffix: a link to ``/dev/zero``, a FIFO or ``notes.txt`` is read and refused with its
    reason like any input.  Returns ``(paths, problems)``: a folder without files is a problem.
    Duplicates (same resolved path) are removed, order kept.
    """
    paths: list[Path] = []
    problems: list[Skipped] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            paths.append(p)

    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in (p.rglob("*") if recursive else p.iterdir())
                           if not f.name.startswith(".") and not f.is_dir())
            if not found:
                problems.append(Skipped(str(p), "no_files", "a folder without files"))
            for f in found:
                add(f)
        else:
            add(p)  # a missing path is reported once, by the data stage's file check
    return paths, problems


def prepare_image(path: str | Path, modality: str, size: int, *, min_side: int, enhance: str = "none",
                  crop_border: bool = True) -> tuple[np.ndarray, dict]:
    """Read, check and preprocess one image as the data stage does; ``(uint8 HxWxC, info)``.

    Raises :class:`retflow.data.io.UnreadableInput` with the data stage's quarantine reason.
    """
    from retflow.data.preprocess import preprocess_image

    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    img, info, _ = preprocess_image(path, modality, size, min_side, crop_border=crop_border, enhance=enhance)
    return img, info


def _to_model_input(img: np.ndarray, in_chans: int, transform) -> torch.Tensor:
    """HxWxC uint8 -> normalised CxHxW float, channels matched as ``StoreDataset`` does."""
    img = np.ascontiguousarray(img)
    if not img.flags.writeable:
        img = img.copy()
    t = torch.from_numpy(img).permute(2, 0, 1)
    if t.shape[0] == 1 and in_chans == 3:
        t = t.expand(3, -1, -1)
    elif t.shape[0] == 3 and in_chans == 1:
        t = t.float().mean(0, keepdim=True).round().to(torch.uint8)
    return transform(t)


# ----------------------------------------------------------------------------- progress
class _Counter:
    """Minimal progress display: ``desc: i/n`` on stderr, rewritten in place on a terminal."""

    def __init__(self, total: int, desc: str, stream=None):
        self.total, self.desc, self.n = total, desc, 0
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = max(1, total // 20)

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.tty:
            self.stream.write(f"\r{self.desc}: {self.n}/{self.total}")
            self.stream.flush()
        elif self.n == self.total or self.n % self.every < k:
            self.stream.write(f"{self.desc}: {self.n}/{self.total}\n")

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()


def progress(total: int, desc: str, enabled: bool = True):
    """A progress object with ``update(k)`` / ``close()``: tqdm if installed, else a counter."""
    if not enabled:
        class _Null:
            def update(self, k: int = 1) -> None: ...
            def close(self) -> None: ...
        return _Null()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Counter(total, desc)
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    return dev


# ----------------------------------------------------------------------------- running
@dataclasses.dataclass
class _Outcome:
    """What became of one input: an output vector and its preprocessing info, or why not."""

    path: str
    output: np.ndarray | None = None
    info: dict | None = None
    skipped: Skipped | None = None


def _run(lm: LoadedModel, paths: Sequence[str | Path], fn: Callable[[torch.Tensor], torch.Tensor], *,
         modality: str, batch_size: int, device, prep_size: int | None, enhance: str, crop_border: bool,
         min_side: int, show_progress: bool, desc: str) -> list[_Outcome]:
    """One :class:`_Outcome` per input, in order; inputs are checked and preprocessed one by one and
    scored in batches."""
    from retflow.data.dataset import eval_transform
    from retflow.data.io import UnreadableInput

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    spec = lm.spec
    transform = eval_transform(spec.img_size, lm.normalize, spec.in_chans)
    size = prep_size or spec.img_size
    device = pick_device(str(device))
    lm.model.to(device).eval()
    outcomes = [_Outcome(str(p)) for p in paths]
    pending: list[tuple[_Outcome, torch.Tensor]] = []

    def flush() -> None:
        if pending:
            out = fn(torch.stack([x for _, x in pending]).to(device)).float().cpu().numpy()
            for (o, _), row in zip(pending, out):
                o.output = row
            pending.clear()

    bar = progress(len(outcomes), desc, show_progress)
    try:
        with torch.inference_mode():
            for o in outcomes:
                try:
                    img, info = prepare_image(o.path, modality, size, min_side=min_side, enhance=enhance,
                                              crop_border=crop_border)
                    x = _to_model_input(img, spec.in_chans, transform)
                except UnreadableInput as exc:
                    o.skipped = Skipped(o.path, exc.reason, exc.detail)
                except MemoryError:  # as the data stage classifies a failure on one input
                    o.skipped = Skipped(o.path, "too_large", "out of memory while decoding")
                except Exception as exc:  # a library failing on one odd file must not stop the run
                    o.skipped = Skipped(o.path, "unreadable", f"{type(exc).__name__}: {exc}")
                else:
                    o.info = info
                    pending.append((o, x))
                bar.update(1)
                if len(pending) == batch_size:
                    flush()
            flush()
    finally:
        bar.close()
    return outcomes


def _frame(outcomes: list[_Outcome], columns: list[str], modality: str) -> pd.DataFrame:
    """The output table: ``path, status, reason, detail``, the outputs (NaN when not scored), and for
    CFP the data stage's boolean quality flags (``q_*``; empty when not scored)."""
    values = np.full((len(outcomes), len(columns)), np.nan, np.float32)
    for i, o in enumerate(outcomes):
        if o.output is not None:
            values[i] = o.output
    frame = pd.DataFrame({
        "path": [o.path for o in outcomes],
        "status": [STATUS_QUARANTINED if o.skipped else STATUS_OK for o in outcomes],
        "reason": [o.skipped.reason if o.skipped else "" for o in outcomes],
        "detail": [o.skipped.detail if o.skipped else "" for o in outcomes],
    })
    frame = pd.concat([frame, pd.DataFrame(values, columns=columns)], axis=1)
    if modality == "cfp":
        flags = sorted({k for o in outcomes if o.info for k, v in o.info.items()
                        if k.startswith("q_") and isinstance(v, bool)})
        for k in flags:
            frame[k] = pd.array([o.info.get(k) if o.info else None for o in outcomes], dtype="boolean")
    return frame


def _skipped(outcomes: list[_Outcome]) -> list[Skipped]:
    return [o.skipped for o in outcomes if o.skipped]


def embed_images(
    lm: LoadedModel, paths: Sequence[str | Path], *, modality: str = "cfp", batch_size: int = 16,
    device: str | torch.device = "cpu", prep_size: int | None = None, enhance: str = "none",
    crop_border: bool = True, min_side: int, show_progress: bool = True, refused: Sequence[Skipped] = (),
) -> tuple[pd.DataFrame, list[Skipped]]:
    """Embeddings: the model's pooled pre-logits features (``forward_head(pre_logits=True)``).

    Encoder with ``global_pool="token"``: the class token after the final norm (MAE linear
    probe); ``"avg"``: mean of patch tokens + ``fc_norm`` (RETFound); a fine-tuned classifier:
    its ``fc_norm`` output.  Returns ``(frame, skipped)``: one row per input (``path``, ``status``,
    ``reason``, ``detail``, ``emb_0 .. emb_{D-1}`` float32, NaN when not scored, CFP quality
    flags) and the inputs that were not scored.  ``min_side``: the data stage's
    ``preprocess.min_side``; ``refused``: inputs refused before reading (:func:`collect_images`'
    problems), listed after the others.
    """
    model = lm.model

    def fn(x):
        return model.forward_head(model.forward_features(x), pre_logits=True)

    outcomes = _run(lm, paths, fn, modality=modality, batch_size=batch_size, device=device, prep_size=prep_size,
                    enhance=enhance, crop_border=crop_border, min_side=min_side, show_progress=show_progress,
                    desc="embed") + [_Outcome(r.path, skipped=r) for r in refused]
    dim = int(getattr(model, "num_features", 0))
    dim = next((len(o.output) for o in outcomes if o.output is not None), dim)
    return _frame(outcomes, [f"emb_{i}" for i in range(dim)], modality), _skipped(outcomes)


def predict_images(
    lm: LoadedModel, paths: Sequence[str | Path], *, modality: str = "cfp", batch_size: int = 16,
    device: str | torch.device = "cpu", prep_size: int | None = None, enhance: str = "none",
    crop_border: bool = True, min_side: int, show_progress: bool = True, refused: Sequence[Skipped] = (),
) -> tuple[pd.DataFrame, list[Skipped]]:
    """Softmax probabilities of a fine-tuned classifier, one row per input: ``path``, ``status``,
    ``reason``, ``detail``, ``prob_<class>`` ... (NaN when not scored), ``pred`` (empty when not
    scored), CFP quality flags; and the inputs that were not scored (``refused``: as
    :func:`embed_images`)."""
    if lm.kind != "classifier" or not lm.classes:
        raise ValueError("predict needs a fine-tuned classifier checkpoint (best.pth or its export); "
                         f"{lm.report.path} is a pretrained encoder (layout {lm.report.layout})")
    model = lm.model

    def fn(x):
        return torch.softmax(model(x).float(), dim=1)

    outcomes = _run(lm, paths, fn, modality=modality, batch_size=batch_size, device=device, prep_size=prep_size,
                    enhance=enhance, crop_border=crop_border, min_side=min_side, show_progress=show_progress,
                    desc="predict") + [_Outcome(r.path, skipped=r) for r in refused]
    frame = _frame(outcomes, [f"prob_{c}" for c in lm.classes], modality)
    probs = frame[[f"prob_{c}" for c in lm.classes]].to_numpy()
    scored = frame["status"].to_numpy() == STATUS_OK
    pred = np.where(scored, np.asarray(lm.classes, dtype=object)[np.nan_to_num(probs).argmax(axis=1)], "")
    frame.insert(len(ROW_COLUMNS) + len(lm.classes), "pred", pred)
    return frame, _skipped(outcomes)


def write_embeddings(frame: pd.DataFrame, path: str | Path, metadata: dict | None = None) -> None:
    """Parquet, written atomically; ``metadata`` goes into the schema under ``retflow``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    if metadata:
        meta = dict(table.schema.metadata or {})
        meta[b"retflow"] = json.dumps(metadata, default=str).encode()
        table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_probabilities(frame: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
