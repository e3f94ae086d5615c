"""YOLO detection loss with objectness (the hard detection loss).

YOLOv8's loss (Jocher et al., Ultralytics YOLOv8, 2023) built from
Ultralytics' own parts, plus a YOLOv5/YOLOX-style objectness term:

* assignment: Ultralytics' ``TaskAlignedAssigner`` (TOOD, Feng et al. 2021)
  with v8's settings (``topk=10, alpha=0.5, beta=6``), run on
  ``sigmoid(cls)`` and the predicted boxes in pixels;
* ``box``/``dfl``: Ultralytics' ``BboxLoss`` (CIoU, Zheng et al. 2020, and
  DFL, Li et al. 2020; an L1 term on image-normalised ltrb replaces DFL when
  the head has ``reg_max == 1``, reported under ``"dfl"`` too);
* ``cls``: BCE against the assigner's soft (alignment-metric) targets,
  summed over anchors and classes and divided by the target-score sum, as v8;
* ``obj``: BCE of the objectness logit against the IoU (plain IoU, detached,
  clamped to [0, 1]) between each foreground anchor's predicted box and its
  assigned box, and 0 on every other anchor; normalised like ``cls`` (by the
  target-score sum), our choice so both terms keep v8's scale. The target's
  entropy is subtracted (Bernoulli KL, same gradient as BCE) so the term
  reaches 0 at a perfect fit instead of a floor set by the soft targets. Skipped (zero)
  for heads whose objectness is a proxy (``obj_is_proxy``, Ultralytics'
  ``Detect`` through the adapter), since training it would train ``cls``.

Each term is multiplied by its gain (``box=7.5, cls=0.5, dfl=1.5, obj=1.0``,
v8's defaults and YOLOv5's objectness gain). Unlike Ultralytics the sum is
not multiplied by the batch size.

Labels: ``batch["boxes"]`` (xyxy input pixels) and ``batch["labels"]``.
Samples with ``has_det=False`` are removed from assignment and from every
term (their anchors count neither as positives nor as negatives). With no
labelled sample in the batch every term is a graph-connected zero. Images
with zero boxes are labelled negatives: all their anchors are background.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from ultralytics.utils.loss import BboxLoss
from ultralytics.utils.metrics import bbox_iou
from ultralytics.utils.tal import TaskAlignedAssigner, dist2bbox

from mtkd.errors import DataError
from mtkd.losses.base import Loss, register
from mtkd.structures import DetOutput


def _pad_targets(boxes: List[torch.Tensor], labels: List[torch.Tensor], has_det: torch.Tensor,
                 device: torch.device) -> tuple:
    """(B, M, 4) boxes, (B, M, 1) labels, (B, M, 1) validity; unlabelled samples get no boxes."""
    counts = [len(b) if bool(h) else 0 for b, h in zip(boxes, has_det)]
    m = max(counts, default=0)
    bs = len(boxes)
    gt_boxes = torch.zeros(bs, m, 4, device=device)
    gt_labels = torch.zeros(bs, m, 1, device=device)
    valid = torch.zeros(bs, m, 1, device=device)
    for i, n in enumerate(counts):
        if n:
            gt_boxes[i, :n] = boxes[i].to(device=device, dtype=torch.float32)
            gt_labels[i, :n, 0] = labels[i].to(device=device, dtype=torch.float32)
            valid[i, :n] = 1.0
    return gt_boxes, gt_labels, valid


@register("yolo_det")
class YoloDetLoss(Loss):
    """``forward(student_out, teacher_out, batch) -> {"box", "dfl", "cls", "obj"}``."""

    def __init__(self, box: float = 7.5, cls: float = 0.5, dfl: float = 1.5, obj: float = 1.0,
                 topk: int = 10, alpha: float = 0.5, beta: float = 6.0):
        super().__init__()
        self.gains = {"box": float(box), "cls": float(cls), "dfl": float(dfl), "obj": float(obj)}
        self.topk, self.alpha, self.beta = int(topk), float(alpha), float(beta)

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        det: DetOutput = student_out["det"]
        bs, _, nc = det.cls.shape
        device = det.cls.device
        has_det = torch.as_tensor(batch["has_det"], dtype=torch.bool).reshape(-1)
        zero = 0.0 * (det.cls.sum() + det.obj.sum() + det.box.sum())
        if not bool(has_det.any()):
            return {k: zero for k in ("box", "dfl", "cls", "obj")}
        labels = batch["labels"]
        for i, lab in enumerate(labels):
            if bool(has_det[i]) and len(lab) and (int(lab.min()) < 0 or int(lab.max()) >= nc):
                raise DataError(f"batch['labels'][{i}]: class index outside 0..{nc - 1}")
        gt_boxes, gt_labels, valid = _pad_targets(batch["boxes"], labels, has_det, device)

        anchors, strides = det.anchors, det.strides
        pred_boxes = dist2bbox(det.box, anchors, xywh=False)  # (B, A, 4) xyxy, stride units
        strides_list = sorted({int(s) for s in strides.flatten().tolist()})
        assigner = TaskAlignedAssigner(topk=self.topk, num_classes=nc, alpha=self.alpha, beta=self.beta,
                                       stride=strides_list)
        _, target_boxes, target_scores, fg, _ = assigner(
            det.cls.detach().sigmoid(), (pred_boxes.detach() * strides).to(gt_boxes.dtype),
            anchors * strides, gt_labels, gt_boxes, valid)
        target_scores = target_scores.to(det.cls.dtype)
        img_w = has_det.to(device=device, dtype=det.cls.dtype)[:, None]  # (B, 1): 0 drops a sample
        norm = target_scores.sum().clamp(min=1.0)

        bce_cls = F.binary_cross_entropy_with_logits(det.cls, target_scores, reduction="none").sum(-1)
        loss_cls = (bce_cls * img_w).sum() / norm

        reg_max = det.box_dist.shape[-1] if det.box_dist is not None else 1
        pred_dist = det.box_dist if det.box_dist is not None else det.box
        imgsz = torch.tensor(batch["images"].shape[-2:], device=device, dtype=det.box.dtype)
        loss_box, loss_dfl = BboxLoss(reg_max)(pred_dist, pred_boxes, anchors, target_boxes / strides,
                                               target_scores, norm, fg, imgsz, strides)

        if det.obj_is_proxy:
            loss_obj = zero
        else:
            obj_t = torch.zeros_like(det.obj)
            if bool(fg.any()):
                iou = bbox_iou(pred_boxes[fg].detach() * strides.expand(bs, -1, -1)[fg], target_boxes[fg],
                               xywh=False).squeeze(-1)
                obj_t[fg] = iou.clamp(0.0, 1.0).to(obj_t.dtype)
            # BCE minus the target's entropy (= Bernoulli KL): same gradient, and a
            # perfect prediction of a soft IoU target scores 0 instead of H(iou).
            entropy = -(torch.special.xlogy(obj_t, obj_t) + torch.special.xlogy(1 - obj_t, 1 - obj_t))
            bce_obj = F.binary_cross_entropy_with_logits(det.obj, obj_t, reduction="none") - entropy
            loss_obj = (bce_obj * img_w).sum() / norm

        raw = {"box": loss_box, "dfl": loss_dfl, "cls": loss_cls, "obj": loss_obj}
        return {k: self.gains[k] * v + zero for k, v in raw.items()}
