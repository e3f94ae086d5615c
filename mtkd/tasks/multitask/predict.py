"""The inference path of multi-task models, and predicting image files with it.

:func:`predict_batch` is the one path from input images to predictions in
original pixels (forward, decode, undo the letterbox), used by the evaluator
(:func:`mtkd.tasks.multitask.evaluation.evaluate`), :func:`predict_folder`,
the validation drawing (:func:`mtkd.tasks.multitask.plots.draw_val`) and
exported models (:mod:`mtkd.export.runtime`).

:func:`predict_folder` reads each image upright (EXIF orientation applied,
see :func:`mtkd.datasets.common.read_image`) and puts it through the
evaluation transform (:func:`mtkd.datasets.transforms.build_transforms` with
``train=False``: the deterministic letterbox to ``imgsz`` and mean/std
normalisation), so its predictions match what
:func:`mtkd.tasks.multitask.evaluation.evaluate` scores.

Output layout under ``out_dir`` (``<rel>`` = the image's path relative to
``image_dir`` with its suffix replaced by ``.png``, or its name when
``image_dir`` is one image file; when two inputs would
share a name, e.g. ``a.jpg`` and ``a.png``, the later one keeps its suffix
as ``a_png.png``):

* ``vis/<rel>``: the image with the mask alpha-blended and labelled boxes;
* ``masks/<rel>``: the class-index mask (palette PNG; value 0 background,
  ``k + 1`` class ``k``), only when the model has a segmentation head;
* ``detections.json``: a list with one entry per image, see
  :func:`predict_folder`.
"""
from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mtkd.datasets.common import read_image
from mtkd.datasets.transforms import build_transforms, unletterbox_boxes
from mtkd.errors import ConfigError, DataError, writing
from mtkd.heads.decode import detections, num_det_classes
from mtkd.imageio import IMAGE_SUFFIXES, list_images
from mtkd.structures import Sample
from mtkd.tasks.multitask.plots import draw_predictions, mask_palette


def boxes_to_original(boxes: torch.Tensor, letterbox: Sequence[float], orig_hw: Sequence[int]) -> torch.Tensor:
    """Map (N, 4) xyxy input-pixel boxes to original pixels, clipped to the image.

    ``letterbox`` is ``(scale, pad_x, pad_y)``; ``orig = (input - pad) / scale``.
    """
    h, w = (int(v) for v in orig_hw)
    out = unletterbox_boxes(boxes.float(), letterbox)
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


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """Autocast for inference when ``amp``: float16 on CUDA, bfloat16 elsewhere (else a no-op)."""
    if not amp:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


@dataclass
class Prediction:
    """One image's prediction in its original pixels (from :func:`predict_batch`).

    ``boxes`` (N, 4) xyxy clipped to the image, ``scores`` (N,) and
    ``labels`` (N,) int64 are CPU tensors, all ``None`` when the model has no
    detection output. ``seg`` holds the (K, H, W) input-resolution logits
    (``None`` without a segmentation output); :meth:`seg_logits` and
    :meth:`mask` map them to the original pixels on demand, on ``seg``'s device.
    """

    boxes: Optional[torch.Tensor]
    scores: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]
    seg: Optional[torch.Tensor]
    letterbox: Tuple[float, float, float]
    size: Tuple[int, int]

    def seg_logits(self) -> Optional[torch.Tensor]:
        """(K, h, w) float logits in original pixels (:func:`seg_logits_to_original`)."""
        return None if self.seg is None else seg_logits_to_original(self.seg, self.letterbox, self.size)

    def mask(self) -> Optional[torch.Tensor]:
        """(h, w) int64 class map in original pixels (:func:`seg_to_original`)."""
        return None if self.seg is None else seg_to_original(self.seg, self.letterbox, self.size)


def check_classes(out: Dict[str, Any], classes: Sequence[str]) -> None:
    """ConfigError when a model output's detection or segmentation classes do not fit ``classes``."""
    nc, seg = num_det_classes(out), out.get("seg")
    if nc is not None and nc != len(classes):
        raise ConfigError(
            f"classes: the model predicts {nc} detection classes but {len(classes)} names were given"
        )
    if seg is not None and seg.shape[1] != len(classes) + 1:
        raise ConfigError(
            f"classes: the segmentation head has {seg.shape[1]} outputs, expected {len(classes)} classes + background"
        )


def predict_batch(
    model: torch.nn.Module,
    images: torch.Tensor,
    letterboxes: Sequence[Sequence[float]],
    sizes: Sequence[Optional[Sequence[int]]],
    conf: float,
    iou: float,
    max_det: int,
    device: str | torch.device = "cpu",
    amp: bool = False,
    classes: Optional[Sequence[str]] = None,
) -> List[Optional[Prediction]]:
    """Forward, decode, undo the letterbox: one :class:`Prediction` per image of ``images``.

    ``images`` is a (B, 3, S, S) batch through the evaluation transform, with
    each image's ``letterbox`` ``(scale, pad_x, pad_y)`` and original
    ``(h, w)`` in ``sizes``; an image whose size is ``None`` is run but not
    mapped back (its entry is ``None``). Detections are decoded with
    :func:`mtkd.heads.decode.detections` (so an exported model's
    ``"boxes"`` / ``"scores"`` work like ``"det"``). The model runs as it is
    (the caller sets eval mode) under ``torch.inference_mode``, and under
    :func:`autocast` when ``amp``. With ``classes``, the output is checked
    against them first (:func:`check_classes`).
    """
    device = torch.device(device)
    with torch.inference_mode():
        with autocast(device, amp):
            out = model(images.to(device, non_blocking=True))
        if classes is not None:
            check_classes(out, classes)
        seg = out.get("seg")
        decoded = detections(out, conf, iou, max_det)
        preds: List[Optional[Prediction]] = []
        for j, (letterbox, size) in enumerate(zip(letterboxes, sizes)):
            if size is None:
                preds.append(None)
                continue
            lb = tuple(float(v) for v in torch.as_tensor(letterbox).tolist())
            hw = (int(size[0]), int(size[1]))
            boxes = scores = labels = None
            if decoded is not None:
                d = decoded[j]
                boxes = boxes_to_original(d["boxes"].float().cpu(), lb, hw)
                scores, labels = d["scores"].float().cpu(), d["labels"].long().cpu()
            preds.append(Prediction(boxes, scores, labels, None if seg is None else seg[j], lb, hw))
    return preds


