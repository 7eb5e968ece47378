"""Saliency maps of a fine-tuned timm ViT: attention rollout and Grad-CAM, drawn as a PNG grid.

Two complementary maps per image, both on the patch grid and upsampled to the image:

* **Attention rollout** (Abnar & Zuidema 2020), class-agnostic: in every block the attention
  probabilities are read from the softmax (timm's fused attention is switched off for the pass
  and a forward hook on ``attn.attn_drop`` captures its input), averaged over heads, mixed with
  the identity for the residual connection (``0.5 A + 0.5 I``, rows renormalised) and multiplied
  through all blocks, so any depth works. The model's pooling decides which rows are read: with
  ``global_pool="avg"`` (RETFound's fine-tuning recipe: the head sees the mean of the patch
  tokens after ``fc_norm``) the relevance of input patch j is the mean over all output patch
  tokens i of ``R[i, j]`` ("rollout from all tokens"); with ``global_pool="token"`` it is the
  class-token row ``R[0, j]``. Prefix tokens (class / register tokens) are dropped as inputs.
* **Grad-CAM** (Selvaraju et al. 2017) on the patch tokens of the last block, class-specific (the
  predicted class): channel weights = mean over patch tokens of d logit / d token, map =
  ReLU(sum_c weight_c * token_c). With average pooling every patch token gets the same gradient,
  so this is the linearised contribution of each token to the class logit (a CAM).

On a colour fundus photograph both maps are cut to the fundus field (the data stage's detector,
:func:`retflow.data.fundus.detect_field`, run on the stored image: the black surround carries no
retina, and a map that is hot there would only show padding artefacts) and min-max scaled inside
it; OCT B-scans (stored with one channel) and images without a detected field are not masked. The
maps show where the model looks, not why, and say nothing about correctness (each panel title
gives the true and the predicted class).

Command line (``workflow_scripts/saliency.py`` is the same; the settings are
:func:`retflow.settings.report.saliency` of the config: the task's label, the explained run, the device)::

    python -m retflow.report.saliency --settings '<SaliencySettings JSON>' --checkpoint best.pth \\
        --store results/data/<dataset> --out saliency/<task>.png --meta saliency/<task>.json \\
        [--n-per-class 2] [--pick-seed 0]

The meta JSON records the images shown, the method and the job's ``settings``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from ..atomic import atomic_path, write_json
from ..settings.report import SaliencySettings
from . import figures

METHOD = (
    "attention rollout (head mean, 0.5 identity for the residual, all blocks; "
    "avg-pool models: mean over all patch-token rows) and Grad-CAM of the predicted class "
    "on the last block's patch tokens; CFP maps cut to the fundus field and min-max scaled inside it"
)


def _prefix_tokens(model) -> int:
    return int(getattr(model, "num_prefix_tokens", 1))


def _grid(model) -> tuple[int, int]:
    size = getattr(model.patch_embed, "grid_size", None)
    if size is None:
        n = int(model.patch_embed.num_patches ** 0.5)
        return n, n
    return int(size[0]), int(size[1])


@contextlib.contextmanager
def _capture_attention(model):
    """Collect the post-softmax attention (B, heads, N, N) of every block during a forward pass."""
    maps, hooks, fused = [], [], []
    blocks = [blk for blk in model.blocks if hasattr(getattr(blk, "attn", None), "attn_drop")]
    if not blocks:
        raise ValueError("model has no timm attention blocks (blocks[i].attn.attn_drop)")
    for blk in blocks:
        fused.append(getattr(blk.attn, "fused_attn", False))
        blk.attn.fused_attn = False  # the fused kernel never materialises the attention matrix
        hooks.append(blk.attn.attn_drop.register_forward_hook(lambda m, inp, out: maps.append(inp[0].detach())))
    try:
        yield maps
    finally:
        for h in hooks:
            h.remove()
        for blk, f in zip(blocks, fused):
            blk.attn.fused_attn = f


def rollout_from_attentions(attentions: list[torch.Tensor], prefix: int, pool: str) -> torch.Tensor:
    """Attention rollout (B, N_patches) from per-block attention (B, H, N, N) (module docstring)."""
    if not attentions:
        raise ValueError("no attention maps captured")
    result = None
    for attn in attentions:
        a = attn.float().mean(dim=1)
        eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
        a = 0.5 * a + 0.5 * eye
        a = a / a.sum(dim=-1, keepdim=True)
        result = a if result is None else a @ result
    if pool == "token" and prefix > 0:
        rel = result[:, 0, prefix:]
    else:
        rel = result[:, prefix:, prefix:].mean(dim=1)
    return rel


@torch.no_grad()
def attention_rollout(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rollout maps (B, gh, gw), logits (B, K)) for a batch ``x``; the model stays unchanged."""
    model.eval()
    with _capture_attention(model) as maps:
        logits = model(x)
    depth = len(model.blocks)
    if len(maps) != depth:
        raise RuntimeError(f"captured {len(maps)} attention maps for {depth} blocks")
    pool = getattr(model, "global_pool", "avg") or "avg"
    rel = rollout_from_attentions(maps, _prefix_tokens(model), pool)
    gh, gw = _grid(model)
    return rel.reshape(x.shape[0], gh, gw), logits


