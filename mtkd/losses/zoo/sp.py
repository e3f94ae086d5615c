"""SP: similarity-preserving knowledge distillation.

Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019,
https://arxiv.org/pdf/1907.09682.pdf

Reference (AberHu/Knowledge-Distillation-Zoo ``kd_losses/sp.py``), per feature
pair: flatten each map to (B, C*H*W), take the batch Gram matrix
``G = F F^T`` (B x B), L2-normalise every row, and return the mean squared
difference of the two normalised Grams (``F.mse_loss``, i.e. the squared
Frobenius norm divided by B^2, as in the paper). The Gram is B x B, so the
student and teacher maps may differ in width and spatial size: no adapter is
used. The reference's train script averages the loss over its three residual
stages; the adapter averages over ``feats``.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtkd.losses._common import need_teacher
from mtkd.losses.base import Loss, register
from mtkd.losses.zoo._adapt import FeaturePairs, mean_of


class SP(nn.Module):
    """Tensor core: ``mse(rownorm(Fs Fs^T), rownorm(Ft Ft^T))`` for (B, ...) maps."""

    def forward(self, fm_s: torch.Tensor, fm_t: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.similarity(fm_s), self.similarity(fm_t))

    @staticmethod
    def similarity(fm: torch.Tensor) -> torch.Tensor:
        flat = fm.reshape(fm.shape[0], -1)
        return F.normalize(flat @ flat.t(), p=2, dim=1)


@register("sp")
class SPLoss(Loss):
    """Adapter: :class:`SP` averaged over the feature maps ``feats``
    (default ``p3, p4, p5`` on dense models, ``f1..f4`` on classifiers)."""

    requires = frozenset({"teacher"})

    def __init__(self, feats: Optional[Sequence[str]] = None):
        super().__init__()
        self.pairs = FeaturePairs("sp", feats, adapt=False, resize=False)
        self.core = SP()

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> torch.Tensor:
        teacher_out = need_teacher("sp", teacher_out)
        return mean_of([self.core(fs, ft) for fs, ft in self.pairs(student_out, teacher_out)])
