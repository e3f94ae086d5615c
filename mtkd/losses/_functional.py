"""Tensor maths shared by the losses (functions on tensors, no modules, no config).

* :func:`soft_kl`: the temperature-softened KL divergence of knowledge
  distillation (Hinton et al. 2015), used by ``seg_kl``, ``cwd``, ``st``,
  ``dml``, ``bss``, ``kd_dfl`` and the adversarial losses.
* :func:`binary_kl`: its counterpart for independent sigmoid outputs
  (``kd_cls``, ``kd_obj``).
* :func:`channel_kl`: channel-wise distillation's KL between spatial
  softmaxes (``cwd``, and ``kd_feat`` of ``mtkd yolo train``).
* :func:`resize_to`: bilinear resizing of a map to another's spatial size.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from mtkd.heads.resize import resize_bilinear


def soft_kl(student: torch.Tensor, teacher: torch.Tensor, T: float = 1.0, dim: int = 1,
            reduction: str = "none") -> torch.Tensor:
    """``KL(softmax(teacher / T) || softmax(student / T))`` with the distributions along ``dim``.

    Computed in float32 (float64 for double inputs) whatever the AMP dtype,
    from both log-probabilities (``F.kl_div(..., log_target=True)``:
    ``p_t * (log p_t - log p_s)`` per element). ``reduction`` is ``F.kl_div``'s: ``"none"`` (per element; sum
    over ``dim`` for the KL of each distribution), ``"sum"``, ``"mean"`` or
    ``"batchmean"`` (the sum over the first dimension's size). Not multiplied
    by ``T**2`` (Hinton's gradient scale; the caller applies it after its own
    reduction) and nothing is detached.
    """
    dtype = _kl_dtype(student, teacher)
    log_ps = F.log_softmax(student.to(dtype) / T, dim=dim)
    log_pt = F.log_softmax(teacher.to(dtype) / T, dim=dim)
    return F.kl_div(log_ps, log_pt, reduction=reduction, log_target=True)


def binary_kl(student: torch.Tensor, teacher: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """``KL(Bern(sigmoid(teacher / T)) || Bern(sigmoid(student / T)))`` per element, for logits of
    independent binary (sigmoid) outputs: the multi-label form of :func:`soft_kl`.

    Computed in float32 (float64 for double inputs) as ``BCE(s / T, p) - BCE(t / T, p)`` with
    ``p = sigmoid(t / T)`` (the cross-entropy minus the teacher's entropy), which is stable in the
    logits, and clamped at 0 against rounding. Not multiplied by ``T**2`` and nothing is detached.
    """
    dtype = _kl_dtype(student, teacher)
    s, t = student.to(dtype), teacher.to(dtype)
    p = torch.sigmoid(t / T)
    ce = F.binary_cross_entropy_with_logits(s / T, p, reduction="none")
    ent = F.binary_cross_entropy_with_logits(t / T, p, reduction="none")
    return (ce - ent).clamp_min(0.0)


def channel_kl(s: torch.Tensor, t: torch.Tensor, tau: float) -> torch.Tensor:
    """CWD between (B,C,H,W) maps of equal shape: each channel is turned into
    a distribution over its H*W locations by a softmax at temperature
    ``tau``; ``tau^2 * sum_{b,c} KL(p_t || p_s) / (B * C)``, computed in
    float32 whatever the AMP dtype (:func:`soft_kl`)."""
    b, c = s.shape[:2]
    return soft_kl(s.flatten(2), t.flatten(2), tau, dim=-1, reduction="sum") * (tau * tau) / (b * c)


def _kl_dtype(student: torch.Tensor, teacher: torch.Tensor) -> torch.dtype:
    """float32, or float64 when either input is double."""
    return torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)


def resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of a (B,C,H,W) map to ``size`` (``align_corners=False``; no-op when equal;
    :func:`mtkd.heads.resize.resize_bilinear`)."""
    return resize_bilinear(x, size)
