"""What a task's model predicts, per task type: targets from the manifest, head size, loss,
outputs -> probabilities, and the predictions-parquet format of :mod:`retflow.evaluate.evaluate`.

- binary / multiclass / ordinal: class indices, K logits, (class-weighted) cross entropy with
  label smoothing, softmax;
- multilabel: one 0/1 column per sign (``label`` is the list of columns), K logits, binary
  cross entropy per sign (positive-weighted when class weighting is on), sigmoid;
- regression: one float column, 1 output trained on the z-scored target (mean/std of the
  training rows, stored with the model), mean-squared error.

Every function takes the task as a :class:`~retflow.settings.stages.TaskSettings` (built by
:func:`retflow.settings.build.task`; its ``classes`` are resolved: multilabel signs default to the
columns, regression's one output is named after its column).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from retflow.atomic import atomic_path
from retflow.data.dataset import encode_labels
from retflow.data.labels import normalise_label
from retflow.settings.stages import TaskSettings

CLASSIFICATION = ("binary", "multiclass", "ordinal")


def label_columns(task: TaskSettings) -> list[str]:
    label = task.label
    return list(label) if isinstance(label, (list, tuple)) else [label]


def n_outputs(task: TaskSettings) -> int:
    return 1 if task.type == "regression" else len(task.classes)


def encode_targets(manifest: pd.DataFrame, task: TaskSettings) -> tuple[np.ndarray, np.ndarray]:
    """``(targets, valid mask)`` for every manifest row; invalid rows have no usable label."""
    cols = label_columns(task)
    missing = [c for c in cols if c not in manifest.columns]
    if missing:
        raise SystemExit(f"label column(s) {missing} not in the manifest (columns: {list(manifest.columns)})")
    kind = task.type
    if kind in CLASSIFICATION:
        return encode_labels(manifest[cols[0]], task.classes)
    if kind == "multilabel":
        values = np.full((len(manifest), len(cols)), -1.0)
        for j, col in enumerate(cols):
            canon = manifest[col].map(normalise_label)
            values[:, j] = canon.map({"0": 0.0, "1": 1.0}).fillna(-1.0).to_numpy(dtype=float)
        valid = (values >= 0).all(axis=1)
        return np.where(values < 0, 0.0, values).astype(np.float32), valid
    values = pd.to_numeric(manifest[cols[0]], errors="coerce").to_numpy(dtype=np.float64)
    valid = np.isfinite(values)
    return np.where(valid, values, 0.0).astype(np.float32), valid


def stratum(task: TaskSettings, targets: np.ndarray) -> np.ndarray:
    """A discrete value per row for stratified label fractions."""
    if task.type in CLASSIFICATION:
        return targets
    if task.type == "multilabel":
        return (targets * (2 ** np.arange(targets.shape[1]))).sum(axis=1).astype(int)
    edges = np.quantile(targets, [0.25, 0.5, 0.75]) if len(targets) else []
    return np.digitize(targets, edges)


def class_weights(task: TaskSettings, targets: np.ndarray, mode: str) -> torch.Tensor | None:
    """``balanced``: inverse class frequency (n / (K * n_c)); multilabel: negatives / positives."""
    if mode == "none" or task.type == "regression":
        return None
    if task.type == "multilabel":
        pos = targets.sum(axis=0)
        return torch.tensor((len(targets) - pos) / np.maximum(pos, 1.0), dtype=torch.float32)
    k = n_outputs(task)
    counts = np.bincount(targets.astype(int), minlength=k).astype(float)
    return torch.tensor(len(targets) / (k * np.maximum(counts, 1.0)), dtype=torch.float32)


@dataclass
class TargetScale:
    """Regression targets are learnt z-scored; predictions are mapped back."""

    mean: float = 0.0
    std: float = 1.0

    @classmethod
    def fit(cls, task: TaskSettings, targets: np.ndarray) -> "TargetScale":
        if task.type != "regression" or len(targets) == 0:
            return cls()
        return cls(float(np.mean(targets)), float(np.std(targets)) or 1.0)


def make_loss(task: TaskSettings, weights: torch.Tensor | None, smoothing: float, scale: TargetScale):
    """``loss(outputs, targets)``; targets may be soft (mixup) for classification."""
    kind = task.type
    F = torch.nn.functional

    def on(t, out):  # weights follow the outputs' device (training on GPU, validation on CPU)
        return None if t is None else t.to(out.device)

    if kind in CLASSIFICATION:

        def loss(out, y):
            if y.dtype.is_floating_point and y.ndim == 2:  # soft targets from mixup/cutmix
                w = on(weights, out)[None] if weights is not None else 1.0
                return -(y * torch.log_softmax(out, dim=1) * w).sum(dim=1).mean()
            return F.cross_entropy(out, y.long(), weight=on(weights, out), label_smoothing=smoothing)

        return loss
    if kind == "multilabel":
        return lambda out, y: F.binary_cross_entropy_with_logits(out, y.float(), pos_weight=on(weights, out))
    return lambda out, y: F.mse_loss(out[:, 0], (y.float() - scale.mean) / scale.std)


def chance_loss(task: TaskSettings, criterion, targets: np.ndarray, max_iter: int = 100) -> float | None:
    """Chance level: ``criterion``'s loss (the training loss itself: label smoothing, class
    weights, the z-scored regression target) at the best *constant* output for ``targets`` (the
    training labels), one bias per output fitted by L-BFGS. Balanced class weights give ln K,
    unweighted cross entropy the entropy of the (smoothed) class frequencies, z-scored MSE 1.
    None without targets."""
    y = torch.as_tensor(np.asarray(targets))
    if len(y) == 0:
        return None
    bias = torch.zeros(n_outputs(task), dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.LBFGS([bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = criterion(bias.expand(len(y), -1), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float(criterion(bias.expand(len(y), -1), y))


def to_outputs(task: TaskSettings, logits: torch.Tensor, scale: TargetScale) -> np.ndarray:
    """Probabilities (classification: softmax, multilabel: sigmoid) or regression values."""
    logits = logits.float()
    if task.type in CLASSIFICATION:
        return torch.softmax(logits, dim=1).cpu().numpy()
    if task.type == "multilabel":
        return torch.sigmoid(logits).cpu().numpy()
    return (logits[:, 0] * scale.std + scale.mean).cpu().numpy()


def write_predictions(path, task: TaskSettings, image_ids, y_true: np.ndarray, outputs: np.ndarray) -> None:
    frame = pd.DataFrame({"image_id": list(image_ids)})
    kind = task.type
    if kind == "regression":
        frame["y_true"] = np.asarray(y_true, dtype=float)
        frame["y_pred"] = np.asarray(outputs, dtype=float)
    elif kind == "multilabel":
        for k in range(outputs.shape[1]):
            frame[f"y_true_{k}"] = np.asarray(y_true[:, k], dtype=int)
        for k in range(outputs.shape[1]):
            frame[f"prob_{k}"] = outputs[:, k]
    else:
        frame["y_true"] = np.asarray(y_true, dtype=int)
        for k in range(outputs.shape[1]):
            frame[f"prob_{k}"] = outputs[:, k]
        frame["y_pred"] = outputs.argmax(axis=1)
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
