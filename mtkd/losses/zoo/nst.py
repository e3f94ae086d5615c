"""NST: neuron selectivity transfer, MMD with a polynomial kernel (d=2, c=0).

Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity
Transfer", 2017, https://arxiv.org/pdf/1707.01219.pdf

Reference (AberHu/Knowledge-Distillation-Zoo ``kd_losses/nst.py``), kept as is:

* each channel's map is flattened to a vector of H*W and L2-normalised
  (``F.normalize(dim=2)`` on (B,C,H*W));
* ``k(x, y) = (x . y)^2`` between every pair of channel vectors of one sample;
* ``loss = mean k(t,t) + mean k(s,s) - 2 mean k(s,t)``, each mean over the
  (B, C_a, C_b) kernel matrix (the squared MMD, biased estimate).

Channels are samples of the MMD, so widths may differ (no adapter by
default); the spatial sizes must agree, so the student map is resized.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtkd.losses._common import need_teacher
from mtkd.losses.base import Loss, register
from mtkd.losses.zoo._adapt import FeaturePairs, mean_of


class NST(nn.Module):
    """Tensor core: squared MMD between channel distributions, poly kernel d=2, c=0."""

    def forward(self, fm_s: torch.Tensor, fm_t: torch.Tensor) -> torch.Tensor:
        fm_s = F.normalize(fm_s.reshape(fm_s.shape[0], fm_s.shape[1], -1), dim=2)
        fm_t = F.normalize(fm_t.reshape(fm_t.shape[0], fm_t.shape[1], -1), dim=2)
        return (self.poly_kernel(fm_t, fm_t).mean() + self.poly_kernel(fm_s, fm_s).mean()
                - 2 * self.poly_kernel(fm_s, fm_t).mean())

    @staticmethod
    def poly_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(B, C_b, C_a) matrix of ``(b_i . a_j)^2`` (the reference's layout)."""
        return torch.bmm(b, a.transpose(1, 2)).pow(2)


@register("nst")
class NSTLoss(Loss):
    """Adapter: :class:`NST` averaged over ``feats``; student maps resized to
    the teacher's size; ``adapt=True`` adds a 1x1 conv when widths differ.
    (The reference uses one layer, its last stage: ``feats: [p5]`` / ``[f4]``.)"""

    requires = frozenset({"teacher"})

    def __init__(self, feats: Optional[Sequence[str]] = None, adapt: bool = False):
        super().__init__()
        self.core = NST()
        self.pairs = FeaturePairs("nst", feats, adapt=adapt)

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> torch.Tensor:
        pairs = self.pairs(student_out, need_teacher("nst", teacher_out))
        return mean_of([self.core(fs, ft) for fs, ft in pairs])
