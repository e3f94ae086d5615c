"""AB: distillation of activation boundaries formed by hidden neurons.

Heo et al., "Knowledge Transfer via Distillation of Activation Boundaries
Formed by Hidden Neurons", AAAI 2019, https://arxiv.org/pdf/1811.03233.pdf

Reference (AberHu/Knowledge-Distillation-Zoo ``kd_losses/ab.py``), kept as is.
On pre-activation maps, with margin ``m`` (default 2, the reference's script)::

    loss = (s + m)^2 * [s > -m and t <= 0] + (s - m)^2 * [s <= m and t > 0]

averaged over every element (B*C*H*W). It penalises a student neuron whose
activation (sign) disagrees with the teacher's, until it clears the margin;
zero when the student is past the margin on the teacher's side.

Conventions: AB is meant for *pre-activation* maps (the reference feeds the
residual blocks' outputs before their ReLU); pick such taps in ``feats`` where
the model exposes them. Widths are matched by the 1x1 conv adapter (the
paper's connector). In the reference, AB (like FSP) drives a student
initialisation stage (50 epochs of AB alone, then lambda_kd = 0); in mtkd
the weighting is the config's.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from mtkd.losses._common import need_teacher
from mtkd.losses.base import Loss, register
from mtkd.losses.zoo._adapt import FeaturePairs, mean_of


class AB(nn.Module):
    """Tensor core: the alternative (squared-hinge) activation-boundary loss."""

    def __init__(self, margin: float):
        super().__init__()
        self.margin = float(margin)

    def forward(self, fm_s: torch.Tensor, fm_t: torch.Tensor) -> torch.Tensor:
        m = self.margin
        teacher_on = fm_t > 0
        push_down = ((fm_s > -m) & ~teacher_on).to(fm_s.dtype)
        push_up = ((fm_s <= m) & teacher_on).to(fm_s.dtype)
        loss = (fm_s + m).pow(2) * push_down + (fm_s - m).pow(2) * push_up
        return loss.mean()


@register("ab")
class ABLoss(Loss):
    """Adapter: :class:`AB` averaged over ``feats`` (the reference averages its
    three stages); student maps pass a 1x1 conv to the teacher's width when
    widths differ and are resized to the teacher's size."""

    requires = frozenset({"teacher"})

    def __init__(self, margin: float = 2.0, feats: Optional[Sequence[str]] = None, adapt: bool = True):
        super().__init__()
        self.core = AB(margin)
        self.pairs = FeaturePairs("ab", feats, adapt=adapt)

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> torch.Tensor:
        pairs = self.pairs(student_out, need_teacher("ab", teacher_out))
        return mean_of([self.core(fs, ft) for fs, ft in pairs])
