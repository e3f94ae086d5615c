"""Output-level distillation of anchor-free detection heads on :class:`~mtkd.structures.DetOutput`.

Three losses, the output terms of ``mtkd yolo train`` (whose ``kd_*`` keys
build them, :mod:`mtkd.yolo.losses`) and of any multi-task config
(``loss.extra: [{name: kd_cls, T: 2.0}, ...]``); they read ``out["det"]`` of
both models (``s`` = student, ``t`` = teacher, ``T`` = temperature, ``w_a`` =
gate):

* ``kd_cls``: per-class binary KL between ``sigmoid(t/T)`` and
  ``sigmoid(s/T)`` times ``T**2`` - Hinton et al., "Distilling the Knowledge in
  a Neural Network" (2015), in the sigmoid (multi-label) form that YOLO's BCE
  classification uses (:func:`~mtkd.losses._functional.binary_kl`). Summed
  over classes, averaged over anchors with the teacher-score gate.
* ``kd_dfl``: KL between the teacher's and the student's box distributions
  (softmax over the ``reg_max`` bins of each side, temperature ``T``, times
  ``T**2``; :func:`~mtkd.losses._functional.soft_kl`), averaged over the four
  sides, gated - Zheng et al., "Localization Distillation for Dense Object
  Detection" (CVPR 2022). Where either head has no distribution
  (``reg_max == 1``, YOLO26) or the two ``reg_max`` differ, the box term is
  the gated L1 distance of the ltrb distances in stride units instead. The
  loss returns ``{"dfl": value}`` or ``{"box": value}``, so the log (and
  ``mtkd yolo train``'s column, ``kd_dfl`` or ``kd_box``) names the one
  computed.
* ``kd_obj``: binary KL on the best detection score, the objectness proxy of
  heads without objectness (for a head with a real objectness, the logit of
  its best joint score, see below), dense and ungated, so background anchors
  the teacher is sure about are distilled too. Summed over anchors and divided
  by the teacher's total score mass ``sum_a w_a`` (at least 1), the way
  Ultralytics divides its dense classification BCE by the assigned target
  mass, so the term keeps its scale relative to Ultralytics' own losses.
  Numerator and denominator are sums of the same per-anchor probability, so
  the ratio is bounded per unit of teacher score mass whatever kind of teacher
  it is.

Teacher-score gating: ``w_a = max_c p_t(a, c)``, the teacher's best detection
score at anchor ``a`` (detached). ``kd_cls`` and ``kd_dfl`` are
``sum_a w_a * term_a / sum_a w_a``, which concentrates them on the anchors the
teacher thinks hold an object - the anchors that matter after NMS.

A head with a real objectness (``obj_is_proxy=False``, mtkd's heads) is
distilled through its joint score ``sigmoid(cls) * sigmoid(obj)``, on either
side: that is the quantity a proxy-objectness head's ``sigmoid(cls)``
estimates, so an Ultralytics student learns from an mtkd teacher and two mtkd
models compare like with like.

Every term is zero when the student's outputs equal the teacher's. Class
counts and anchor counts must agree (a ConfigError naming both otherwise).
Everything is computed in float32 whatever the AMP dtype.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from mtkd.errors import ConfigError
from mtkd.losses._common import need_teacher
from mtkd.losses._functional import binary_kl, soft_kl
from mtkd.losses.base import Loss, register
from mtkd.losses.distill.common import check_classes, output_entry
from mtkd.structures import DetOutput


def score_logits(det: DetOutput) -> torch.Tensor:
    """(B, A, nc) logits of ``det.scores()`` in ``det``'s dtype: ``cls`` itself for a proxy-objectness
    head, else ``logit(sigmoid(cls) * sigmoid(obj))`` (eps 1e-6)."""
    if det.obj_is_proxy:
        return det.cls
    return torch.logit(det.scores(), eps=1e-6)


def best_logit(det: DetOutput) -> torch.Tensor:
    """(B, A) logit of the best detection score: ``obj`` for a proxy-objectness head (the max class
    logit), else the max of :func:`score_logits`."""
    if det.obj_is_proxy:
        return det.obj
    return score_logits(det).amax(-1)


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum(w * v) / sum(w)`` over (B, A); ``weights`` carry no gradient."""
    return (values * weights).sum() / weights.sum().clamp_min(1e-9)


