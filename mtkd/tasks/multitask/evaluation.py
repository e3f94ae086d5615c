"""Evaluate a multi-task model on a dataset, in original image pixels.

:func:`evaluate` runs the model over a loader and scores it against the
dataset's own labels at the original image size, so numbers do not depend on
the input size or letterbox padding:

Predictions come from the inference path
:func:`mtkd.tasks.multitask.predict.predict_batch`:

* detection: decoded boxes (:func:`mtkd.heads.decode.detections`) are mapped back
  with the batch's ``letterbox`` (``orig = (input - pad) / scale``), clipped
  to the image, and scored with COCO mAP (:func:`~mtkd.tasks.multitask.metrics.coco_map`
  against ``dataset.coco_gt()``) and VOC mAP@0.5
  (:func:`~mtkd.tasks.multitask.metrics.voc_map50`, difficult boxes ignored);
* segmentation: logits are cropped to the un-padded region, resized
  bilinearly to the original (h, w) and arg-maxed
  (:func:`~mtkd.tasks.multitask.predict.seg_to_original`),
  then compared with ``dataset.load_sample(index).mask`` in a
  :class:`~mtkd.tasks.multitask.metrics.SegConfusion`.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional

import torch

from mtkd.structures import Sample
from mtkd.tasks.multitask.metrics import SegConfusion, coco_map, voc_map50
from mtkd.tasks.multitask.predict import Prediction, predict_batch


def _restrict_gt(coco_gt: Mapping[str, Any], image_ids: set) -> Dict[str, Any]:
    """The COCO GT dict limited to the images that were evaluated."""
    return {
        **coco_gt,
        "images": [img for img in coco_gt["images"] if int(img["id"]) in image_ids],
        "annotations": [a for a in coco_gt["annotations"] if int(a["image_id"]) in image_ids],
    }


class Scores:
    """Per-image accumulation of predictions and labels in original pixels (:func:`collect`);
    ``confusion`` is the segmentation :class:`SegConfusion` (``None`` without a seg head)."""

    def __init__(self) -> None:
        self.preds: List[Dict[str, Any]] = []
        self.voc_gts: List[Dict[str, Any]] = []
        self.seen: set = set()
        self.confusion: Optional[SegConfusion] = None
        self.has_det_head = False

    def add(self, index: int, sample: Sample, pred: Prediction) -> None:
        self.seen.add(index)
        if pred.boxes is not None:
            self.has_det_head = True
            self.preds.append({"image_id": index, "boxes": pred.boxes, "scores": pred.scores, "labels": pred.labels})
            if sample.has_det:
                gt = {"image_id": index, "boxes": sample.boxes, "labels": sample.labels, "difficult": sample.difficult}
                self.voc_gts.append(gt)
        if pred.seg is not None:
            if self.confusion is None:
                self.confusion = SegConfusion(pred.seg.shape[0])
            if sample.has_seg and sample.mask is not None:
                self.confusion.update(pred.mask().cpu(), torch.from_numpy(sample.mask))


def collect(
    model: torch.nn.Module,
    loader: Iterable[Mapping[str, Any]],
    dataset: Any,
    conf: float = 0.001,
    iou: float = 0.6,
    max_det: int = 100,
    device: str | torch.device = "cpu",
    amp: bool = False,
    max_batches: Optional[int] = None,
) -> Scores:
    """The predictions and labels :func:`evaluate` scores, accumulated (same arguments)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    acc = Scores()
    try:
        with torch.inference_mode():
            for b, batch in enumerate(loader):
                if max_batches is not None and b >= max_batches:
                    break
                indices = torch.as_tensor(batch["index"]).tolist()
                samples: Dict[int, Sample] = {}  # position in the batch -> labels of a sample not yet scored
                for j, index in enumerate(indices):
                    # a skip_bad dataset may hand out a sample twice
                    if index not in acc.seen and index not in indices[:j]:
                        samples[j] = dataset.load_sample(index)
                sizes = [samples[j].image.shape[:2] if j in samples else None for j in range(len(indices))]
                preds = predict_batch(model, batch["images"], batch["letterbox"], sizes, conf, iou, max_det,
                                      device, amp)
                for j, sample in samples.items():
                    acc.add(indices[j], sample, preds[j])
    finally:
        model.train(was_training)
    return acc


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
    acc = collect(model, loader, dataset, conf, iou, max_det, device, amp, max_batches)
    result: Dict[str, float] = {"n_images": len(acc.seen)}
    if acc.has_det_head:
        result.update(coco_map(acc.preds, _restrict_gt(dataset.coco_gt(), acc.seen)))
        result["voc_map50"] = voc_map50(acc.preds, acc.voc_gts, len(dataset.classes))["map50"]
    if acc.confusion is not None:
        seg_metrics = acc.confusion.compute()
        result["miou"] = seg_metrics["miou"]
        result["pixel_acc"] = seg_metrics["pixel_acc"]
    return result
