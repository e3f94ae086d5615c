"""RKD: relational knowledge distillation (distance- and angle-wise).

Park et al., "Relational Knowledge Distillation", CVPR 2019,
https://arxiv.org/pdf/1904.05068.pdf

Reference (AberHu/Knowledge-Distillation-Zoo ``kd_losses/rkd.py``, itself from
lenscloth/RKD), kept as is:

* distance: pairwise Euclidean distances ``sqrt(clamp(|x_i|^2 + |x_j|^2 -
  2 x_i.x_j, min=1e-12))`` with the diagonal set to 0, each matrix divided by
  the mean of its positive entries; ``smooth_l1`` (beta 1, mean) between them;
* angle: for every triple, the cosine of the angle at ``i`` between
  ``x_j - x_i`` and ``x_k - x_i`` (difference vectors L2-normalised with
  ``F.normalize``), flattened B^3; ``smooth_l1`` between them;
* ``RKD(w_dist, w_angle)(feat_s, feat_t) = w_dist * dist + w_angle * angle``
  (defaults 25 and 50, the reference's train script).

Fixed defect: with batch size 1 (or all embeddings identical) there is no
positive distance and the reference divides by the mean of an empty set
(NaN); here the distance term is 0 then, which is its limit (nothing to relate).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtkd.losses._common import need_teacher
from mtkd.losses.base import Loss, register
from mtkd.losses.zoo._adapt import check_feats, embedding_pairs, mean_of


class RKD(nn.Module):
    """Tensor core on (B, D) embeddings (D may differ between student and teacher)."""

    def __init__(self, w_dist: float, w_angle: float):
        super().__init__()
        self.w_dist = float(w_dist)
        self.w_angle = float(w_angle)

    def forward(self, feat_s: torch.Tensor, feat_t: torch.Tensor) -> torch.Tensor:
        return self.w_dist * self.rkd_dist(feat_s, feat_t) + self.w_angle * self.rkd_angle(feat_s, feat_t)

    def rkd_dist(self, feat_s: torch.Tensor, feat_t: torch.Tensor) -> torch.Tensor:
        d_t = self.normalised_dist(feat_t)
        d_s = self.normalised_dist(feat_s)
        if d_t is None or d_s is None:
            return feat_s.sum() * 0.0
        return F.smooth_l1_loss(d_s, d_t)

    def normalised_dist(self, feat: torch.Tensor) -> Optional[torch.Tensor]:
        dist = self.pdist(feat)
        positive = dist[dist > 0]
        if positive.numel() == 0:
            return None
        return dist / positive.mean()

    @staticmethod
    def rkd_angle(feat_s: torch.Tensor, feat_t: torch.Tensor) -> torch.Tensor:
        def angles(feat: torch.Tensor) -> torch.Tensor:
            vd = F.normalize(feat.unsqueeze(0) - feat.unsqueeze(1), p=2, dim=2)
            return torch.bmm(vd, vd.transpose(1, 2)).reshape(-1)

        return F.smooth_l1_loss(angles(feat_s), angles(feat_t))

    @staticmethod
    def pdist(feat: torch.Tensor, squared: bool = False, eps: float = 1e-12) -> torch.Tensor:
        sq = feat.pow(2).sum(dim=1)
        dist = (sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * feat @ feat.t()).clamp(min=eps)
        if not squared:
            dist = dist.sqrt()
        eye = torch.eye(len(feat), dtype=torch.bool, device=feat.device)
        return dist.masked_fill(eye, 0.0)


@register("rkd")
class RKDLoss(Loss):
    """Adapter: :class:`RKD` on ``out["embed"]`` (``feats=None``; pooled ``p5``
    for outputs without ``embed``) or on the
    global average pool of each named feature map, averaged over the names."""

    requires = frozenset({"teacher"})

    def __init__(self, w_dist: float = 25.0, w_angle: float = 50.0, feats: Optional[Sequence[str]] = None):
        super().__init__()
        self.core = RKD(w_dist, w_angle)
        self.feats = check_feats(feats, "rkd")

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> torch.Tensor:
        pairs = embedding_pairs(student_out, need_teacher("rkd", teacher_out), self.feats, "rkd")
        return mean_of([self.core(es, et) for es, et in pairs])
