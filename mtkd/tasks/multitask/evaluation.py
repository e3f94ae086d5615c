"""Evaluate a multi-task model on a dataset, in original image pixels.

:func:`evaluate` runs the model over a loader and scores it against the
dataset's own labels at the original image size, so numbers do not depend on
the input size or letterbox padding:

* detection: decoded boxes (:func:`mtkd.heads.decode.detections`) are mapped back
  with the batch's ``letterbox`` (``orig = (input - pad) / scale``), clipped
  to the image, and scored with COCO mAP (:func:`~mtkd.tasks.multitask.metrics.coco_map`
  against ``dataset.coco_gt()``) and VOC mAP@0.5
  (:func:`~mtkd.tasks.multitask.metrics.voc_map50`, difficult boxes ignored);
* segmentation: logits are cropped to the un-padded region, resized
  bilinearly to the original (h, w) and arg-maxed (:func:`seg_to_original`),
  then compared with ``dataset.load_sample(index).mask`` in a
  :class:`~mtkd.tasks.multitask.metrics.SegConfusion`.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from mtkd.tasks.multitask.metrics import SegConfusion, coco_map, voc_map50
from mtkd.heads.decode import detections
from mtkd.structures import Sample


def boxes_to_original(boxes: torch.Tensor, letterbox: Sequence[float], orig_hw: Sequence[int]) -> torch.Tensor:
    """Map (N, 4) xyxy input-pixel boxes to original pixels, clipped to the image.

    ``letterbox`` is ``(scale, pad_x, pad_y)``; ``orig = (input - pad) / scale``.
    """
    scale, pad_x, pad_y = (float(v) for v in letterbox)
    h, w = (int(v) for v in orig_hw)
    pad = boxes.new_tensor([pad_x, pad_y, pad_x, pad_y])
    out = (boxes.float() - pad) / scale
    out[:, 0::2] = out[:, 0::2].clamp(0, w)
    out[:, 1::2] = out[:, 1::2].clamp(0, h)
    return out


def seg_logits_to_original(logits: torch.Tensor, letterbox: Sequence[float],
                           orig_hw: Sequence[int]) -> torch.Tensor:
    """(K, H, W) input-resolution logits -> (K, h, w) float logits in original pixels.

    The un-padded region is ``[round(pad), round(pad + size * scale))`` along
    each axis (at least one pixel, clamped to the input); its logits are
    resized bilinearly (``align_corners=False``, no antialiasing) to the
    original (h, w). Resizing logits rather than the label map keeps class
    boundaries sub-pixel accurate.
    """
    scale, pad_x, pad_y = (float(v) for v in letterbox)
    h, w = (int(v) for v in orig_hw)
    in_h, in_w = logits.shape[-2:]
    y0 = min(max(int(round(pad_y)), 0), in_h - 1)
    x0 = min(max(int(round(pad_x)), 0), in_w - 1)
    y1 = min(max(int(round(pad_y + h * scale)), y0 + 1), in_h)
    x1 = min(max(int(round(pad_x + w * scale)), x0 + 1), in_w)
    crop = logits[None, :, y0:y1, x0:x1].float()
    return F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0]


def seg_to_original(logits: torch.Tensor, letterbox: Sequence[float], orig_hw: Sequence[int]) -> torch.Tensor:
    """(K, H, W) input-resolution logits -> (h, w) int64 class map in original pixels
    (the arg-max of :func:`seg_logits_to_original`)."""
    return seg_logits_to_original(logits, letterbox, orig_hw).argmax(0)


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    if not amp:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def _restrict_gt(coco_gt: Mapping[str, Any], image_ids: set) -> Dict[str, Any]:
    """The COCO GT dict limited to the images that were evaluated."""
    return {
        **coco_gt,
        "images": [img for img in coco_gt["images"] if int(img["id"]) in image_ids],
        "annotations": [a for a in coco_gt["annotations"] if int(a["image_id"]) in image_ids],
    }


class _Scores:
    """Per-image accumulation of predictions and labels in original pixels."""

    def __init__(self) -> None:
        self.preds: List[Dict[str, Any]] = []
        self.voc_gts: List[Dict[str, Any]] = []
        self.seen: set = set()
        self.confusion: Optional[SegConfusion] = None
        self.has_det_head = False

    def add(
        self,
        index: int,
        sample: Sample,
        letterbox: Sequence[float],
        det: Optional[Dict[str, Any]],
        seg: Optional[torch.Tensor],
    ) -> None:
        hw = sample.image.shape[:2]
        self.seen.add(index)
        if det is not None:
            boxes = boxes_to_original(det["boxes"].float().cpu(), letterbox, hw)
            scores, labels = det["scores"].float().cpu(), det["labels"].cpu()
            self.preds.append({"image_id": index, "boxes": boxes, "scores": scores, "labels": labels})
            if sample.has_det:
                gt = {"image_id": index, "boxes": sample.boxes, "labels": sample.labels, "difficult": sample.difficult}
                self.voc_gts.append(gt)
        if seg is not None:
            if self.confusion is None:
                self.confusion = SegConfusion(seg.shape[0])
            if sample.has_seg and sample.mask is not None:
                self.confusion.update(seg_to_original(seg, letterbox, hw).cpu(), torch.from_numpy(sample.mask))


def evaluate(
    model: torch.nn.Module,
    loader: Iterable[Mapping[str, Any]],
    dataset: Any,
    conf: float = 0.001,
    iou: float = 0.6,
    max_det: int = 100,
    device: str | torch.device = "cpu",
    amp: bool = False,
    max_batches: Optional[int] = None,
) -> Dict[str, float]:
    """Score ``model`` on the batches of ``loader`` drawn from ``dataset``.

    ``loader`` yields collated batches (:data:`mtkd.structures.BATCH_KEYS`;
    used here: ``images``, ``index``, ``letterbox``); ``dataset`` provides
    ``.classes``, ``.load_sample(i)`` (labels in original pixels) and
    ``.coco_gt()``. ``max_batches`` stops after that many batches (quick
    validation); metrics then cover only the images seen.

    The model runs in eval mode under ``torch.inference_mode`` (and autocast
    when ``amp``: float16 on CUDA, bfloat16 elsewhere); its previous
    train/eval mode is restored afterwards. Its output dict holds ``"det"``
    (or the exported ``"boxes"`` / ``"scores"``, see
    :func:`~mtkd.heads.decode.detections`) and ``"seg"``; a model lacking one
    task's output has that task's keys absent from the result.

    Returns ``{"map50_95", "map50", "voc_map50", "miou", "pixel_acc",
    "n_images"}``. Detection metrics cover samples with ``has_det`` (those in
    ``dataset.coco_gt()``; the VOC metric uses the same samples), mIoU and
    pixel accuracy cover samples with ``has_seg`` (0.0 when the model has a
    seg head but no evaluated sample has a mask). ``n_images`` counts the
    distinct dataset indices scored: a sample that a ``skip_bad`` dataset
    hands out twice (in place of a bad one) is scored once. Each evaluated
    image is decoded once more through ``load_sample`` for its labels. The
    model must already be on ``device``.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    acc = _Scores()
    try:
        with torch.inference_mode():
            for b, batch in enumerate(loader):
                if max_batches is not None and b >= max_batches:
                    break
                with _autocast(device, amp):
                    out = model(batch["images"].to(device, non_blocking=True))
                seg = out.get("seg")
                decoded = detections(out, conf, iou, max_det)
                acc.has_det_head |= decoded is not None
                for j, index in enumerate(torch.as_tensor(batch["index"]).tolist()):
                    if index in acc.seen:  # a skip_bad dataset may hand out a sample twice
                        continue
                    letterbox = torch.as_tensor(batch["letterbox"][j]).tolist()
                    det_j = None if decoded is None else decoded[j]
                    acc.add(index, dataset.load_sample(index), letterbox, det_j, None if seg is None else seg[j])
    finally:
        model.train(was_training)

    result: Dict[str, float] = {"n_images": len(acc.seen)}
    if acc.has_det_head:
        result.update(coco_map(acc.preds, _restrict_gt(dataset.coco_gt(), acc.seen)))
        result["voc_map50"] = voc_map50(acc.preds, acc.voc_gts, len(dataset.classes))["map50"]
    if acc.confusion is not None:
        seg_metrics = acc.confusion.compute()
        result["miou"] = seg_metrics["miou"]
        result["pixel_acc"] = seg_metrics["pixel_acc"]
    return result
