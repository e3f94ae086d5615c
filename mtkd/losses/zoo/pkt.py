"""PKT: probabilistic knowledge transfer with cosine-similarity kernels.

Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge
Transfer", ECCV 2018,
http://openaccess.thecvf.com/content_ECCV_2018/papers/Nikolaos_Passalis_Learning_Deep_Representations_ECCV_2018_paper.pdf

Reference (AberHu/Knowledge-Distillation-Zoo ``kd_losses/pkt.py``, itself from
passalis/probabilistic_kt), kept as is, with ``eps = 1e-6``:

1. rows are L2-normalised as ``x / (||x|| + eps)``; NaNs are set to 0;
2. cosine-similarity matrices ``S = X X^T`` (B x B), mapped to [0,1] by ``(S+1)/2``;
3. each row is divided by its sum: conditional probabilities ``P(j|i)``;
4. ``loss = mean_ij P_t log((P_t + eps) / (P_s + eps))`` over all B*B entries
   (a KL divergence averaged, not summed, over rows and columns).

Only B x B similarities are compared, so embedding widths may differ.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from mtkd.losses._common import need_teacher
from mtkd.losses.base import Loss, register
from mtkd.losses.zoo._adapt import check_feats, embedding_pairs, mean_of


class PKTCosSim(nn.Module):
    """Tensor core on (B, D) embeddings (D may differ between student and teacher)."""

    def forward(self, feat_s: torch.Tensor, feat_t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        p_s = self.conditional_probs(feat_s, eps)
        p_t = self.conditional_probs(feat_t, eps)
        return torch.mean(p_t * torch.log((p_t + eps) / (p_s + eps)))

    @staticmethod
    def conditional_probs(feat: torch.Tensor, eps: float) -> torch.Tensor:
        feat = feat / (feat.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
        feat = torch.where(torch.isnan(feat), torch.zeros_like(feat), feat)
        sim = (feat @ feat.t() + 1.0) / 2.0
        return sim / sim.sum(dim=1, keepdim=True)


PKT = PKTCosSim


@register("pkt")
class PKTLoss(Loss):
    """Adapter: :class:`PKTCosSim` on ``out["embed"]`` (``feats=None``; pooled
    ``p5`` for outputs without ``embed``) or on the
    global average pool of each named feature map (``feats: [p5]``), averaged
    over the names."""

    requires = frozenset({"teacher"})

    def __init__(self, feats: Optional[Sequence[str]] = None):
        super().__init__()
        self.core = PKTCosSim()
        self.feats = check_feats(feats, "pkt")

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> torch.Tensor:
        pairs = embedding_pairs(student_out, need_teacher("pkt", teacher_out), self.feats, "pkt")
        return mean_of([self.core(es, et) for es, et in pairs])
