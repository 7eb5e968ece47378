"""Run a trained model on image files: embeddings and class probabilities.

Images go through the same steps as the workflow's prepared stores: CFP photographs through
:func:`retflow.data.preprocess.preprocess_cfp` (fundus-field crop, pad to square, optional
contrast enhancement, resize), OCT B-scans through :func:`~retflow.data.preprocess.preprocess_oct`
(robust intensity scaling, one channel); then the evaluation transform (resize to the model's
input size, /255, the model's normalisation).  An unreadable file is listed and skipped, never
fatal.

Progress bars use ``tqdm`` when it is importable (it is no dependency of retflow), else a plain
counter on stderr.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from retflow.atomic import atomic_path
from retflow.models.checkpoint_layouts import LoadedModel

__all__ = [
    "IMAGE_SUFFIXES",
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

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".ppm", ".pgm"})
MODALITIES = ("cfp", "oct")


@dataclasses.dataclass(frozen=True)
class Skipped:
    """An input that produced no output, and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def collect_images(inputs: Iterable[str | Path], recursive: bool = True) -> tuple[list[Path], list[Skipped]]:
    """Image files among ``inputs`` (files as given; folders searched for image suffixes).

    Returns ``(paths, problems)``: a missing path or a folder without images is a problem.
    Duplicates are removed, order kept (folders sorted).
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
                           if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."))
            if not found:
                problems.append(Skipped(str(p), "folder without image files"))
            for f in found:
                add(f)
        elif p.exists():
            add(p)
        else:
            problems.append(Skipped(str(p), "missing_file"))
    return paths, problems


def prepare_image(path: str | Path, modality: str, size: int, *, enhance: str = "none",
                  crop_border: bool = True) -> tuple[np.ndarray, dict]:
    """Read and preprocess one image as the workflow does; ``(uint8 HxWxC, info)``.

    Raises :class:`retflow.data.io.UnreadableInput` for files that cannot be used.
    """
    from retflow.data.io import read_image
    from retflow.data.preprocess import preprocess_cfp, preprocess_oct

    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    raw, orig = read_image(path, draft_size=2 * size)
    if modality == "cfp":
        img, info = preprocess_cfp(raw, size, crop_border, enhance, scale=orig[0] / raw.shape[0])
    else:
        img, info = preprocess_oct(raw, size)
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
def _batches(
    lm: LoadedModel, paths: Sequence[Path], modality: str, batch_size: int, prep_size: int | None,
    enhance: str, crop_border: bool, show_progress: bool, desc: str, skipped: list[Skipped],
) -> Iterator[tuple[list[str], list[dict], torch.Tensor]]:
    from retflow.data.dataset import eval_transform
    from retflow.data.io import UnreadableInput

    spec = lm.spec
    transform = eval_transform(spec.img_size, lm.normalize, spec.in_chans)
    size = prep_size or spec.img_size
    bar = progress(len(paths), desc, show_progress)
    names: list[str] = []
    infos: list[dict] = []
    tensors: list[torch.Tensor] = []
    try:
        for path in paths:
            try:
                img, info = prepare_image(path, modality, size, enhance=enhance, crop_border=crop_border)
                tensors.append(_to_model_input(img, spec.in_chans, transform))
                names.append(str(path))
                infos.append(info)
            except UnreadableInput as exc:
                skipped.append(Skipped(str(path), exc.reason + (f" ({exc.detail})" if exc.detail else "")))
            except Exception as exc:  # any other failure on one file must not stop the run
                skipped.append(Skipped(str(path), f"{type(exc).__name__}: {exc}"))
            bar.update(1)
            if len(tensors) == batch_size:
                yield names, infos, torch.stack(tensors)
                names, infos, tensors = [], [], []
        if tensors:
            yield names, infos, torch.stack(tensors)
    finally:
        bar.close()


def _run(lm, paths, fn: Callable[[torch.Tensor], torch.Tensor], *, modality, batch_size, device,
         prep_size, enhance, crop_border, show_progress, desc):
    skipped: list[Skipped] = []
    lm.model.to(device).eval()
    names: list[str] = []
    infos: list[dict] = []
    outs: list[np.ndarray] = []
    with torch.inference_mode():
        for b_names, b_infos, x in _batches(lm, paths, modality, batch_size, prep_size, enhance, crop_border,
                                            show_progress, desc, skipped):
            outs.append(fn(x.to(device)).float().cpu().numpy())
            names += b_names
            infos += b_infos
    out = np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)
    return names, infos, out, skipped


def embed_images(
    lm: LoadedModel, paths: Sequence[str | Path], *, modality: str = "cfp", batch_size: int = 16,
    device: str | torch.device = "cpu", prep_size: int | None = None, enhance: str = "none",
    crop_border: bool = True, show_progress: bool = True,
) -> tuple[pd.DataFrame, list[Skipped]]:
    """Embeddings: the model's pooled pre-logits features (``forward_head(pre_logits=True)``).

    Encoder with ``global_pool="token"``: the class token after the final norm (MAE linear
    probe); ``"avg"``: mean of patch tokens + ``fc_norm`` (RETFound); a fine-tuned classifier:
    its ``fc_norm`` output.  Returns ``(frame, skipped)``; the frame has ``path``, for CFP
    ``field_found``, and ``emb_0 .. emb_{D-1}`` (float32).
    """
    model = lm.model

    def fn(x):
        return model.forward_head(model.forward_features(x), pre_logits=True)

    names, infos, out, skipped = _run(lm, [Path(p) for p in paths], fn, modality=modality, batch_size=batch_size,
                                      device=pick_device(str(device)), prep_size=prep_size, enhance=enhance,
                                      crop_border=crop_border, show_progress=show_progress, desc="embed")
    dim = out.shape[1] if out.size else int(getattr(model, "num_features", 0))
    frame = pd.DataFrame({"path": names})
    if modality == "cfp":
        frame["field_found"] = [bool(i.get("field_found", True)) for i in infos]
    emb = pd.DataFrame(out.astype(np.float32).reshape(len(names), dim), columns=[f"emb_{i}" for i in range(dim)])
    return pd.concat([frame, emb], axis=1), skipped


def predict_images(
    lm: LoadedModel, paths: Sequence[str | Path], *, modality: str = "cfp", batch_size: int = 16,
    device: str | torch.device = "cpu", prep_size: int | None = None, enhance: str = "none",
    crop_border: bool = True, show_progress: bool = True,
) -> tuple[pd.DataFrame, list[Skipped]]:
    """Softmax probabilities of a fine-tuned classifier: ``path``, ``prob_<class>`` ..., ``pred``."""
    if lm.kind != "classifier" or not lm.classes:
        raise ValueError("predict needs a fine-tuned classifier checkpoint (best.pth or its export); "
                         f"{lm.report.path} is a pretrained encoder (layout {lm.report.layout})")
    model = lm.model

    def fn(x):
        return torch.softmax(model(x).float(), dim=1)

    names, infos, probs, skipped = _run(lm, [Path(p) for p in paths], fn, modality=modality,
                                        batch_size=batch_size, device=pick_device(str(device)),
                                        prep_size=prep_size, enhance=enhance, crop_border=crop_border,
                                        show_progress=show_progress, desc="predict")
    probs = probs.reshape(len(names), len(lm.classes))
    frame = pd.DataFrame({"path": names})
    for k, c in enumerate(lm.classes):
        frame[f"prob_{c}"] = probs[:, k]
    frame["pred"] = [lm.classes[i] for i in probs.argmax(axis=1)] if len(names) else []
    if modality == "cfp":
        frame["field_found"] = [bool(i.get("field_found", True)) for i in infos]
    return frame, skipped


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
