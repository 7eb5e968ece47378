"""Multi-view augmentation for the SSL methods of :mod:`retflow.models.ssl`.

:func:`ssl_view_transform` returns a callable that maps the uint8 ``(C, H, W)`` tensor
:class:`~retflow.data.dataset.StoreDataset` hands its transform (already ``in_chans`` channels)
to a **list** of ``n_views`` float tensors normalised like :func:`~retflow.data.dataset.train_transform`
(same :func:`~retflow.data.dataset.norm_stats`).  The default collate turns a batch of such lists
into a list of ``(B, C, h, w)`` tensors, one per view -- what ``model(views)`` takes.

* ``simclr``, ``mocov3``, ``dino``: the asymmetric BYOL / DINO / MoCo-v3 recipe -- random resized
  crop (``crop_scale``) + horizontal flip + colour jitter (brightness 0.4, contrast 0.4,
  saturation 0.2, hue 0.1, p=0.8) + grayscale (p=0.2) + Gaussian blur (kernel ~10 % of the crop,
  sigma 0.1-2 px at 224 px and proportionally less on smaller crops, so the blur removes the same
  share of detail at every size; p=1.0 on view 1, p=0.1 on view 2) + solarisation (p=0.2, view 2
  only).  For one-channel images (OCT) only brightness/contrast jitter is used (saturation, hue
  and grayscale are meaningless there); three-channel copies of grayscale scans pass the colour
  steps unchanged.

  The colour steps are the method's settings (:class:`~retflow.settings.stages.ColourViews`, the
  :data:`~retflow.settings.stages.VIEW_KEYS` of its section; ranges checked by the schema):
  ``color_jitter`` scales the four jitter strengths (1 = the values above, 0 = no jitter),
  ``grayscale_p`` and ``solarize_p`` are the probabilities.  Colour carries the lesions in fundus
  photographs, and on the demo's 64 px phantoms the full-strength colour steps leave SimCLR's
  NT-Xent at its chance value (the less jitter, the better its encoder probes): the demo config
  turns them off.
  (``bench/probe_encoders.py`` measures what each setting's encoder knows.)
* ``dino`` with ``local_crops > 0``: after the 2 global views, ``local_crops`` views of
  ``local_size`` px cropped with ``local_crop_scale`` (jitter as above, blur p=0.5, no solarisation).
* ``token_recon``: one view, exactly :func:`~retflow.data.dataset.train_transform` (random resized
  crop + flip); its corruption (noise / masking) happens inside the model, on the device.
"""
from __future__ import annotations

from typing import Callable

import torch
from torchvision.transforms import v2

from retflow.data.dataset import _to_float, train_transform
from retflow.settings.frozen import Frozen
from retflow.settings.stages import METHOD_SETTINGS, VIEW_KEYS, ColourViews

__all__ = ["MultiView", "ssl_view_transform", "colour_views", "blur_kernel_size", "blur_sigma"]


class MultiView:
    """Apply each transform to the same input; returns the list of results."""

    def __init__(self, transforms: list[Callable]) -> None:
        self.transforms = list(transforms)

    @property
    def n_views(self) -> int:
        return len(self.transforms)

    def __call__(self, img: torch.Tensor) -> list[torch.Tensor]:
        return [t(img) for t in self.transforms]

    def __repr__(self) -> str:
        inner = "\n".join(f"  [{i}] {t}" for i, t in enumerate(self.transforms))
        return f"MultiView(\n{inner}\n)"


def blur_kernel_size(size: int) -> int:
    """Odd Gaussian-blur kernel of about 10 % of the crop (23 px at 224, as BYOL), at least 3."""
    return max(3, int(round(0.1 * size)) // 2 * 2 + 1)


def blur_sigma(size: int) -> tuple[float, float]:
    """Gaussian-blur sigma range: (0.1, 2.0) px at 224 px (SimCLR / BYOL), scaled to the crop size."""
    f = size / 224.0
    return (0.1 * f, 2.0 * f)


def colour_views(settings: Frozen) -> ColourViews:
    """The colour steps of a two-view method's settings record (its :data:`VIEW_KEYS`)."""
    return ColourViews.from_dict({k: getattr(settings, k) for k in VIEW_KEYS}, f"{type(settings).__name__} colour")


def _view(size: int, scale, in_chans: int, normalize, blur_p: float, solarize_p: float,
          colour: ColourViews) -> v2.Compose:
    steps: list = [v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True), v2.RandomHorizontalFlip()]
    s = float(colour.color_jitter)
    if s > 0 and in_chans == 3:
        steps.append(v2.RandomApply([v2.ColorJitter(brightness=0.4 * s, contrast=0.4 * s, saturation=0.2 * s,
                                                    hue=0.1 * s)], p=0.8))
    elif s > 0:
        steps.append(v2.RandomApply([v2.ColorJitter(brightness=0.4 * s, contrast=0.4 * s)], p=0.8))
    if colour.grayscale_p > 0 and in_chans == 3:
        steps.append(v2.RandomGrayscale(p=colour.grayscale_p))
    if blur_p > 0:
        steps.append(v2.RandomApply([v2.GaussianBlur(blur_kernel_size(size), sigma=blur_sigma(size))], p=blur_p))
    if solarize_p > 0:
        steps.append(v2.RandomSolarize(threshold=128, p=solarize_p))  # uint8 input: threshold in 0..255
    return v2.Compose(steps + _to_float(normalize, in_chans))


def ssl_view_transform(method: str, settings: Frozen | None, size: int, crop_scale, normalize,
                       in_chans: int) -> MultiView:
    """The view generator of ``method`` (see module docstring) with its settings record
    (:class:`~retflow.settings.stages.SimCLRSettings`, ``MoCoV3Settings``, ``DINOSettings``;
    ``token_recon`` reads none). ``normalize``: what :func:`~retflow.data.dataset.norm_stats` takes.
    The result's ``n_views`` equals the model's.
    """
    if method not in METHOD_SETTINGS:
        raise ValueError(f"unknown SSL method {method!r}; choose one of {tuple(METHOD_SETTINGS)}")
    if method == "token_recon":
        return MultiView([train_transform(size, crop_scale, normalize=normalize, in_chans=in_chans)])
    if not isinstance(settings, METHOD_SETTINGS[method]):
        raise ValueError(f"{method} views need its {METHOD_SETTINGS[method].__name__} "
                         f"(retflow.settings.build.pretrain), got {type(settings).__name__}")
    colour = colour_views(settings)
    views = [
        _view(size, crop_scale, in_chans, normalize, blur_p=1.0, solarize_p=0.0, colour=colour),
        _view(size, crop_scale, in_chans, normalize, blur_p=0.1, solarize_p=colour.solarize_p, colour=colour),
    ]
    if method == "dino" and settings.local_crops > 0:
        local = _view(settings.local_size, settings.local_crop_scale, in_chans, normalize, blur_p=0.5,
                      solarize_p=0.0, colour=colour)
        views += [local] * settings.local_crops
    return MultiView(views)