def grad_cam(model, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Grad-CAM maps (B, gh, gw) of class ``target`` (default: the predicted class)."""
    model.eval()
    store = {}

    def hook(module, inp, out):
        out.retain_grad()
        store["act"] = out

    handle = model.blocks[-1].register_forward_hook(hook)
    try:
        with torch.enable_grad():
            x = x.detach().requires_grad_(False)
            logits = model(x)
            if target is None:
                target = logits.argmax(dim=1)
            score = logits.gather(1, target.view(-1, 1).to(logits.device)).sum()
            model.zero_grad(set_to_none=True)
            score.backward()
    finally:
        handle.remove()
    prefix = _prefix_tokens(model)
    act = store["act"].detach()[:, prefix:]
    grad = store["act"].grad.detach()[:, prefix:]
    weights = grad.mean(dim=1, keepdim=True)
    cam = F.relu((act * weights).sum(dim=-1))
    model.zero_grad(set_to_none=True)
    gh, gw = _grid(model)
    return cam.reshape(x.shape[0], gh, gw)


def _upsample(maps: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    return F.interpolate(maps[:, None].float().cpu(), size=size, mode="bilinear", align_corners=False)[:, 0].numpy()


def field_masks(images: list[np.ndarray]) -> np.ndarray:
    """(B, H, W) bool: the fundus field of each stored image (module docstring). A colour image
    (the data stage stores CFP as RGB, OCT with one channel) gets the field that
    :func:`retflow.data.fundus.detect_field` finds; OCT and images without a field: all True."""
    from ..data.fundus import detect_field, mask_from_field

    out = []
    for img in images:
        img = np.asarray(img)
        full = np.ones(img.shape[:2], bool)
        if img.ndim == 3 and img.shape[2] == 3:
            field = detect_field(img)
            out.append(mask_from_field(img.shape, field) if field.found else full)
        else:
            out.append(full)
    return np.stack(out) if out else np.zeros((0, 1, 1), bool)


def scale_in_field(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per map: min-max scaled to [0, 1] over the pixels inside its mask, 0 outside."""
    out = np.zeros(maps.shape, dtype=np.float32)
    for i, (m, inside) in enumerate(zip(maps, masks)):
        if not inside.any():
            continue
        lo, hi = float(m[inside].min()), float(m[inside].max())
        if hi > lo:
            out[i][inside] = (m[inside] - lo) / (hi - lo)
    return out


def pick_examples(labels: np.ndarray, n_classes: int, n_per_class: int, seed: int = 0) -> list[list[int]]:
    """Per class, up to ``n_per_class`` positions of ``labels`` (seeded, sorted)."""
    rng = np.random.default_rng(seed)
    out = []
    for c in range(n_classes):
        pos = np.flatnonzero(labels == c)
        if pos.size > n_per_class:
            pos = np.sort(rng.choice(pos, n_per_class, replace=False))
        out.append([int(p) for p in pos])
    return out


@figures._styled
def saliency_grid(images: list[np.ndarray], rows: list[list[int]], class_names: list[str], labels: np.ndarray,
                  probs: np.ndarray, rollout: np.ndarray, cam: np.ndarray, title: str,
                  fields: np.ndarray | None = None) -> bytes:
    """PNG: one row per class, per example three panels (image, rollout overlay, Grad-CAM overlay).

    ``fields``: (B, H, W) bool, where the overlays are drawn (:func:`field_masks`); default everywhere."""
    rows_used = [(c, r) for c, r in enumerate(rows) if r]
    per_row = max((len(r) for _, r in rows_used), default=1)
    ncols = 3 * per_row
    nrows = max(len(rows_used), 1)
    cell = min(1.55, (figures.MAX_WIDTH_PX / figures.DPI - 0.9) / ncols)  # inches per panel: fit the column
    height = (cell + 0.2) * nrows + 0.9
    fig = Figure(figsize=(cell * ncols + 0.6, height))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for i, (c, positions) in enumerate(rows_used):
        axes[i, 0].text(-0.08, 0.5, f"class {class_names[c]}", rotation=90, ha="right", va="center",
                        transform=axes[i, 0].transAxes, fontsize=9.5, fontweight="bold")
        for j, p in enumerate(positions):
            img = images[p]
            gray = img.ndim == 2 or img.shape[-1] == 1
            shown = img[..., 0] if img.ndim == 3 and gray else img
            pred = int(probs[p].argmax())
            ok = pred == int(labels[p])
            for k, (overlay, name) in enumerate(((None, "image"), (rollout[p], "rollout"), (cam[p], "Grad-CAM"))):
                ax = axes[i, 3 * j + k]
                ax.imshow(shown, cmap="gray" if gray else None, vmin=0, vmax=255)
                if overlay is not None:
                    shown_map = overlay if fields is None else np.ma.masked_where(~fields[p], overlay)
                    ax.imshow(shown_map, cmap="jet", alpha=0.45, vmin=0, vmax=1)
                if k == 0:
                    ax.set_title(f"true {class_names[int(labels[p])]}\npred {class_names[pred]} "
                                 f"({probs[p, pred]:.2f})", fontsize=8.5, color="black" if ok else "#b00020")
                else:
                    ax.set_title(name if i == 0 else "", fontsize=8.5)
    if not rows_used:
        axes[0, 0].text(0.5, 0.5, "no labelled test images", ha="center", va="center")
    fig.suptitle(title, fontsize=10.5, y=1 - 0.08 / height, va="top")
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.01, top=1 - 0.75 / height, wspace=0.05,
                        hspace=0.4)
    return figures._png(fig)


