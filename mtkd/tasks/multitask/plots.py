"""Drawing predictions on images (PIL, with matplotlib's ``tab20`` colours), and ``val_pred.png``.

Conventions:
  * Class ``k`` (detection label ``k``, mask value ``k + 1``) is drawn in
    colour :func:`class_color` ``(k)``: matplotlib's ``tab20`` palette,
    cycled. Mask value 0 (background) and 255 (void) are left undrawn.
  * Masks are alpha-blended over the image (``MASK_ALPHA``); boxes are
    outlined and labelled ``"<class> <score>"`` in a filled tag above the box
    (inside it when the box touches the top edge).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from mtkd.structures import VOID  # noqa: E402

#: Opacity of the segmentation overlay.
MASK_ALPHA = 0.5

_TAB20 = [tuple(int(round(255 * c)) for c in rgb) for rgb in plt.get_cmap("tab20").colors]


def class_color(k: int) -> tuple:
    """RGB colour of detection class ``k`` (0-based)."""
    return _TAB20[k % len(_TAB20)]


def mask_palette(num_values: int = 256) -> List[int]:
    """A flat PIL palette for index masks: 0 black, ``k + 1`` = :func:`class_color` (k), 255 white."""
    palette = [0, 0, 0]
    for k in range(num_values - 2):
        palette += list(class_color(k))
    return palette + [255, 255, 255]


def _to_list(x: Any) -> list:
    if x is None:
        return []
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x).tolist()


def draw_predictions(
    image_rgb: np.ndarray,
    boxes: Any,
    labels: Any,
    scores: Any,
    mask: Optional[np.ndarray],
    classes: Sequence[str],
) -> np.ndarray:
    """Draw a class mask and labelled boxes on a copy of an HxWx3 uint8 image.

    ``boxes`` (N, 4) xyxy, ``labels`` (N,) 0-based and ``scores`` (N,) are in
    the image's pixels (numpy, torch or lists; ``scores`` may be ``None`` to
    omit them). ``mask`` is (H, W) with 0 background, ``k + 1`` class ``k``,
    255 void, or ``None``. Returns a new HxWx3 uint8 array.
    """
    image = np.asarray(image_rgb, dtype=np.uint8)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"draw_predictions expects an HxWx3 image, got shape {image.shape}")
    out = image.astype(np.float32)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} differs from image shape {image.shape[:2]}")
        for value in np.unique(mask):
            if value == 0 or value == VOID:
                continue
            sel = mask == value
            out[sel] = (1 - MASK_ALPHA) * out[sel] + MASK_ALPHA * np.array(class_color(int(value) - 1), np.float32)
    canvas = Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    box_list, label_list = _to_list(boxes), _to_list(labels)
    score_list = _to_list(scores) if scores is not None else [None] * len(label_list)
    width = max(1, round(max(image.shape[:2]) / 300))
    for box, label, score in zip(box_list, label_list, score_list):
        k = int(label)
        colour = class_color(k)
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        name = classes[k] if 0 <= k < len(classes) else str(k)
        text = name if score is None else f"{name} {float(score):.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top + 2
        ty = y1 - th if y1 - th >= 0 else y1
        draw.rectangle([x1, ty, x1 + tw + 2, ty + th], fill=colour)
        draw.text((x1 + 1, ty - top + 1), text, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


def draw_val(model: Any, dataset: Any, path: str | Path, cfg: Dict[str, Any], device: Any, n: int = 4) -> None:
    """The first ``n`` images of ``dataset``: predictions (top row) over labels (bottom row), saved to ``path``.

    Each image goes through the dataset's own (eval) transform and the
    inference path :func:`mtkd.tasks.multitask.predict.predict_batch` (at
    ``eval.predict_conf``, ``eval.iou``, ``eval.max_det``). Tiles are scaled
    to a common height of ``data.imgsz`` pixels. The model runs in eval mode;
    its previous mode is restored.
    """
    from mtkd.tasks.multitask.predict import predict_batch

    e, size = cfg["eval"], cfg["data"]["imgsz"]
    classes = list(dataset.classes)
    tiles = []
    was_training = model.training
    model.eval()
    try:
        for i in range(min(n, len(dataset))):
            item, sample = dataset[i], dataset.load_sample(i)
            h, w = sample.image.shape[:2]
            p = predict_batch(model, item["image"][None], [item["letterbox"]], [(h, w)], e["predict_conf"],
                              e["iou"], e["max_det"], device)[0]
            boxes, scores, labels = (np.zeros((0, 4)), None, np.zeros(0)) if p.boxes is None else \
                (p.boxes, p.scores, p.labels)
            mask = None if p.seg is None else p.mask().cpu().numpy()
            pred = draw_predictions(sample.image, boxes, labels, scores, mask, classes)
            gt = draw_predictions(sample.image, sample.boxes if sample.has_det else np.zeros((0, 4)),
                                  sample.labels if sample.has_det else np.zeros(0), None,
                                  sample.mask if sample.has_seg else None, classes)
            tw = max(1, round(w * size / h))
            tiles.append([Image.fromarray(a).resize((tw, size)) for a in (pred, gt)])
    finally:
        model.train(was_training)
    if not tiles:
        return
    canvas = Image.new("RGB", (sum(t[0].width for t in tiles), 2 * size), (255, 255, 255))
    x = 0
    for pred, gt in tiles:
        canvas.paste(pred, (x, 0))
        canvas.paste(gt, (x, size))
        x += pred.width
    canvas.save(path)
