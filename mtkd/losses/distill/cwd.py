"""Channel-wise distillation for dense prediction."""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from torch import nn

from mtkd.errors import ConfigError
from mtkd.losses._common import FeatureAdapters, need_teacher
from mtkd.losses._functional import channel_kl, resize_to
from mtkd.losses.base import Loss, register
from mtkd.losses.distill.common import dense_maps, model_device, widths


@register("cwd")
class CWD(Loss):
    """Channel-wise knowledge distillation.

    Shu, Liu, Gao, Yan and Shen, "Channel-wise Knowledge Distillation for
    Dense Prediction" (ICCV 2021): softmax-normalise each channel over space
    (temperature ``tau``) and minimise the KL from teacher to student, scaled
    by ``tau^2`` and divided by channels and batch size (:func:`channel_kl`).

    * ``feats``: feature names (default the neck levels) when ``key`` is
      ``None``. Where the student width differs from the teacher's, a 1x1
      ``LazyConv2d`` adapter (built by :meth:`bind`, or at the first
      forward; trained with the student) maps the student map to the
      teacher's width; equal widths are compared directly. With
      ``adapt: all`` every feature gets a trained 1x1 ``Conv2d`` adapter,
      those between equal widths starting as the identity (the ``kd_feat``
      term of ``mtkd yolo train``). The result is averaged over the levels.
    * ``key: "seg"``: distil the segmentation logits (B, nc+1, H, W), every
      pixel included (the paper has no ignore mask); class counts must
      match.
    * A teacher map of another spatial size is bilinearly resized to the
      student's.
    * ``tau`` defaults to 4, the paper's setting for segmentation logit maps
      (MMRazor's re-implementation defaults to 1; tune it per feature).
    """

    requires = frozenset({"teacher"})

    def __init__(self, feats: Sequence[str] = ("p3", "p4", "p5"), key: Optional[str] = None,
                 tau: float = 4.0, adapt: str = "differ"):
        super().__init__()
        if key not in (None, "seg"):
            raise ConfigError(f"loss cwd.key: expected 'seg' (logits) or none (features), got {key!r}")
        if key is None and (isinstance(feats, str) or not feats):
            raise ConfigError("loss cwd.feats: expected a non-empty list of feature names")
        if tau <= 0:
            raise ConfigError(f"loss cwd.tau: must be > 0, got {tau}")
        if adapt not in ("differ", "all"):
            raise ConfigError(f"loss cwd.adapt: expected 'differ' or 'all', got {adapt!r}")
        if key is not None and adapt != "differ":
            raise ConfigError("loss cwd.adapt: adapters map features; key: seg compares the logits directly")
        self.key, self.tau = key, float(tau)
        self.feats: List[str] = [] if key else [str(f) for f in feats]
        self.adapters = FeatureAdapters("cwd", identity=adapt == "all")

    def bind(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        if teacher is None or self.key is not None:
            return
        self.build_adapters(widths(student, "student", "cwd"), widths(teacher, "teacher", "cwd"),
                            model_device(student))

    def build_adapters(self, student: Mapping[str, int], teacher: Mapping[str, int],
                       device: Optional[torch.device] = None) -> None:
        """Make the adapters of ``feats`` from the widths ``{name: channels}`` of both models."""
        self.adapters.build(self.feats, student, teacher, device)

    def student_parameters(self) -> Iterable[nn.Parameter]:
        return self.adapters.parameters()

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> torch.Tensor:
        teacher_out = need_teacher("cwd", teacher_out)
        terms = [channel_kl(s, resize_to(t.float(), tuple(s.shape[-2:])), self.tau)
                 for s, t in dense_maps("cwd", self.key, student_out, teacher_out, self.feats, self.adapters)]
        return torch.stack(terms).mean()
