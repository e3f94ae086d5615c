"""IRG: instance relationship graph.

Liu et al., "Knowledge Distillation via Instance Relationship Graph", CVPR 2019,
http://openaccess.thecvf.com/content_CVPR_2019/papers/Liu_Knowledge_Distillation_via_Instance_Relationship_Graph_CVPR_2019_paper.pdf

Reference (AberHu/Knowledge-Distillation-Zoo ``kd_losses/irg.py``):
``IRG(w_irg_vert, w_irg_edge, w_irg_tran)(irg_s, irg_t)`` with
``irg = (fm1, fm2, feat, out)`` (two feature maps, fm1 earlier in the network,
the penultimate embedding and the logits)::

    vert = mse(out_s, out_t)
    edge = (mse(E(feat_s), E(feat_t)) + mse(E(fm1_s), E(fm1_t)) + mse(E(fm2_s), E(fm2_t))) / 3
    tran = mse(T(fm1_s, fm2_s), T(fm1_t, fm2_t))
    loss = w_irg_vert * vert + w_irg_edge * edge + w_irg_tran * tran

``E(x)`` is the B x B matrix of squared Euclidean distances between the
flattened samples (computed as |a|^2 + |b|^2 - 2 a.b, clamped at 1e-12, the
diagonal set to 0), divided by its maximum. ``T(fm1, fm2)`` is the (B,) vector
of squared distances between each sample's fm1 and fm2 (clamped at 1e-12),
divided by its maximum, after average-pooling fm1 to fm2's spatial size when
fm1 is larger and, when fm1 has fewer channels, averaging fm2's channels in
consecutive groups down to fm1's width. The reference always uses squared
distances; so does this module. Defaults ``0.1, 5.0, 5.0`` as in the
reference's train script.

Fixed defects (documented deviations):

* ``E`` at batch size 1 (or for identical samples) is all zeros and the
  reference divides 0 by 0 (NaN); here the maximum is clamped at 1e-12, which
  changes nothing when the maximum is positive.
* The reference averages channel *pairs* (``(fm2[:,0::2] + fm2[:,1::2]) / 2``),
  which only works when fm2 has exactly twice fm1's channels; here fm2 is
  averaged in groups of ``C2 / C1`` consecutive channels, identical for a
  ratio of 2 and defined for any integer ratio (others raise ConfigError).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mtkd.errors import ConfigError
from mtkd.losses._common import need_teacher
from mtkd.losses.base import Loss, register
from mtkd.losses.zoo._adapt import get_embedding, get_feature, get_output, resolve_feats
from mtkd.losses.zoo.cc import embedding_feat

IRGInputs = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
_EPS = 1e-12


def _edge(x: torch.Tensor) -> torch.Tensor:
    """Max-normalised B x B squared-distance matrix with a zero diagonal."""
    flat = x.reshape(x.shape[0], -1)
    sq = flat.pow(2).sum(dim=1)
    dist = (sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * flat @ flat.t()).clamp(min=_EPS)
    dist = dist * (1 - torch.eye(len(flat), dtype=dist.dtype, device=dist.device))
    return dist / dist.max().clamp(min=_EPS)


def _transform(fm1: torch.Tensor, fm2: torch.Tensor) -> torch.Tensor:
    """Max-normalised (B,) squared distances between each sample's fm1 and fm2."""
    if fm1.shape[2] > fm2.shape[2]:
        fm1 = F.adaptive_avg_pool2d(fm1, fm2.shape[2:])
    c1, c2 = fm1.shape[1], fm2.shape[1]
    if c1 < c2:
        if c2 % c1:
            raise ConfigError(f"loss 'irg': fms: the later map's width {c2} is not a multiple of "
                              f"the earlier map's width {c1}")
        fm2 = fm2.reshape(fm2.shape[0], c1, c2 // c1, *fm2.shape[2:]).mean(dim=2)
    a, b = fm1.reshape(fm1.shape[0], -1), fm2.reshape(fm2.shape[0], -1)
    if a.shape != b.shape:
        raise ConfigError(f"loss 'irg': fms: maps of shapes {tuple(fm1.shape)} and {tuple(fm2.shape)} "
                          "cannot be compared (fm1 must precede fm2 in the network)")
    dist = (a - b).pow(2).sum(dim=-1).clamp(min=_EPS)
    return dist / dist.max()


class IRG(nn.Module):
    """Tensor core: weighted vertex + edge + transformation terms (see module doc)."""

    def __init__(self, w_irg_vert: float, w_irg_edge: float, w_irg_tran: float):
        super().__init__()
        self.w_irg_vert = float(w_irg_vert)
        self.w_irg_edge = float(w_irg_edge)
        self.w_irg_tran = float(w_irg_tran)

    def forward(self, irg_s: Sequence[torch.Tensor], irg_t: Sequence[torch.Tensor]) -> torch.Tensor:
        fm_s1, fm_s2, feat_s, out_s = irg_s
        fm_t1, fm_t2, feat_t, out_t = irg_t
        vert = F.mse_loss(out_s, out_t)
        edge = (F.mse_loss(_edge(feat_s), _edge(feat_t))
                + F.mse_loss(_edge(fm_s1), _edge(fm_t1))
                + F.mse_loss(_edge(fm_s2), _edge(fm_t2))) / 3.0
        tran = F.mse_loss(_transform(fm_s1, fm_s2), _transform(fm_t1, fm_t2))
        return self.w_irg_vert * vert + self.w_irg_edge * edge + self.w_irg_tran * tran


@register("irg")
class IRGLoss(Loss):
    """Adapter: builds ``(fm1, fm2, feat, out)`` for each model.

    * ``fms``: two feature-map names, earlier first; default the last two of
      the model's feature list (``p4, p5`` dense, ``f3, f4`` classifiers;
      the reference uses its last two residual stages).
    * ``feat``: the embedding, ``out["embed"]`` on classifiers, the global
      average pool of ``feat`` (default ``"p5"``) on dense models.
    * ``out`` (vertex): ``out["logits"]`` on classifiers; on dense models the
      segmentation logits averaged over pixels, (B, K).
    """

    requires = frozenset({"teacher"})

    def __init__(self, w_irg_vert: float = 0.1, w_irg_edge: float = 5.0, w_irg_tran: float = 5.0,
                 fms: Optional[Sequence[str]] = None, feat: Optional[str] = None):
        super().__init__()
        if fms is not None and (isinstance(fms, str) or len(fms) != 2):
            raise ConfigError(f"loss 'irg': fms: expected two feature names, got {fms!r}")
        self.fms = None if fms is None else list(fms)
        self.feat = feat
        self.core = IRG(w_irg_vert, w_irg_edge, w_irg_tran)

    def _inputs(self, out: Dict[str, Any], fms: Sequence[str], feat: Optional[str]) -> IRGInputs:
        fm1, fm2 = (get_feature(out, n, "irg") for n in fms)
        if "logits" in out:
            logits = get_output(out, "logits", "irg")
        else:
            logits = get_output(out, "seg", "irg").mean(dim=(2, 3))
        return fm1, fm2, get_embedding(out, feat, "irg"), logits

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> torch.Tensor:
        teacher_out = need_teacher("irg", teacher_out)
        fms = self.fms if self.fms is not None else resolve_feats(None, student_out)[-2:]
        if len(fms) != 2:
            raise ConfigError("loss 'irg': fms: the model output has fewer than two feature maps")
        feat = embedding_feat(student_out, self.feat)
        irg_s = self._inputs(student_out, fms, feat)
        irg_t = tuple(t.detach() for t in self._inputs(teacher_out, fms, feat))
        return self.core(irg_s, irg_t)
