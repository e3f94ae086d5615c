"""FSP: flow-of-solution-procedure matrices between consecutive layers.

Yim et al., "A Gift from Knowledge Distillation: Fast Optimization, Network
Minimization and Transfer Learning", CVPR 2017,
http://openaccess.thecvf.com/content_cvpr_2017/papers/Yim_A_Gift_From_CVPR_2017_paper.pdf

Reference (AberHu/Knowledge-Distillation-Zoo ``kd_losses/fsp.py``), kept as is:

* ``G(F1, F2) = F1 F2^T / (H*W)``, a (B, C1, C2) matrix, with F1 (B,C1,H*W)
  and F2 (B,C2,H*W);
* when F1 is taller than F2 it is first ``adaptive_avg_pool2d``-ed to F2's size;
* ``FSP()(fm_s1, fm_s2, fm_t1, fm_t2) = mse(G_s, G_t)``, mean over B*C1*C2.

Fixed defect: the reference only pools F1 and crashes when F2 is the larger
map (e.g. a feature list given from deep to shallow); here F2 is then pooled to
F1's size. Values are unchanged wherever the reference runs.

In the reference, FSP (like AB) drives a student *initialisation* stage (the
KD term alone, cross-entropy weighted 0, for 50 epochs, then lambda_kd = 0);
in mtkd the weighting is the config's (loss weights / alpha).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtkd.errors import ConfigError
from mtkd.losses._common import need_teacher
from mtkd.losses.base import Loss, register
from mtkd.losses.zoo._adapt import FeaturePairs, mean_of


class FSP(nn.Module):
    """Tensor core: MSE between the student's and the teacher's FSP matrices."""

    def forward(self, fm_s1: torch.Tensor, fm_s2: torch.Tensor, fm_t1: torch.Tensor,
                fm_t2: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.fsp_matrix(fm_s1, fm_s2), self.fsp_matrix(fm_t1, fm_t2))

    @staticmethod
    def fsp_matrix(fm1: torch.Tensor, fm2: torch.Tensor) -> torch.Tensor:
        if fm1.shape[2] > fm2.shape[2]:
            fm1 = F.adaptive_avg_pool2d(fm1, fm2.shape[2:])
        elif fm1.shape[2:] != fm2.shape[2:]:
            fm2 = F.adaptive_avg_pool2d(fm2, fm1.shape[2:])
        fm1 = fm1.reshape(fm1.shape[0], fm1.shape[1], -1)
        fm2 = fm2.reshape(fm2.shape[0], fm2.shape[1], -1).transpose(1, 2)
        return torch.bmm(fm1, fm2) / fm1.shape[2]


@register("fsp")
class FSPLoss(Loss):
    """Adapter: :class:`FSP` over consecutive pairs of ``feats`` (default
    p3->p4, p4->p5; classifiers f1->f2->f3->f4), averaged over the pairs as the
    reference averages its three. Student maps pass a 1x1 conv to the
    teacher's width when widths differ and are resized to the teacher's size,
    so both FSP matrices are C1_t x C2_t."""

    requires = frozenset({"teacher"})

    def __init__(self, feats: Optional[Sequence[str]] = None, adapt: bool = True):
        super().__init__()
        if feats is not None and len(feats) < 2:
            raise ConfigError(f"loss 'fsp': feats: needs at least two feature names, got {feats!r}")
        self.core = FSP()
        self.pairs = FeaturePairs("fsp", feats, adapt=adapt)

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> torch.Tensor:
        pairs = self.pairs(student_out, need_teacher("fsp", teacher_out))
        if len(pairs) < 2:
            raise ConfigError("loss 'fsp': feats: needs at least two feature maps")
        terms = [self.core(s1, s2, t1, t2) for (s1, t1), (s2, t2) in zip(pairs[:-1], pairs[1:])]
        return mean_of(terms)
