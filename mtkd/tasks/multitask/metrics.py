"""Detection and segmentation metrics.

Three metrics, each with its conventions stated where the usual definitions
leave a choice open:

* :func:`coco_map` - COCO box mAP@[.5:.95] and mAP@.5, computed by
  faster-coco-eval's pycocotools-compatible API (pycocotools as a fallback);
  no AP is computed by hand here.
* :func:`voc_map50` - PASCAL VOC AP at IoU 0.5 with "difficult" boxes ignored
  (all-point interpolation, VOC2010+; the 11-point VOC2007 variant on
  request).
* :class:`SegConfusion` - a bincount confusion matrix giving mIoU and pixel
  accuracy, all-reducible across DDP ranks.

Prediction convention shared by both detection metrics: one dict per image
``{"image_id": int, "boxes": (N, 4) xyxy in original pixels, "scores": (N,),
"labels": (N,) 0-based class indices}``; arrays may be numpy or torch.
"""
from __future__ import annotations

import contextlib
import copy
import io
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

from mtkd.errors import DataError
from mtkd.structures import VOID

try:  # faster-coco-eval: same numbers as pycocotools, several times faster
    from faster_coco_eval import COCO as _COCO
    from faster_coco_eval import COCOeval_faster as _COCOeval

    #: faster-coco-eval reports through ``logging`` (INFO) rather than stdout.
    _EVAL_KWARGS: Dict[str, Any] = {"print_function": lambda *args, **kwargs: None}
except ImportError:  # pragma: no cover - faster-coco-eval is a dependency
    from pycocotools.coco import COCO as _COCO
    from pycocotools.cocoeval import COCOeval as _COCOeval

    _EVAL_KWARGS = {}


def _np(x: Any, dtype: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def coco_results(preds: Sequence[Mapping[str, Any]], image_ids: Optional[set] = None) -> List[Dict[str, Any]]:
    """Turn per-image predictions into COCO result entries (xywh, category = label + 1).

    Predictions for an image id not in ``image_ids`` (when given) are dropped:
    COCO evaluation only scores images listed in the ground truth, which is
    how samples without detection labels (``has_det`` False) are excluded.
    """
    results: List[Dict[str, Any]] = []
    for pred in preds:
        image_id = int(pred["image_id"])
        if image_ids is not None and image_id not in image_ids:
            continue
        boxes = _np(pred["boxes"], np.float64).reshape(-1, 4)
        scores = _np(pred["scores"], np.float64).reshape(-1)
        labels = _np(pred["labels"], np.int64).reshape(-1)
        for (x1, y1, x2, y2), score, label in zip(boxes, scores, labels):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(label) + 1,
                    "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                    "score": float(score),
                }
            )
    return results


