"""Drawing predictions and plotting training logs (PIL and matplotlib's Agg backend).

Conventions:
  * Class ``k`` (detection label ``k``, mask value ``k + 1``) is drawn in
    colour :func:`class_color` ``(k)``: matplotlib's ``tab20`` palette,
    cycled. Mask value 0 (background) and 255 (void) are left undrawn.
  * Masks are alpha-blended over the image (``MASK_ALPHA``); boxes are
    outlined and labelled ``"<class> <score>"`` in a filled tag above the box
    (inside it when the box touches the top edge).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from mtkd.errors import DataError  # noqa: E402
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


def _read_log(csv_path: Path) -> Dict[str, List[float]]:
    """Numeric columns of a log CSV (``epoch`` first); empty cells become NaN."""
    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise DataError(f"{csv_path}: log file not found") from None
    if not rows or "epoch" not in rows[0]:
        raise DataError(f"{csv_path}: expected a CSV with a header containing an 'epoch' column and data rows")
    columns: Dict[str, List[float]] = {}
    for name in rows[0]:
        values = []
        for row in rows:
            cell = (row.get(name) or "").strip()
            try:
                values.append(float(cell) if cell else math.nan)
            except ValueError:
                break
        else:
            columns[name] = values
    if "epoch" not in columns:
        raise DataError(f"{csv_path}: the 'epoch' column is not numeric")
    return columns


def plot_loss_curves(csv_path: str | Path, png_path: str | Path) -> Path:
    """One subplot per numeric logged column of ``csv_path`` against ``epoch``.

    Non-numeric columns (e.g. a time stamp) are skipped; empty cells are gaps.
    Raises DataError naming the CSV when it is missing, has no ``epoch``
    column, or has no rows. Returns the PNG path.
    """
    csv_path, png_path = Path(csv_path), Path(png_path)
    columns = _read_log(csv_path)
    epoch = columns.pop("epoch")
    if not columns:
        raise DataError(f"{csv_path}: no numeric column to plot besides 'epoch'")
    n = len(columns)
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.6 * nrows), squeeze=False)
    for ax, (name, values) in zip(axes.flat, columns.items()):
        ax.plot(epoch, values, marker="o", markersize=2, linewidth=1.2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
