"""Tensor maths shared by the losses (functions on tensors, no modules, no config).

* :func:`soft_kl`: the temperature-softened KL divergence of knowledge
  distillation (Hinton et al. 2015), used by ``seg_kl``, ``cwd``, ``st``,
  ``dml``, ``bss`` and the adversarial losses.
* :func:`resize_to`: bilinear resizing of a map to another's spatial size.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


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
    dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
    log_ps = F.log_softmax(student.to(dtype) / T, dim=dim)
    log_pt = F.log_softmax(teacher.to(dtype) / T, dim=dim)
    return F.kl_div(log_ps, log_pt, reduction=reduction, log_target=True)


def resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of a (B,C,H,W) map to ``size`` (``align_corners=False``; no-op when equal)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
