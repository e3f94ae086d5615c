"""AT: attention transfer (activation-based, sum of |A|^p over channels).

Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the
Performance of Convolutional Neural Networks via Attention Transfer",
ICLR 2017, https://arxiv.org/pdf/1612.03928.pdf

Reference (AberHu/Knowledge-Distillation-Zoo ``kd_losses/at.py``), kept as is:

* attention map ``Q = sum_c |A_c|^p`` with shape (B,1,H,W) (``keepdim``);
* per-map normalisation ``Q / (||Q||_2 + 1e-6)``, the L2 norm taken over each
  sample's H x W map (eps added to the norm, where the paper's code uses
  ``F.normalize``, i.e. ``max(norm, eps)``; summing rather than averaging over
  channels makes no difference after the normalisation);
* ``AT(p)(fm_s, fm_t) = mse(Q_s, Q_t)``, the mean over B*H*W elements.

Default ``p=2`` as in the reference's train script.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtkd.losses._common import need_teacher
from mtkd.losses.base import Loss, register
from mtkd.losses.zoo._adapt import FeaturePairs, mean_of


class AT(nn.Module):
    """Tensor core: MSE between per-map L2-normalised attention maps."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, fm_s: torch.Tensor, fm_t: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.attention_map(fm_s), self.attention_map(fm_t))

    def attention_map(self, fm: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        am = fm.abs().pow(self.p).sum(dim=1, keepdim=True)
        norm = torch.linalg.vector_norm(am, dim=(2, 3), keepdim=True)
        return am / (norm + eps)


@register("at")
class ATLoss(Loss):
    """Adapter: :class:`AT` averaged over ``feats`` (default p3,p4,p5, or every
    classifier feature).

    Attention maps sum over channels, so student and teacher widths may
    differ: no 1x1 adapter by default (``adapt=False``; set ``adapt: true`` to
    add one). Student maps are bilinearly resized to the teacher's size.
    """

    requires = frozenset({"teacher"})

    def __init__(self, p: float = 2.0, feats: Optional[Sequence[str]] = None, adapt: bool = False):
        super().__init__()
        self.core = AT(p)
        self.pairs = FeaturePairs("at", feats, adapt=adapt)

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> torch.Tensor:
        pairs = self.pairs(student_out, need_teacher("at", teacher_out))
        return mean_of([self.core(fs, ft) for fs, ft in pairs])
