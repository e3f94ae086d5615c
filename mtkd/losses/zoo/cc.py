"""CC: correlation congruence.

Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019,
http://openaccess.thecvf.com/content_ICCV_2019/papers/Peng_Correlation_Congruence_for_Knowledge_Distillation_ICCV_2019_paper.pdf

Reference (AberHu/Knowledge-Distillation-Zoo ``kd_losses/cc.py``): the
correlation between instances is a Gaussian RBF kernel expanded as a
``P_order`` Taylor series. With ``f`` the L2-normalised embeddings and
``s = f f^T`` (B x B cosine similarities)::

    k(s) = sum_{p=0..P_order} exp(-2 gamma) (2 gamma)^p / p! * s^p   (element-wise powers)
    CC(gamma, P_order)(feat_s, feat_t) = mse(k(s_s), k(s_t))          (mean over B x B)

(exp(-gamma ||a-b||^2) = exp(-2 gamma) exp(2 gamma a.b) for unit vectors.) The
matrices are B x B, so the embeddings may differ in width. Defaults
``gamma=0.4, P_order=2`` as in the reference's train script.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mtkd.losses._common import need_teacher
from mtkd.losses.base import Loss, register
from mtkd.losses.zoo._adapt import get_embedding


class CC(nn.Module):
    """Tensor core: MSE between the Taylor-expanded RBF correlation matrices."""

    def __init__(self, gamma: float, P_order: int):
        super().__init__()
        self.gamma = float(gamma)
        self.P_order = int(P_order)

    def forward(self, feat_s: torch.Tensor, feat_t: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.get_correlation_matrix(feat_s), self.get_correlation_matrix(feat_t))

    def get_correlation_matrix(self, feat: torch.Tensor) -> torch.Tensor:
        unit = F.normalize(feat, p=2, dim=-1)
        sim = unit @ unit.t()
        corr = torch.zeros_like(sim)
        for p in range(self.P_order + 1):
            coef = math.exp(-2 * self.gamma) * (2 * self.gamma) ** p / math.factorial(p)
            corr = corr + coef * sim.pow(p)
        return corr


def embedding_feat(out: Dict[str, Any], feat: Optional[str]) -> Optional[str]:
    """The feature whose global average pool is the embedding: ``feat`` when
    set; else None (use ``out["embed"]``) for classifiers and ``"p5"`` for
    dense models, which have no ``embed``."""
    if feat is not None or "embed" in out:
        return feat
    return "p5"


@register("cc")
class CCLoss(Loss):
    """Adapter: :class:`CC` on pooled embeddings: ``out["embed"]`` on
    classifiers, the global average pool of ``feat`` (default ``"p5"``) on
    dense models."""

    requires = frozenset({"teacher"})

    def __init__(self, gamma: float = 0.4, P_order: int = 2, feat: Optional[str] = None):
        super().__init__()
        self.feat = feat
        self.core = CC(gamma, P_order)

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> torch.Tensor:
        teacher_out = need_teacher("cc", teacher_out)
        name = embedding_feat(student_out, self.feat)
        emb_s = get_embedding(student_out, name, "cc")
        emb_t = get_embedding(teacher_out, name, "cc").detach()
        return self.core(emb_s, emb_t)
