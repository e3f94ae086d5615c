"""YOLO-style detection logit distillation on the canonical per-anchor format."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from mtkd.errors import ConfigError
from mtkd.losses._common import need_teacher
from mtkd.losses.base import Loss, register
from mtkd.losses.distill.common import check_classes, output_entry
from mtkd.structures import DetOutput


def check_anchor_grids(loss: str, s: DetOutput, t: DetOutput) -> None:
    """Student and teacher must share the anchor grid (strides and input size)."""
    s_str = sorted({int(v) for v in s.strides.flatten().tolist()})
    t_str = sorted({int(v) for v in t.strides.flatten().tolist()})
    if s_str != t_str:
        raise ConfigError(f"loss {loss}: teacher strides {t_str} differ from student strides {s_str}")
    if s.anchors.shape != t.anchors.shape or not torch.equal(
            s.strides.to(t.strides.device, t.strides.dtype), t.strides):
        raise ConfigError(f"loss {loss}: teacher has {t.anchors.shape[0]} anchors but the student has "
                          f"{s.anchors.shape[0]} (different input sizes or level layouts)")


@register("det_mse")
class DetMSE(Loss):
    """Objectness / box / class MSE between teacher and student, per anchor.

    Mehta and Ozturk, "Object detection at 200 Frames Per Second" (ECCV-W
    2018): distil a one-stage detector's objectness, class and box outputs
    with L2 terms, the box and class terms gated by the teacher's
    objectness so that the many background anchors do not swamp them.

    With ``p = sigmoid(obj)`` (for Ultralytics heads ``obj`` is the max-class
    proxy, see :class:`DetOutput`), over the whole batch:

    * foreground ``F`` = anchors with ``p_teacher > gate_thresh``;
      ``N = max(|F|, 1)`` normalises all three terms;
    * ``obj = w_obj * sum_{all anchors} (p_s - p_t)^2 / N``;
    * ``box = w_box * sum_{a in G} sum_{4 sides} (ltrb_s - ltrb_t)^2 / N`` on
      ltrb distances in stride units (``DetOutput.box``);
    * ``cls = w_cls * sum_{a in G} sum_{classes} (sigmoid(cls_s) - sigmoid(cls_t))^2 / N``;

    where ``G = F`` when ``gate`` is true and all anchors otherwise (still
    divided by ``N``, so ungated terms grow with the anchor count: lower
    ``w_box``/``w_cls`` accordingly). Returns ``{"obj", "box", "cls"}``.

    Anchor grids must match (same strides and input size) and class counts
    must agree; each mismatch is a ConfigError naming both values.
    """

    requires = frozenset({"teacher"})

    def __init__(self, w_obj: float = 1.0, w_box: float = 1.0, w_cls: float = 1.0,
                 gate: bool = True, gate_thresh: float = 0.5):
        super().__init__()
        if not 0.0 <= gate_thresh < 1.0:
            raise ConfigError(f"loss det_mse.gate_thresh: must be in [0, 1), got {gate_thresh}")
        self.w_obj, self.w_box, self.w_cls = float(w_obj), float(w_box), float(w_cls)
        self.gate, self.gate_thresh = bool(gate), float(gate_thresh)

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        teacher_out = need_teacher("det_mse", teacher_out)
        s: DetOutput = output_entry(student_out, "det", "student", "det_mse")
        t: DetOutput = output_entry(teacher_out, "det", "teacher", "det_mse").detach()
        check_classes("det_mse", s.num_classes, t.num_classes)
        check_anchor_grids("det_mse", s, t)
        # Everything in float32, whatever the AMP dtype of either model.
        p_s, p_t = s.obj.float().sigmoid(), t.obj.float().sigmoid()
        fg = p_t > self.gate_thresh  # (B, A)
        n = fg.sum().clamp(min=1).float()
        box_se = ((s.box.float() - t.box.float()) ** 2).sum(-1)  # (B, A)
        cls_se = ((s.cls.float().sigmoid() - t.cls.float().sigmoid()) ** 2).sum(-1)
        if self.gate:
            box_se, cls_se = box_se.masked_fill(~fg, 0.0), cls_se.masked_fill(~fg, 0.0)
        return {
            "obj": self.w_obj * ((p_s - p_t) ** 2).sum() / n,
            "box": self.w_box * box_se.sum() / n,
            "cls": self.w_cls * cls_se.sum() / n,
        }
