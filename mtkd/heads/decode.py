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
"""
from __future__ import annotations

from typing import Dict, List

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
