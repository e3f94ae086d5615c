"""Distillation terms for anchor-free YOLO heads, on :class:`~mtkd.structures.DetOutput`.

Each term is a small function; :class:`YoloKD` weights them, owns the trainable
neck adapters, and returns one named scalar per active term (these become the
``kd_*`` columns of Ultralytics' ``results.csv``).

Terms (``s`` = student, ``t`` = teacher, ``T`` = temperature, ``w_a`` = gate):

* ``kd_cls``: per-class binary KL between ``sigmoid(t/T)`` and
  ``sigmoid(s/T)`` times ``T**2`` - Hinton et al., "Distilling the Knowledge in
  a Neural Network" (2015), in the sigmoid (multi-label) form that YOLO's BCE
  classification uses. Summed over classes, averaged over anchors with the
  teacher-score gate.
* ``kd_dfl``: KL between the teacher's and the student's box distributions
  (softmax over the ``reg_max`` bins of each side, temperature ``T``) - Zheng et
  al., "Localization Distillation for Dense Object Detection" (CVPR 2022).
  Where either head has no distribution (``reg_max == 1``, YOLO26) or the two
  ``reg_max`` differ, the box term is the L1 distance of the ltrb distances in
  stride units instead, and its column is named ``kd_box``.
* ``kd_obj``: binary KL on the objectness proxy, the best class logit on both
  sides (for a teacher with a real objectness, the logit of its best joint
  score, see below), dense and ungated, so background anchors the teacher is
  sure about are distilled too. Summed over anchors and divided by the
  teacher's total score mass ``sum_a w_a`` (at least 1), the way Ultralytics
  divides its dense classification BCE by the assigned target mass, so the
  term keeps its scale relative to Ultralytics' own losses. Numerator and
  denominator are sums of the same per-anchor probability, so the ratio is
  bounded per unit of teacher score mass whatever kind of teacher it is.
* ``kd_feat``: channel-wise distillation (CWD) of the neck maps p3/p4/p5 -
  Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction" (ICCV
  2021): per channel, KL between spatial softmaxes (temperature ``feat_t``),
  times ``feat_t**2``, after a 1x1 conv adapter on the student map. Adapters
  whose widths match start as the identity (so the term starts at the plain
  CWD of the raw maps); others use PyTorch's default init.

Teacher-score gating: ``w_a = max_c p_t(a, c)``, the teacher's best detection
score at anchor ``a`` (detached). ``kd_cls`` and the box term are
``sum_a w_a * term_a / sum_a w_a``, which concentrates them on the anchors the
teacher thinks hold an object - the anchors that matter after NMS.

A teacher with a real objectness (``obj_is_proxy=False``, e.g. an mtkd head) is
distilled through its joint score ``sigmoid(cls) * sigmoid(obj)``, the
quantity a proxy-objectness student's ``sigmoid(cls)`` estimates.

Every term is zero when the student's outputs equal the teacher's.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mtkd.errors import ConfigError
from mtkd.structures import DetOutput


#: The temperatures among the ``kd_*`` numbers; the others are weights.
TEMPERATURES = ("kd_t", "kd_feat_t")


def check_value(key: str, value: float) -> float:
    """``value`` of the ``kd_*`` weight or temperature ``key`` if it is valid, else a one-line ConfigError.

    Weights must be finite and >= 0 (0 switches a term off); temperatures finite and > 0.
    """
    if key in TEMPERATURES:
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{key}: temperature must be a finite number > 0, got {value}")
    elif not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{key}: weight must be a finite number >= 0, got {value}")
    return value


def binary_kl(student_logit: torch.Tensor, teacher_logit: torch.Tensor, t: float) -> torch.Tensor:
    """Element-wise ``KL(Bern(sigmoid(t_l/T)) || Bern(sigmoid(s_l/T))) * T**2``.

    Computed as ``BCE(s/T, p) - BCE(t/T, p)`` (cross-entropy minus entropy),
    which is stable in the logits; clamped at 0 against rounding.
    """
    p = torch.sigmoid(teacher_logit / t)
    ce = F.binary_cross_entropy_with_logits(student_logit / t, p, reduction="none")
    ent = F.binary_cross_entropy_with_logits(teacher_logit / t, p, reduction="none")
    return (ce - ent).clamp_min(0.0) * (t * t)


def distribution_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    """``KL(softmax(t/T) || softmax(s/T)) * T**2`` over the last dim, keeping the others."""
    log_p = F.log_softmax(teacher_logits / t, -1)
    log_q = F.log_softmax(student_logits / t, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1) * (t * t)


def cwd(student_map: torch.Tensor, teacher_map: torch.Tensor, t: float) -> torch.Tensor:
    """Channel-wise distillation: mean over (B, C) of the spatial-softmax KL, times ``T**2``."""
    b, c = student_map.shape[:2]
    return distribution_kl(student_map.reshape(b, c, -1), teacher_map.reshape(b, c, -1), t).mean()


def teacher_logits(det: DetOutput) -> torch.Tensor:
    """Per-class logits of the teacher's *detection score* (see the module doc)."""
    if det.obj_is_proxy:
        return det.cls
    return torch.logit(det.scores(), eps=1e-6)


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum(w * v) / sum(w)`` over (B, A); ``weights`` carry no gradient."""
    return (values * weights).sum() / weights.sum().clamp_min(1e-9)


class YoloKD(nn.Module):
    """Weighted output-level and neck-feature distillation for YOLO heads.

    Args:
        cls, dfl, obj, feat: weights of ``kd_cls``, the box term (``kd_dfl`` or
            ``kd_box``), ``kd_obj`` and ``kd_feat``; a term with weight 0 is
            neither computed nor logged.
        t: temperature of the class, objectness and box-distribution terms.
        feat_t: CWD temperature.
        student_channels / teacher_channels: widths of the neck maps
            ``{"p3": C, ...}``; needed only when ``feat > 0``.

    ``forward`` returns ``{name: weighted scalar}``; the sum is the KD loss.
    """

    def __init__(self, cls: float = 1.0, dfl: float = 0.5, obj: float = 0.5, feat: float = 0.0,
                 t: float = 2.0, feat_t: float = 1.0,
                 student_channels: Optional[Mapping[str, int]] = None,
                 teacher_channels: Optional[Mapping[str, int]] = None):
        super().__init__()
        for key, value in (("kd_cls", cls), ("kd_dfl", dfl), ("kd_obj", obj), ("kd_feat", feat), ("kd_t", t),
                           ("kd_feat_t", feat_t)):
            check_value(key, value)
        self.w_cls, self.w_box, self.w_obj, self.w_feat = float(cls), float(dfl), float(obj), float(feat)
        self.t, self.feat_t = float(t), float(feat_t)
        self.adapters = nn.ModuleDict()
        if self.w_feat > 0:
            if not student_channels or not teacher_channels:
                raise ConfigError("kd_feat: feature distillation needs the student's and the teacher's neck widths")
            if sorted(student_channels) != sorted(teacher_channels):
                raise ConfigError(f"kd_feat: student neck levels {sorted(student_channels)} differ from the "
                                  f"teacher's {sorted(teacher_channels)}")
            for name in sorted(student_channels):
                self.adapters[name] = _adapter(int(student_channels[name]), int(teacher_channels[name]))

    def forward(self, student: DetOutput, teacher: DetOutput,
                student_feats: Optional[Mapping[str, torch.Tensor]] = None,
                teacher_feats: Optional[Mapping[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        if student.cls.shape != teacher.cls.shape:
            raise ConfigError(f"kd_teacher: teacher output {tuple(teacher.cls.shape)} (batch, anchors, classes) does "
                              f"not match the student's {tuple(student.cls.shape)}; both need the same classes and "
                              "strides")
        out: Dict[str, torch.Tensor] = {}
        s_cls = student.cls.float()
        t_logit = teacher_logits(teacher).detach().float()
        gate = torch.sigmoid(t_logit).amax(-1)  # (B, A) teacher's best score
        if self.w_cls:
            out["kd_cls"] = self.w_cls * weighted_mean(binary_kl(s_cls, t_logit, self.t).sum(-1), gate)
        if self.w_box:
            name, value = self._box_term(student, teacher, gate)
            out[name] = self.w_box * value
        if self.w_obj:
            dense = binary_kl(student.obj.float(), t_logit.amax(-1), self.t).sum()
            out["kd_obj"] = self.w_obj * dense / gate.sum().clamp_min(1.0)
        if self.w_feat:
            if student_feats is None or teacher_feats is None:
                raise ValueError("kd_feat > 0 but neck features were not passed")
            terms = []
            for name, adapter in self.adapters.items():
                s_map, t_map = adapter(student_feats[name].float()), teacher_feats[name].detach().float()
                if s_map.shape != t_map.shape:
                    raise ConfigError(f"kd_feat: neck level {name} has shape {tuple(s_map.shape[1:])} (after the "
                                      f"adapter) in the student but {tuple(t_map.shape[1:])} in the teacher")
                terms.append(cwd(s_map, t_map, self.feat_t))
            out["kd_feat"] = self.w_feat * torch.stack(terms).mean()
        return out

    def _box_term(self, student: DetOutput, teacher: DetOutput, gate: torch.Tensor) -> Tuple[str, torch.Tensor]:
        s_dist, t_dist = student.box_dist, teacher.box_dist
        if s_dist is not None and t_dist is not None and s_dist.shape == t_dist.shape:
            kl = distribution_kl(s_dist.float(), t_dist.detach().float(), self.t).mean(-1)  # mean over 4 sides
            return "kd_dfl", weighted_mean(kl, gate)
        l1 = (student.box.float() - teacher.box.detach().float()).abs().mean(-1)
        return "kd_box", weighted_mean(l1, gate)


def _adapter(c_in: int, c_out: int) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, 1)
    if c_in == c_out:
        with torch.no_grad():
            conv.weight.copy_(torch.eye(c_in).view(c_in, c_in, 1, 1))
            conv.bias.zero_()
    return conv