def saliency_for_store(checkpoint, store, label: str, device, n_per_class: int = 2, seed: int = 0,
                       split: str = "test", title: str | None = None) -> tuple[bytes, dict]:
    """Load ``checkpoint`` (fine-tuned best.pth) on ``device``, pick ``n_per_class`` ``split`` images per
    class (seeded by ``seed``), return (PNG, meta)."""
    from ..data.dataset import (
        StoreDataset,
        encode_labels,
        eval_transform,
        load_manifest,
    )
    from ..train.predict import load_finetuned

    device = torch.device(device)
    model, state, spec = load_finetuned(Path(checkpoint), device)
    model.eval()
    classes = [str(c) for c in state["classes"]]
    manifest = load_manifest(store)
    if label not in manifest.columns:
        raise SystemExit(f"label column '{label}' not in the manifest of {store} (columns: {list(manifest.columns)})")
    codes, valid = encode_labels(manifest[label], state["classes"])
    if split and "split" in manifest.columns:
        valid = valid & (manifest["split"] == split).to_numpy()
    rows, y = np.flatnonzero(valid), codes[valid]
    picks = pick_examples(y, len(classes), n_per_class, seed)
    flat = [p for r in picks for p in r]
    ds = StoreDataset(store, manifest["index"].to_numpy()[rows][flat], y[flat],
                      eval_transform(spec.img_size, state.get("normalize"), spec.in_chans), spec.in_chans)
    meta = {"checkpoint": str(checkpoint), "store": str(store), "label": label, "split": split, "method": METHOD,
            "classes": classes, "n_per_class": n_per_class, "seed": seed, "images": []}
    if not flat:
        png = saliency_grid([], [[] for _ in classes], classes, np.zeros(0), np.zeros((0, len(classes))),
                            np.zeros((0, 1, 1)), np.zeros((0, 1, 1)), title or "saliency")
        return png, meta
    x = torch.stack([ds[i][0] for i in range(len(flat))]).to(device)
    raw = [np.asarray(ds.images[int(ds.indices[i])]) for i in range(len(flat))]
    roll, logits = attention_rollout(model, x)
    probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
    cam = grad_cam(model, x, torch.as_tensor(probs.argmax(axis=1)))
    size = raw[0].shape[:2]
    fields = field_masks(raw)
    roll_up, cam_up = scale_in_field(_upsample(roll, size), fields), scale_in_field(_upsample(cam, size), fields)
    labels = y[flat]
    positions, k = [], 0
    for r in picks:
        positions.append(list(range(k, k + len(r))))
        k += len(r)
    png = saliency_grid(raw, positions, classes, labels, probs, roll_up, cam_up, title or Path(checkpoint).parent.name,
                        fields)
    ids = manifest["image_id"].to_numpy()[rows][flat]
    meta["images"] = [
        {"image_id": str(i), "true": classes[int(t)], "pred": classes[int(p.argmax())], "prob": float(p.max()),
         "field_masked": bool(not f.all())}
        for i, t, p, f in zip(ids, labels, probs, fields)
    ]
    return png, meta


