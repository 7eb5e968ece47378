"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers") on a timm ViT.

Self-distillation without labels: a student (encoder + :class:`~.heads.DINOHead`) is trained to
match the output distribution of a teacher with the same architecture whose weights are an
exponential moving average of the student's (momentum 0.996 -> 1 on a half cosine).

* Teacher outputs are **centred** (a running mean ``c`` of the teacher outputs, momentum 0.9,
  averaged over all ranks) and **sharpened** with a low temperature: ``tau_t`` warms up linearly
  from 0.04 to 0.07 over the first part of training (paper: first 30 of 300 epochs ->
  ``warmup_teacher_temp_frac=0.1``); the student uses ``tau_s=0.1``.  Centring prevents one
  dimension from dominating, sharpening prevents the uniform collapse.
* Loss: ``H(P_t(x), P_s(x')) = -sum P_t log P_s`` averaged over every (teacher view, student view)
  pair with different views; the teacher sees only the 2 global views, the student sees all views.
* The last (prototype) layer of the student head gets a zero gradient during the first
  ``freeze_last_layer_frac`` of training (paper: first epoch).
* Student drop-path 0.1 (paper's ViT-S recipe); the teacher is kept in eval mode (no drop-path),
  as DINO builds its teacher without stochastic depth.

Multi-crop: ``local_crops`` extra small views (``local_size`` px; 0 = only the 2 global views)
are supported through timm's ``dynamic_img_size``: the encoder is built with it switched on,
which only makes timm interpolate the (unchanged) position table to the patch grid of each input
-- parameter names and shapes stay those of ``spec``, so ``encoder.state_dict()`` loads into the
fine-tuning ViT like any other.  Views must be ordered: the 2 global views first (``img_size``),
then the local views (all ``local_size``).

Settings: :class:`~retflow.settings.stages.DINOSettings` (``pretrain.dino``; defaults in the schema).
The teacher's state (``teacher_encoder.*``, ``teacher_head.*``), the centre and the training
progress (for the temperature schedule) are part of ``state_dict()``, so a resumed run continues
exactly.  DINO evaluates the *teacher* backbone; :meth:`DINO.teacher_encoder_state_dict` gives it,
while :meth:`encoder_state_dict` gives the student like every other method.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F

from retflow.settings.checks import dino_errors
from retflow.settings.load import ConfigError
from retflow.settings.stages import DINOSettings

from ..vit import ViTSpec
from .base import SSLModel, all_reduce_sum, build_encoder, cosine_momentum, dist_rank_world, ema_update, fp32, freeze
from .heads import DINOHead

__all__ = ["DINO", "dino_loss"]


def dino_loss(student_out: Sequence[torch.Tensor], teacher_out: Sequence[torch.Tensor], center: torch.Tensor,
              student_temp: float, teacher_temp: float) -> torch.Tensor:
    """Cross-entropy between centred, sharpened teacher and student distributions (float32).

    ``student_out``: one ``(B, K)`` logit tensor per view (global views first); ``teacher_out``:
    one per global view.  Pairs where teacher and student saw the same view are skipped; the loss
    is the mean over the remaining pairs of the batch-mean cross entropy.
    """
    with fp32(center.device):
        targets = [F.softmax((t.float() - center) / teacher_temp, dim=-1) for t in teacher_out]
        logps = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student_out]
        total, terms = 0.0, 0
        for iq, q in enumerate(targets):
            for v, logp in enumerate(logps):
                if v == iq:
                    continue
                total = total + torch.sum(-q * logp, dim=-1).mean()
                terms += 1
        if terms == 0:
            raise ValueError("DINO needs at least two views")
        return total / terms


class DINO(SSLModel):
    """DINO student/teacher self-distillation with centring and sharpening."""

    method = "dino"

    def __init__(self, spec: ViTSpec, s: DINOSettings) -> None:
        """``s``: head, temperatures, momenta, schedules, drop-path and the multi-crop geometry
        (``local_crop_scale`` and the colour steps are the views', checked here only)."""
        super().__init__()
        errors = dino_errors(s, spec.patch_size)  # also run at startup (retflow.settings.checks)
        if errors:
            raise ConfigError(errors)
        self.spec = spec
        self.local_crops = int(s.local_crops)
        self.local_size = int(s.local_size)
        self.student_temp = float(s.student_temp)
        self.teacher_temp = float(s.teacher_temp)
        self.warmup_teacher_temp = float(s.warmup_teacher_temp)
        self.warmup_teacher_temp_frac = float(s.warmup_teacher_temp_frac)
        self.center_momentum = float(s.center_momentum)
        self.base_momentum = float(s.momentum)
        self.freeze_last_layer_frac = float(s.freeze_last_layer_frac)

        self.encoder = build_encoder(spec, s.drop_path_rate, dynamic_img_size=self.local_crops > 0)
        self.head = DINOHead(self.encoder.embed_dim, s.out_dim, s.hidden_dim, s.bottleneck_dim, s.head_layers)
        self.teacher_encoder = freeze(copy.deepcopy(self.encoder)).eval()
        self.teacher_head = freeze(copy.deepcopy(self.head)).eval()
        self.register_buffer("center", torch.zeros(1, s.out_dim))
        self.register_buffer("progress", torch.zeros(()))  # persistent: schedules survive a resume
        self._progress = 0.0  # host copy of ``progress`` (no device sync per step)
        self._sync_last_layer_gate()

    @property
    def n_views(self) -> int:  # type: ignore[override]
        return 2 + self.local_crops

    # ------------------------------------------------------------ schedules
    def current_teacher_temp(self) -> float:
        """Linear warm-up from ``warmup_teacher_temp`` to ``teacher_temp`` over the first fraction."""
        p = self._progress
        if self.warmup_teacher_temp_frac > 0 and p < self.warmup_teacher_temp_frac:
            a = p / self.warmup_teacher_temp_frac
            return self.warmup_teacher_temp + a * (self.teacher_temp - self.warmup_teacher_temp)
        return self.teacher_temp

    def _sync_last_layer_gate(self) -> None:
        self.head.last_layer.grad_enabled = self._progress >= self.freeze_last_layer_frac

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher_encoder.eval()
        self.teacher_head.eval()
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._progress = float(self.progress)
        self._sync_last_layer_gate()

    @torch.no_grad()
    def update_teacher(self, progress: float) -> None:
        """EMA step of the teacher (cosine momentum), then advance the temperature / freeze schedules."""
        progress = min(max(float(progress), 0.0), 1.0)
        student = [*self.encoder.parameters(), *self.head.parameters()]
        teacher = [*self.teacher_encoder.parameters(), *self.teacher_head.parameters()]
        ema_update(teacher, student, cosine_momentum(self.base_momentum, progress))
        self.progress.fill_(progress)
        self._progress = progress
        self._sync_last_layer_gate()

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """``c <- m c + (1 - m) mean(teacher_out)``; the mean is over all rows of all ranks."""
        batch = all_reduce_sum(teacher_out.float().sum(dim=0, keepdim=True))
        _, world = dist_rank_world()
        batch = batch / (teacher_out.shape[0] * world)
        self.center.mul_(self.center_momentum).add_(batch * (1.0 - self.center_momentum))

    def teacher_encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """Teacher backbone weights (timm naming, CPU copies) -- what the DINO paper evaluates."""
        return {k: v.detach().cpu().clone() for k, v in self.teacher_encoder.state_dict().items()}

    # --------------------------------------------------------------- forward
    def forward(self, views) -> torch.Tensor:
        views = self._check_views(views)
        global_views, local_views = views[:2], views[2:]
        b = global_views[0].shape[0]
        with torch.no_grad():
            t = self.teacher_head(self.teacher_encoder(torch.cat(global_views))).float()
        student = [self.head(self.encoder(torch.cat(global_views)))]
        if local_views:
            student.append(self.head(self.encoder(torch.cat(local_views))))
        student_chunks = [c for s in student for c in s.split(b)]
        loss = dino_loss(student_chunks, t.split(b), self.center, self.student_temp, self.current_teacher_temp())
        self.update_center(t)
        return loss