def coco_map(preds: Sequence[Mapping[str, Any]], coco_gt: Mapping[str, Any]) -> Dict[str, float]:
    """COCO box mAP of ``preds`` against a COCO-format ground-truth dict.

    ``coco_gt`` follows :meth:`mtkd.datasets.common.RecordDataset.coco_gt`:
    image id = dataset index, category id = class index + 1, xywh boxes in
    original pixels, ``iscrowd=1`` for regions to ignore. It is deep-copied,
    because COCOeval writes ``ignore`` flags into the annotations.

    Conventions: the standard COCO parameters (10 IoU thresholds, 101 recall
    points, at most 100 detections per image, all areas). No predictions at
    all gives 0.0 for both numbers (pycocotools cannot load an empty result
    list), and so does a ground truth without a single box, where COCOeval
    reports -1 ("undefined"). The libraries' progress output (stdout, and
    faster-coco-eval's INFO log records) is swallowed.

    Returns ``{"map50_95": float, "map50": float}``.
    """
    image_ids = {int(img["id"]) for img in coco_gt.get("images", [])}
    results = coco_results(preds, image_ids)
    if not results or not coco_gt.get("annotations"):
        return {"map50_95": 0.0, "map50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = _COCO()
        gt.dataset = copy.deepcopy(dict(coco_gt))
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = _COCOeval(gt, dt, iouType="bbox", **_EVAL_KWARGS)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = ev.stats
    return {"map50_95": max(float(stats[0]), 0.0), "map50": max(float(stats[1]), 0.0)}


def _voc_ap(recall: np.ndarray, precision: np.ndarray, use_07: bool) -> float:
    """Area under the interpolated precision-recall curve (VOC devkit).

    All-point (VOC2010+): precision is made monotonically non-increasing from
    the right and summed over the recall steps. 11-point (VOC2007): the mean
    of the maximum precision at recall >= t for t in 0, 0.1, ..., 1.
    """
    if use_07:
        return float(
            np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0 for t in np.linspace(0, 1, 11)])
        )
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def voc_map50(
    preds: Sequence[Mapping[str, Any]],
    gts: Sequence[Mapping[str, Any]],
    num_classes: int,
    use_07: bool = False,
) -> Dict[str, Any]:
    """PASCAL VOC mAP at IoU 0.5, with "difficult" boxes ignored.

    ``gts``: one dict per evaluated image ``{"image_id", "boxes" (M, 4) xyxy
    original px, "labels" (M,) 0-based, "difficult" (M,) bool (optional)}``.
    Predictions whose ``image_id`` has no entry in ``gts`` are dropped.

    The computation follows the VOC devkit: per class, detections over all
    images are sorted by descending score (stable sort, so ties keep input
    order); each is matched to the same-class box of highest IoU in its image.
    IoU > 0.5 with an unmatched non-difficult box is a true positive, with a
    difficult box it is ignored (neither TP nor FP), otherwise (lower IoU or a
    box already taken) it is a false positive. Conventions where the devkit's
    differs: boxes are continuous coordinates (torchvision ``box_iou``, no
    "+1" pixel); a class without any non-difficult ground-truth box has AP
    ``nan`` in ``ap_per_class`` and is left out of the mean (0.0 if no class
    has one).

    Returns ``{"map50": float, "ap_per_class": list of num_classes floats}``.
    """
    gt_by_image: Dict[int, Dict[str, np.ndarray]] = {}
    for gt in gts:
        labels = _np(gt["labels"], np.int64).reshape(-1)
        difficult = gt.get("difficult")
        gt_by_image[int(gt["image_id"])] = {
            "boxes": _np(gt["boxes"], np.float32).reshape(-1, 4),
            "labels": labels,
            "difficult": np.zeros(len(labels), bool) if difficult is None else _np(difficult, bool).reshape(-1),
        }
    kept = [p for p in preds if int(p["image_id"]) in gt_by_image]

    ap_per_class: List[float] = []
    for c in range(num_classes):
        npos = sum(int(((g["labels"] == c) & ~g["difficult"]).sum()) for g in gt_by_image.values())
        dets = []  # (score, image_id, box)
        for p in kept:
            labels = _np(p["labels"], np.int64).reshape(-1)
            sel = labels == c
            boxes = _np(p["boxes"], np.float32).reshape(-1, 4)[sel]
            scores = _np(p["scores"], np.float64).reshape(-1)[sel]
            dets += [(s, int(p["image_id"]), b) for s, b in zip(scores, boxes)]
        if npos == 0:
            ap_per_class.append(float("nan"))
            continue
        order = np.argsort(-np.array([d[0] for d in dets]), kind="stable")
        taken = {i: np.zeros(int((g["labels"] == c).sum()), bool) for i, g in gt_by_image.items()}
        tp = np.zeros(len(dets))
        fp = np.zeros(len(dets))
        for rank, k in enumerate(order):
            _, image_id, box = dets[k]
            g = gt_by_image[image_id]
            sel = g["labels"] == c
            if not sel.any():
                fp[rank] = 1
                continue
            ious = box_iou(torch.from_numpy(box[None]), torch.from_numpy(g["boxes"][sel]))[0]
            best = int(ious.argmax())
            if float(ious[best]) <= 0.5:
                fp[rank] = 1
            elif g["difficult"][sel][best]:
                continue
            elif not taken[image_id][best]:
                taken[image_id][best] = True
                tp[rank] = 1
            else:
                fp[rank] = 1
        tp_cum, fp_cum = np.cumsum(tp), np.cumsum(fp)
        recall = tp_cum / npos
        precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
        ap_per_class.append(_voc_ap(recall, precision, use_07))
    valid = [a for a in ap_per_class if not np.isnan(a)]
    return {"map50": float(np.mean(valid)) if valid else 0.0, "ap_per_class": ap_per_class}


class SegConfusion:
    """Confusion matrix for semantic segmentation (background included).

    ``matrix[t, p]`` counts pixels of target class ``t`` predicted as ``p``
    (int64, on the device of the first update). Pixels whose target is
    :data:`~mtkd.structures.VOID` (255) are ignored. Under DDP, all-reduce
    ``.matrix`` (sum) - or call :meth:`all_reduce` - before :meth:`compute`.

    mIoU convention: the mean IoU over the classes that occur in the target
    or in the prediction (``row + column > 0``); a class absent from both has
    an undefined IoU, reported as ``nan`` in ``iou_per_class`` and left out of
    the mean. A class present only in the prediction counts with IoU 0.
    """

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"SegConfusion needs at least one class, got {num_classes}")
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        self.matrix.zero_()

    def update(self, pred: Any, target: Any) -> None:
        """Add one (H, W) prediction / target pair (or any equal-shaped batch).

        Raises DataError for a target value outside ``0..K-1`` other than 255,
        and ValueError for mismatched shapes or predictions outside ``0..K-1``.
        """
        pred = torch.as_tensor(pred).long().reshape(-1)
        target = torch.as_tensor(target).long().reshape(-1)
        if pred.shape != target.shape:
            raise ValueError(f"prediction has {pred.numel()} pixels but target has {target.numel()}")
        k = self.num_classes
        keep = target != VOID
        pred, target = pred[keep], target[keep]
        if target.numel() and (target.min() < 0 or target.max() >= k):
            raise DataError(f"segmentation target holds class index {int(target.max())} but only {k} classes exist")
        if pred.numel() and (pred.min() < 0 or pred.max() >= k):
            raise ValueError(f"segmentation prediction holds class index {int(pred.max())} outside 0..{k - 1}")
        if self.matrix.device != pred.device:
            self.matrix = self.matrix.to(pred.device)
        self.matrix += torch.bincount(target * k + pred, minlength=k * k).reshape(k, k)

    def all_reduce(self) -> None:
        """Sum ``.matrix`` over DDP ranks (no-op outside torch.distributed)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.matrix)

    def compute(self) -> Dict[str, Any]:
        """``{"miou": float, "pixel_acc": float, "iou_per_class": list}`` (0.0 when empty)."""
        m = self.matrix.double().cpu()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        present = (m.sum(0) + m.sum(1)) > 0
        iou = torch.where(present, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        total = m.sum()
        return {
            "miou": float(iou[present].mean()) if present.any() else 0.0,
            "pixel_acc": float(tp.sum() / total) if total > 0 else 0.0,
            "iou_per_class": iou.tolist(),
        }
