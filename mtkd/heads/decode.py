"""Decode a :class:`~mtkd.structures.DetOutput` into per-image detections.

Conventions and choices:

* scores are ``DetOutput.scores()`` (``sigmoid(cls) * sigmoid(obj)``, or
  ``sigmoid(cls)`` for heads whose objectness is a proxy);
* multi-label: every (anchor, class) pair scoring above ``conf`` is a
  candidate, as Ultralytics' validation NMS does for mAP;
* before NMS only the ``pre_nms_topk`` best candidates per image are kept
  (speed), then torchvision's class-aware ``batched_nms`` at ``iou``, then
  the ``max_det`` best;
* boxes and scores are float32; boxes are xyxy in input (letterboxed)
  pixels, not clipped.

A model's output dict carries its detections either as ``"det"`` (a
``DetOutput``, mtkd's models) or as ``"boxes"`` (B, A, 4) and ``"scores"``
(B, A, nc), the exported form (:class:`mtkd.export.onnx.OnnxWrapper`);
:func:`detections` decodes either, so evaluation and prediction treat both alike.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import torch
from torchvision.ops import batched_nms

from mtkd.structures import DetOutput


@torch.no_grad()
def decode(det: DetOutput, conf: float = 0.001, iou: float = 0.6, max_det: int = 100,
           pre_nms_topk: int = 1000) -> List[Dict[str, torch.Tensor]]:
    """-> one ``{"boxes": (N,4) xyxy px, "scores": (N,), "labels": (N,) int64}`` per image."""
    return nms(det.boxes_xyxy(), det.scores(), conf, iou, max_det, pre_nms_topk)


@torch.no_grad()
def nms(boxes: torch.Tensor, scores: torch.Tensor, conf: float = 0.001, iou: float = 0.6, max_det: int = 100,
        pre_nms_topk: int = 1000) -> List[Dict[str, torch.Tensor]]:
    """:func:`decode` from boxes (B, A, 4) xyxy px and scores (B, A, nc), e.g. an exported model's outputs."""
    nc = scores.shape[-1]
    results = []
    for s, b in zip(scores, boxes):
        flat = s.flatten()
        keep = (flat > conf).nonzero().squeeze(1)
        if keep.numel() > pre_nms_topk:
            keep = keep[flat[keep].topk(pre_nms_topk).indices]
        cand_scores = flat[keep].float()
        anchor, label = keep // nc, keep % nc
        cand_boxes = b[anchor].float()
        kept = batched_nms(cand_boxes, cand_scores, label, iou)[:max_det]
        results.append({"boxes": cand_boxes[kept], "scores": cand_scores[kept], "labels": label[kept]})
    return results


def num_det_classes(out: Mapping[str, Any]) -> Optional[int]:
    """Detection classes of a model output dict (``"det"`` or ``"scores"``); ``None`` without detections."""
    if out.get("det") is not None:
        return out["det"].num_classes
    if out.get("scores") is not None:
        return int(out["scores"].shape[-1])
    return None


@torch.no_grad()
def detections(out: Mapping[str, Any], conf: float = 0.001, iou: float = 0.6, max_det: int = 100,
               pre_nms_topk: int = 1000) -> Optional[List[Dict[str, torch.Tensor]]]:
    """:func:`decode` of a model output dict's ``"det"``, or :func:`nms` of its ``"boxes"`` / ``"scores"``;
    ``None`` when it has neither."""
    if out.get("det") is not None:
        return decode(out["det"], conf, iou, max_det, pre_nms_topk)
    if out.get("boxes") is not None:
        return nms(out["boxes"], out["scores"], conf, iou, max_det, pre_nms_topk)
    return None
