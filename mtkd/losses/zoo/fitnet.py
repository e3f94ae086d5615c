"""FitNet: hint learning, MSE between (regressed) student and teacher maps.

Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015,
https://arxiv.org/pdf/1412.6550.pdf

Reference (AberHu/Knowledge-Distillation-Zoo ``kd_losses/fitnet.py``):
``Hint()(fm_s, fm_t) = F.mse_loss(fm_s, fm_t)``, the mean over every element.
The reference's student and teacher have equal widths and uses no regressor;
here, when widths differ, the paper's regressor is the 1x1 conv adapter of
:class:`~mtkd.losses.zoo._adapt.FeaturePairs` (trained with the student).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtkd.losses._common import need_teacher
from mtkd.losses.base import Loss, register
from mtkd.losses.zoo._adapt import FeaturePairs, mean_of


class Hint(nn.Module):
    """Tensor core: ``mean((fm_s - fm_t) ** 2)``."""

    def forward(self, fm_s: torch.Tensor, fm_t: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(fm_s, fm_t)


FitNet = Hint


@register("fitnet")
class FitNetLoss(Loss):
    """Adapter: :class:`Hint` averaged over ``feats``; student maps pass a 1x1
    conv to the teacher's width when widths differ (``adapt=True``) and are
    resized to the teacher's size. (The reference hints one layer, its last
    stage: configure e.g. ``feats: [p5]`` or ``[f4]`` to match it.)"""

    requires = frozenset({"teacher"})

    def __init__(self, feats: Optional[Sequence[str]] = None, adapt: bool = True):
        super().__init__()
        self.core = Hint()
        self.pairs = FeaturePairs("fitnet", feats, adapt=adapt)

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> torch.Tensor:
        pairs = self.pairs(student_out, need_teacher("fitnet", teacher_out))
        return mean_of([self.core(fs, ft) for fs, ft in pairs])
