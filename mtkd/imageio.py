"""PIL image -> upright 8-bit RGB the same way everywhere (datasets, predict, classification).

* **Orientation.** The EXIF orientation tag (0x0112) is applied with
  :func:`PIL.ImageOps.exif_transpose`, so pixels, sizes and boxes refer to the
  image as a viewer shows it. :func:`oriented_size` gives the matching size
  from the header alone.
* **Bit depth.** 16-bit greyscale (modes ``I;16*``) and 32-bit integer (mode
  ``I``) images are scaled by 255/65535 (values clipped to 0..65535) and
  rounded; float images (mode ``F``) have no agreed range and are refused.
  Every other mode (``L``, ``P``, ``RGBA``, ``CMYK``, ...) goes through
  ``convert("RGB")``: palettes are looked up, alpha is dropped.

* **Opening.** :func:`open_image` opens files with PIL's own
  ``Image.open``, also where another library replaced it: Ultralytics (which
  mtkd's models import) wraps it so that a file PIL cannot identify triggers
  a requirements check for ``pi_heif`` (an install attempt unless offline)
  and a retry. A file that is not an image of a format PIL reads is a
  one-line DataError saying so.

* **Listing.** :func:`list_images` finds the image files of a folder by
  suffix (:data:`IMAGE_SUFFIXES` unless told otherwise).

Only PIL and numpy are imported, so the classification package and the
command-line parser can use this without the detection datasets'
dependencies.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mtkd.errors import DataError

#: Image file suffixes the loaders, predict and the unlabeled-image reader recognise (lower case).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(path: Path | str, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> List[Path]:
    """The image files under folder ``path``, recursively, sorted by path: every file whose
    lower-case suffix is in ``suffixes`` (lower case). ``[path]`` when ``path`` is a file (named
    explicitly, so read whatever its suffix). May be empty; a DataError naming ``path`` when it
    is neither a file nor a folder."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: no such image file or folder")
    return sorted(p for p in path.rglob("*") if p.suffix.lower() in suffixes and p.is_file())


#: EXIF orientations that turn the image by 90 degrees (width and height swap).
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)

_ORIENTATION_TAG = 0x0112


def _pil_open() -> Callable[..., Image.Image]:
    """PIL's own ``Image.open``, looking through a replacement that keeps it as ``__wrapped__`` or,
    as Ultralytics' does, as ``_image_open`` in its module; the current ``Image.open`` otherwise."""
    opener = Image.open
    for _ in range(4):
        if getattr(opener, "__module__", None) == Image.__name__:
            return opener
        inner = getattr(opener, "__wrapped__", None) or getattr(opener, "__globals__", {}).get("_image_open")
        if not callable(inner):
            break
        opener = inner
    return Image.open


def open_image(path: Path | str, what: str = "image") -> Image.Image:
    """``PIL.Image.open(path)`` with PIL's own opener (module doc); DataError naming ``path`` when it
    is missing or not an image of a format PIL reads (``what`` names the file's role: image, mask)."""
    try:
        return _pil_open()(path)
    except FileNotFoundError:
        raise DataError(f"{path}: {what} file not found") from None
    except (UnidentifiedImageError, ImportError):  # ImportError: a replaced opener's missing plugin
        raise DataError(f"{path}: not a readable {what} (not a file format PIL reads)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: corrupt or unreadable {what} ({exc})") from None


def to_rgb(im: Image.Image, path: Path | str) -> Image.Image:
    """An opened image upright and as 8-bit RGB; DataError naming ``path`` for float images."""
    if im.mode == "F":
        raise DataError(f"{path}: floating-point image (mode F) is not supported; save it as 8- or 16-bit")
    im = ImageOps.exif_transpose(im)
    if im.mode == "I" or im.mode.startswith("I;16"):
        wide = np.asarray(im).astype(np.float64).clip(0, 65535)
        grey = np.round(wide * (255.0 / 65535.0)).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), mode="RGB")
    return im.convert("RGB")


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation (1..8; 1 when absent) of an opened image, without decoding it.

    For PNG only an ``eXIf`` chunk before the image data is seen (where the PNG
    specification places it); PIL would decode the whole file to look further.
    """
    exif = Image.Image.getexif(im) if im.format == "PNG" else im.getexif()
    try:
        return int(exif.get(_ORIENTATION_TAG, 1))
    except (TypeError, ValueError):
        return 1


def oriented_size(im: Image.Image) -> Tuple[int, int]:
    """(h, w) of an opened image once its EXIF orientation is applied (header only)."""
    if exif_orientation(im) in SWAPPING_ORIENTATIONS:
        return im.width, im.height
    return im.height, im.width