def run(settings: SaliencySettings, checkpoint, store, out, meta_out, n_per_class: int = 2,
        pick_seed: int = 0) -> dict:
    """One saliency job: ``n_per_class`` test images per class (picked with ``pick_seed``) of the
    settings' run -> ``out`` (PNG) and ``meta_out`` (JSON: the images, the method, the settings)."""
    from ..train.distributed import pick_device

    png, meta = saliency_for_store(checkpoint, store, settings.label, pick_device(settings.device), n_per_class,
                                   pick_seed, "test", settings.description() + "; test images")
    meta["run"] = settings.description()
    meta["settings"] = settings.to_dict()
    with atomic_path(out) as tmp:
        Path(tmp).write_bytes(png)
    write_json(meta, meta_out)
    umask = os.umask(0)
    os.umask(umask)
    for path in (out, meta_out):
        os.chmod(path, 0o666 & ~umask)  # atomic writes leave private (0600) files
    return meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m retflow.report.saliency", description=__doc__.splitlines()[0])
    ap.add_argument("--settings", required=True, help="the job's settings, JSON (retflow.settings.report.saliency)")
    ap.add_argument("--checkpoint", required=True, help="fine-tuned best.pth of the settings' run")
    ap.add_argument("--store", required=True, help="prepared store folder (manifest.parquet + shards)")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--meta", required=True, help="JSON to write: the images shown, the method, the settings")
    ap.add_argument("--n-per-class", type=int, default=2, help="test images shown per class")
    ap.add_argument("--pick-seed", type=int, default=0, help="seed of the choice of images")
    args = ap.parse_args(argv)
    meta = run(SaliencySettings.from_json(args.settings), args.checkpoint, args.store, args.out, args.meta,
               args.n_per_class, args.pick_seed)
    print(json.dumps({"out": args.out, "images": len(meta["images"])}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