class _DetKD(Loss):
    """Shared part: the temperature, the output pair, the teacher's logits and gate."""

    requires = frozenset({"teacher"})

    def __init__(self, T: float = 2.0):
        super().__init__()
        if not T > 0:
            raise ConfigError(f"loss {self.registry_name}.T: must be > 0, got {T}")
        self.T = float(T)

    def _inputs(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]]
                ) -> Tuple[DetOutput, DetOutput, torch.Tensor, torch.Tensor]:
        """``(student, detached teacher, teacher's float32 score logits, gate w_a)``."""
        name = self.registry_name
        teacher_out = need_teacher(name, teacher_out)
        s: DetOutput = output_entry(student_out, "det", "student", name)
        t: DetOutput = output_entry(teacher_out, "det", "teacher", name).detach()
        check_classes(name, s.num_classes, t.num_classes)
        if s.cls.shape[:2] != t.cls.shape[:2]:
            raise ConfigError(f"loss {name}: teacher output has {tuple(t.cls.shape[:2])} (batch, anchors) but the "
                              f"student's has {tuple(s.cls.shape[:2])} (different input sizes or strides)")
        t_logit = score_logits(t).float()
        return s, t, t_logit, torch.sigmoid(t_logit).amax(-1)


@register("kd_cls")
class ClassKL(_DetKD):
    """Binary KL of the class scores, gated by the teacher's score (Hinton, Vinyals and Dean 2015, sigmoid form).

    ``T**2 * sum_a w_a sum_c KL(Bern(sigmoid(t/T)) || Bern(sigmoid(s/T))) / sum_a w_a``; see
    :mod:`mtkd.losses.distill.det_kd`.
    """

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> torch.Tensor:
        s, _, t_logit, gate = self._inputs(student_out, teacher_out)
        kl = binary_kl(score_logits(s).float(), t_logit, self.T) * (self.T * self.T)
        return weighted_mean(kl.sum(-1), gate)


@register("kd_dfl")
class BoxKL(_DetKD):
    """Localization distillation (Zheng and others, CVPR 2022): gated KL of the box distributions, L1 without them.

    Returns ``{"dfl": gated T**2 * KL}`` where both heads have box distributions of one size, else
    ``{"box": gated L1 of the ltrb distances}``; see :mod:`mtkd.losses.distill.det_kd`.
    """

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        s, t, _, gate = self._inputs(student_out, teacher_out)
        s_dist, t_dist = s.box_dist, t.box_dist
        if s_dist is not None and t_dist is not None and s_dist.shape == t_dist.shape:
            kl = soft_kl(s_dist.float(), t_dist.float(), self.T, dim=-1).sum(-1) * (self.T * self.T)
            return {"dfl": weighted_mean(kl.mean(-1), gate)}  # mean over the 4 sides
        l1 = (s.box.float() - t.box.float()).abs().mean(-1)
        return {"box": weighted_mean(l1, gate)}


@register("kd_obj")
class ObjKL(_DetKD):
    """Dense binary KL of the best detection score, the objectness (Hinton, Vinyals and Dean 2015, sigmoid form).

    Divided by the teacher's score mass:

    ``T**2 * sum_a KL(Bern(sigmoid(best_t/T)) || Bern(sigmoid(best_s/T))) / max(sum_a w_a, 1)``; see
    :mod:`mtkd.losses.distill.det_kd`.
    """

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> torch.Tensor:
        s, _, t_logit, gate = self._inputs(student_out, teacher_out)
        dense = (binary_kl(best_logit(s).float(), t_logit.amax(-1), self.T) * (self.T * self.T)).sum()
        return dense / gate.sum().clamp_min(1.0)
