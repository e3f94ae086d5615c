"""The ``kd_*`` terms of ``mtkd yolo train``: registered mtkd losses on :class:`~mtkd.structures.DetOutput`.

:class:`YoloKD` builds one registered loss per active term, weights it, and
returns one named scalar per term (these become the ``kd_*`` columns of
Ultralytics' ``results.csv``). The same losses serve the multi-task trainer's
``loss.extra`` entries; the maths and its references are in
:mod:`mtkd.losses.distill.det_kd` and :mod:`mtkd.losses.distill.cwd`.

============  ==========================================================================
key           loss
============  ==========================================================================
``kd_cls``    ``kd_cls`` (temperature ``kd_t``): gated binary KL of the class scores
``kd_dfl``    ``kd_dfl`` (``kd_t``): gated KL of the box distributions, column ``kd_dfl``;
              L1 of the ltrb distances where a head has none, column ``kd_box``
``kd_obj``    ``kd_obj`` (``kd_t``): dense binary KL of the objectness proxy
``kd_feat``   ``cwd`` on the neck maps p3/p4/p5 (``tau = kd_feat_t``, ``adapt: all``): a
              trained 1x1 conv adapter on every student map, those whose widths match
              starting as the identity (so the term starts at the plain CWD of the raw
              maps), the others with PyTorch's default init
============  ==========================================================================
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional

import torch
from torch import nn

from mtkd.errors import ConfigError
from mtkd.losses.base import build_loss
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


class YoloKD(nn.Module):
    """Weighted output-level and neck-feature distillation for YOLO heads.

    Args:
        cls, dfl, obj, feat: weights of ``kd_cls``, the box term (``kd_dfl`` or
            ``kd_box``), ``kd_obj`` and ``kd_feat``; a term with weight 0 is
            neither built, computed nor logged.
        t: temperature of the class, objectness and box-distribution terms.
        feat_t: CWD temperature.
        student_channels / teacher_channels: widths of the neck maps
            ``{"p3": C, ...}``; needed only when ``feat > 0``.

    ``forward`` returns ``{name: weighted scalar}``; the sum is the KD loss.
    ``terms`` holds the losses by ``kd_*`` key, ``adapters`` the trainable
    neck adapters by level.
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
        self.weights: Dict[str, float] = {}
        self.terms = nn.ModuleDict()
        for key, weight in (("kd_cls", self.w_cls), ("kd_dfl", self.w_box), ("kd_obj", self.w_obj)):
            if weight:
                self.weights[key] = weight
                self.terms[key] = build_loss(key, key, T=self.t)
        if self.w_feat > 0:
            if not student_channels or not teacher_channels:
                raise ConfigError("kd_feat: feature distillation needs the student's and the teacher's neck widths")
            if sorted(student_channels) != sorted(teacher_channels):
                raise ConfigError(f"kd_feat: student neck levels {sorted(student_channels)} differ from the "
                                  f"teacher's {sorted(teacher_channels)}")
            cwd = build_loss("cwd", "kd_feat", feats=sorted(student_channels), tau=self.feat_t, adapt="all")
            cwd.build_adapters({k: int(v) for k, v in student_channels.items()},
                               {k: int(v) for k, v in teacher_channels.items()})
            self.weights["kd_feat"] = self.w_feat
            self.terms["kd_feat"] = cwd

    @property
    def adapters(self) -> nn.ModuleDict:
        """The ``kd_feat`` adapters by neck level (empty without ``kd_feat``)."""
        return self.terms["kd_feat"].adapters.convs if "kd_feat" in self.terms else nn.ModuleDict()

    def forward(self, student: DetOutput, teacher: DetOutput,
                student_feats: Optional[Mapping[str, torch.Tensor]] = None,
                teacher_feats: Optional[Mapping[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        if student.cls.shape != teacher.cls.shape:
            raise ConfigError(f"kd_teacher: teacher output {tuple(teacher.cls.shape)} (batch, anchors, classes) does "
                              f"not match the student's {tuple(student.cls.shape)}; both need the same classes and "
                              "strides")
        if self.w_feat and (student_feats is None or teacher_feats is None):
            raise ValueError("kd_feat > 0 but neck features were not passed")
        student_out = {"det": student, "feats": student_feats}
        teacher_out = {"det": teacher, "feats": teacher_feats}
        out: Dict[str, torch.Tensor] = {}
        for key, loss in self.terms.items():
            value, name = loss(student_out, teacher_out, {}), key
            if isinstance(value, dict):  # kd_dfl: {"dfl": ...} or {"box": ...}
                (sub, value), = value.items()
                name = f"kd_{sub}"
            out[name] = self.weights[key] * value
        return out
