"""Pixel-wise logit distillation for semantic segmentation."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from mtkd.errors import ConfigError
from mtkd.losses._common import need_teacher
from mtkd.losses._functional import resize_to, soft_kl
from mtkd.losses.base import Loss, register
from mtkd.losses.distill.common import check_classes, output_entry, seg_valid_mask


@register("seg_kl")
class SegKL(Loss):
    """Temperature-scaled KL between teacher and student pixel distributions.

    Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network"
    (2015), applied per pixel as the pixel-wise distillation of Liu et al.,
    "Structured Knowledge Distillation for Semantic Segmentation" (CVPR 2019)::

        loss = T^2 * mean_{valid pixels} KL(softmax(t / T) || softmax(s / T))

    with the KL summed over the ``nc + 1`` classes of a pixel.

    * Reads ``out["seg"]`` (B, nc+1, H, W) of both models. Teacher logits of
      another size are bilinearly resized to the student's.
    * Valid pixels: see :func:`mtkd.losses.distill.common.seg_valid_mask`
      (non-void pixels of labelled samples; every non-padding pixel of
      samples without segmentation labels). With no valid pixel the loss is
      an exact 0 that still carries the student's graph.
    * Different class counts raise a ConfigError naming both.
    """

    requires = frozenset({"teacher"})

    def __init__(self, T: float = 2.0):
        super().__init__()
        if T <= 0:
            raise ConfigError(f"loss seg_kl.T: must be > 0, got {T}")
        self.T = float(T)

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> torch.Tensor:
        teacher_out = need_teacher("seg_kl", teacher_out)
        s = output_entry(student_out, "seg", "student", "seg_kl")
        t = output_entry(teacher_out, "seg", "teacher", "seg_kl").detach()
        check_classes("seg_kl", s.shape[1] - 1, t.shape[1] - 1)
        t = resize_to(t.float(), tuple(s.shape[-2:]))
        kl = soft_kl(s, t, self.T, dim=1).sum(1)  # (B, H, W), float32 under any AMP dtype
        valid = seg_valid_mask(batch, tuple(s.shape[-2:]), s.device)
        scale = self.T * self.T
        if valid is None:
            return kl.mean() * scale
        kl = kl.masked_fill(~valid, 0.0)
        return kl.sum() / valid.sum().clamp(min=1) * scale