def eval_item(image: np.ndarray, transform: Callable[[Sample], Dict[str, Any]], id: str = "",
              index: int = 0) -> Dict[str, Any]:
    """An HxWx3 image without labels through an evaluation ``transform``
    (:func:`mtkd.datasets.transforms.build_transforms`): the item with ``"image"`` and ``"letterbox"``."""
    empty = np.zeros((0, 4), np.float32)
    return transform(Sample(image, empty, np.zeros(0, np.int64), None, has_det=False, has_seg=False, id=id,
                            index=index))


def _output_name(rel: Path, used: set) -> Path:
    name = rel.with_suffix(".png")
    if name in used:
        name = rel.with_name(f"{rel.stem}_{rel.suffix[1:]}.png")
    used.add(name)
    return name


def predict_folder(
    model: torch.nn.Module,
    image_dir: str | Path,
    out_dir: str | Path,
    classes: Sequence[str],
    imgsz: int,
    mean: Sequence[float],
    std: Sequence[float],
    conf: float = 0.25,
    iou: float = 0.6,
    device: str | torch.device = "cpu",
    max_det: int = 300,
    skip_bad: bool = False,
) -> List[Dict[str, Any]]:
    """Predict every image under ``image_dir`` (or the one image file it names); write drawings,
    masks and ``detections.json``.

    ``model`` is an mtkd model or any module with the same output dict, such
    as an exported file run in onnxruntime (:class:`mtkd.export.runtime.OnnxModel`,
    ``"boxes"`` / ``"scores"`` in place of ``"det"``).

    ``imgsz``, ``mean`` and ``std`` are the training data config's (``mean``/
    ``std`` on 0..1 pixels). Images are processed one at a time (their sizes
    differ). A corrupt image raises DataError naming the file, or with
    ``skip_bad`` is skipped with a warning; a failed write (disk full,
    read-only folder) is an MtkdError naming the file. The model runs in eval
    mode under ``torch.inference_mode``; its previous mode is restored.

    Returns (and writes as ``out_dir/detections.json``) one dict per image:
    ``{"file": path relative to image_dir (its name for one file), "width", "height", "boxes": [[x1,
    y1, x2, y2], ...] in original pixels, "scores", "labels" (0-based),
    "classes" (names), "vis": drawing path, "mask": mask path or None}``
    (paths relative to ``out_dir``, POSIX style).
    """
    image_dir, out_dir = Path(image_dir), Path(out_dir)
    files = list_images(image_dir)
    if not files:
        raise DataError(f"{image_dir}: no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images found")
    root = image_dir if image_dir.is_dir() else image_dir.parent
    transform = build_transforms({"imgsz": imgsz, "mean": list(mean), "std": list(std)}, train=False)
    device = torch.device(device)
    was_training = model.training
    model.eval()
    results: List[Dict[str, Any]] = []
    used: set = set()
    try:
        for i, path in enumerate(files):
            try:
                image = read_image(path)
            except DataError as exc:
                if not skip_bad:
                    raise
                warnings.warn(f"skipping bad image: {exc}", stacklevel=2)
                continue
            rel = path.relative_to(root)
            h, w = image.shape[:2]
            item = eval_item(image, transform, rel.as_posix(), i)
            pred = predict_batch(model, item["image"][None], [item["letterbox"]], [(h, w)], conf, iou, max_det,
                                 device, classes=classes)[0]
            boxes, scores, labels = torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long)
            if pred.boxes is not None:
                boxes, scores, labels = pred.boxes, pred.scores, pred.labels
            mask = None
            if pred.seg is not None:
                mask = pred.mask().cpu().numpy().astype(np.uint8)

            name = _output_name(rel, used)
            vis_path, mask_path = out_dir / "vis" / name, out_dir / "masks" / name
            with writing(vis_path):
                vis_path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(draw_predictions(image, boxes, labels, scores, mask, classes)).save(vis_path)
            if mask is not None:
                png = Image.fromarray(mask)  # mode "L"; putpalette turns it into "P", indices kept
                png.putpalette(mask_palette())
                with writing(mask_path):
                    mask_path.parent.mkdir(parents=True, exist_ok=True)
                    png.save(mask_path)
            results.append(
                {
                    "file": rel.as_posix(),
                    "width": w,
                    "height": h,
                    "boxes": [[round(float(v), 2) for v in box] for box in boxes.tolist()],
                    "scores": [round(float(s), 4) for s in scores.tolist()],
                    "labels": [int(k) for k in labels.tolist()],
                    "classes": [classes[int(k)] for k in labels.tolist()],
                    "vis": vis_path.relative_to(out_dir).as_posix(),
                    "mask": mask_path.relative_to(out_dir).as_posix() if mask is not None else None,
                }
            )
    finally:
        model.train(was_training)
    with writing(out_dir / "detections.json"):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "detections.json").write_text(json.dumps(results, indent=1))
    return results
