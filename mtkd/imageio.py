"""PIL image -> 8-bit RGB the same way everywhere (datasets, predict, classification).

* **Bit depth.** 16-bit greyscale (modes ``I;16*``) and 32-bit integer (mode
  ``I``) images are scaled by 255/65535 (values clipped to 0..65535) and
  rounded; float images (mode ``F``) have no agreed range and are refused.
  Every other mode (``L``, ``P``, ``RGBA``, ``CMYK``, ...) goes through
  ``convert("RGB")``: palettes are looked up, alpha is dropped.

Only PIL and numpy are imported, so the classification package can use this
without the detection datasets' dependencies.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mtkd.errors import DataError


def to_rgb(im: Image.Image, path: Path | str) -> Image.Image:
    """An opened image as 8-bit RGB; DataError naming ``path`` for float images."""
    if im.mode == "F":
        raise DataError(f"{path}: floating-point image (mode F) is not supported; save it as 8- or 16-bit")
    if im.mode == "I" or im.mode.startswith("I;16"):
        wide = np.asarray(im).astype(np.float64).clip(0, 65535)
        grey = np.round(wide * (255.0 / 65535.0)).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), mode="RGB")
    return im.convert("RGB")
