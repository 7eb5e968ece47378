"""Three named linear-probe protocols on a frozen encoder.

- ``probe_adamw`` (RETFound): a linear head on the pooled features, trained with AdamW; like
  MAE's probe it standardises the features first (BatchNorm without affine parameters): pooled
  MAE features have large per-dimension offsets and small spread, which an unnormalised linear
  head barely learns from (measured on the demo: test AUROC 0.52 raw vs 0.66 standardised);
- ``probe_lars`` (MAE): BatchNorm (no affine) + linear head, trained with LARS (timm's
  :class:`~timm.optim.Lars` set up like MAE's: momentum 0.9, trust ratio |w|/|g| applied on
  every step, weight decay 0 by default);
- ``probe_logreg`` (RETFound-Green): embeddings extracted once, scikit-learn logistic
  regression (ridge for regression tasks) with the inverse regularisation ``C`` chosen on the
  validation split; the fitted standardisation + coefficients are folded into the ViT's linear
  head, so the result is an ordinary checkpoint that predicts exactly like the sklearn model.
"""

from __future__ import annotations

import numpy as np
import torch
from timm.optim import Lars

from retflow.models.vit import attach_probe_head
from retflow.settings.stages import TaskSettings

PROBES = ("probe_adamw", "probe_lars", "probe_logreg")
C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)


def freeze_encoder(model, protocol: str) -> list:
    """Freeze everything but the head (BN + linear for the SGD probes); returns trainable params."""
    if protocol in ("probe_adamw", "probe_lars"):  # standardised features (MAE's BN, no affine)
        attach_probe_head(model)
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("head.")
    return [p for p in model.parameters() if p.requires_grad]


def probe_optimizer(protocol: str, params: list, lr: float, weight_decay: float):
    if protocol == "probe_lars":  # MAE's LARS: layer-wise trust ratio |w|/|g| on every step
        return Lars(params, lr=lr, momentum=0.9, weight_decay=weight_decay, trust_coeff=1.0, always_adapt=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


@torch.no_grad()
def embeddings(model, dataset, device, batch_size: int = 128) -> np.ndarray:
    """Pooled, normalised features (the head's input) of every item."""
    model.eval()
    out = []
    for imgs, _ in torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False):
        feats = model.forward_head(model.forward_features(imgs.to(device)), pre_logits=True)
        out.append(feats.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.num_features), np.float32)


def _fit(task_type: str, x: np.ndarray, y: np.ndarray, c: float, seed: int):
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.multiclass import OneVsRestClassifier

    if task_type == "regression":
        return Ridge(alpha=1.0 / c).fit(x, y)
    lr = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    if task_type == "multilabel":
        return OneVsRestClassifier(lr).fit(x, y.astype(int))
    return lr.fit(x, y.astype(int))


def _linear_parts(task_type: str, fitted, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) of the fitted model as a K-output linear layer on standardised features."""
    if task_type == "regression":
        return fitted.coef_.reshape(1, -1), np.atleast_1d(fitted.intercept_)
    if task_type == "multilabel":
        w = np.stack([est.coef_[0] for est in fitted.estimators_])
        return w, np.array([est.intercept_[0] for est in fitted.estimators_])
    w = np.zeros((n_out, fitted.coef_.shape[1]))
    b = np.zeros(n_out)
    if fitted.coef_.shape[0] == 1:  # binary: softmax([0, z]) == sigmoid(z)
        w[fitted.classes_[1]], b[fitted.classes_[1]] = fitted.coef_[0], fitted.intercept_[0]
    else:
        w[fitted.classes_], b[fitted.classes_] = fitted.coef_, fitted.intercept_
    return w, b


def fit_logreg(model, train_x, train_y, val_x, val_y, task: TaskSettings, score_fn, seed: int) -> dict:
    """Choose C on validation, refit, fold (scaler, W, b) into ``model.head``; returns a log."""
    mu, sd = train_x.mean(axis=0), train_x.std(axis=0) + 1e-6
    tx, vx = (train_x - mu) / sd, (val_x - mu) / sd
    n_out = model.head.out_features
    log, best = [], (-np.inf, None, None)
    for c in C_GRID:
        fitted = _fit(task.type, tx, train_y, c, seed)
        w, b = _linear_parts(task.type, fitted, n_out)
        logits = torch.from_numpy(vx @ w.T + b).float()
        score = score_fn(val_y, logits)
        log.append({"C": c, "val_score": score})
        if score > best[0] or best[1] is None:
            best = (score, w, b)
    _, w, b = best
    with torch.no_grad():  # head(x) = W ((x - mu) / sd) + b
        model.head.weight.copy_(torch.from_numpy(w / sd[None]).float())
        model.head.bias.copy_(torch.from_numpy(b - (w / sd[None]) @ mu).float())
    return {"grid": log, "best_C": log[int(np.argmax([r["val_score"] for r in log]))]["C"]}
