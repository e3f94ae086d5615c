"""Image classification data: an ImageFolder reader, labels files, normalisation.

Layout (torchvision's ImageFolder convention)::

    root/train/<class name>/*.png|jpg|...
    root/val/<class name>/...
    root/test/<class name>/...      (optional; the val folder stands in when absent)

Conventions:

* Classes are the sorted sub-folder names of the *train* folder (or the
  config's ``data.classes``); every other split maps its sub-folders through
  that list, so indices agree across splits. A val/test class the training
  folder lacks is a :class:`DataError`; a class with no val images is fine.
* Images are read with PIL and converted to upright 8-bit RGB by
  :func:`mtkd.imageio.to_rgb` (EXIF orientation applied, 16-bit images
  scaled, float images refused). A corrupt or unreadable image raises
  :class:`DataError` naming the file; with ``skip_bad=True`` every image is
  verified when the dataset is built and bad ones are dropped with a warning.
* Transforms (torchvision v2): eval = resize the short side to ``imgsz`` then
  centre-crop ``imgsz``; train = ``RandomResizedCrop(imgsz, scale)`` and a
  horizontal flip with probability ``hflip`` (``augment`` keys ``scale``
  (default ``[0.6, 1.0]``) and ``hflip`` (default 0.5); ``augment: false``
  or ``{enabled: false}`` gives the eval transform).
* Normalisation: ``(x/255 - mean) / std`` per RGB channel; when mean/std are
  ``None`` they are computed over the training images (see
  :func:`compute_mean_std`).
* Items are dicts ``{"image": float (3,H,W), "label": int, "index": int,
  "id": path relative to the split folder}``; :func:`collate` stacks them into
  the classification batch ``{"images", "labels" (B,) int64, "index" (B,)
  int64, "ids"}``.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from mtkd.errors import ConfigError, DataError
from mtkd.imageio import list_images, open_image, to_rgb

PathLike = Union[str, Path]


def find_classes(folder: PathLike) -> List[str]:
    """Sorted names of the sub-folders of ``folder`` (the ImageFolder classes)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{folder}: no class sub-folders (expected <folder>/<class>/<images>)")
    return classes


def load_rgb(path: PathLike) -> Image.Image:
    """The image at ``path`` as RGB, or a DataError naming the file
    (:func:`mtkd.imageio.open_image`: missing, not an image, corrupt)."""
    with open_image(path) as im:
        try:
            return to_rgb(im, path)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: corrupt or unreadable image ({type(exc).__name__}: {str(exc)[:120]})") from None


def parse_labels_file(path: PathLike) -> List[str]:
    """Class names from a labels file with one ``index name`` per line.

    ``name`` is the rest of the line after the index (it may hold spaces);
    blank lines are skipped. The indices must be ``0..n-1``, each once. A
    malformed line raises DataError naming the file and line number.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: labels file not found")
    names: Dict[int, str] = {}
    for lineno, raw in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise DataError(f"{path}:{lineno}: expected 'index name', got {line!r}")
        try:
            idx = int(parts[0])
        except ValueError:
            raise DataError(f"{path}:{lineno}: index {parts[0]!r} is not an integer") from None
        if idx < 0:
            raise DataError(f"{path}:{lineno}: negative index {idx}")
        if idx in names:
            raise DataError(f"{path}:{lineno}: index {idx} given twice")
        names[idx] = parts[1].strip()
    if not names:
        raise DataError(f"{path}: labels file has no entries")
    missing = sorted(set(range(len(names))) - set(names))
    if missing:
        raise DataError(f"{path}: indices must be 0..{len(names) - 1}; missing {missing[:5]}")
    return [names[i] for i in range(len(names))]


def _augment_options(augment: Any) -> Optional[Dict[str, Any]]:
    """``None`` (no augmentation) or ``{"scale": (lo, hi), "hflip": p}``."""
    if augment is False or augment is None:
        return None
    if not isinstance(augment, dict):
        raise ConfigError(f"data.augment: expected a mapping or false, got {augment!r}")
    known = {"enabled", "scale", "hflip"}
    for key in augment:
        if key not in known:
            raise ConfigError(f"data.augment.{key}: unknown key for classification; known: {sorted(known)}")
    if not augment.get("enabled", True):
        return None
    scale = augment.get("scale", [0.6, 1.0])
    if (not isinstance(scale, (list, tuple)) or len(scale) != 2
            or not 0 < float(scale[0]) <= float(scale[1]) <= 1):
        raise ConfigError(f"data.augment.scale: expected [lo, hi] with 0 < lo <= hi <= 1, got {scale!r}")
    hflip = float(augment.get("hflip", 0.5))
    if not 0.0 <= hflip <= 1.0:
        raise ConfigError(f"data.augment.hflip: expected a probability, got {hflip}")
    return {"scale": (float(scale[0]), float(scale[1])), "hflip": hflip}


def _check_stats(values: Sequence[float], key: str) -> Tuple[float, float, float]:
    if not isinstance(values, (list, tuple)) or len(values) != 3:
        raise ConfigError(f"{key}: expected 3 numbers (RGB), got {values!r}")
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def build_transform(imgsz: int, mean: Sequence[float], std: Sequence[float],
                    augment: Any = None) -> v2.Compose:
    """PIL image -> normalised float tensor (3, imgsz, imgsz); see the module doc."""
    mean = _check_stats(mean, "data.mean")
    std = _check_stats(std, "data.std")
    if min(std) <= 0:
        raise ConfigError(f"data.std: must be positive, got {list(std)}")
    opts = _augment_options(augment)
    if opts is None:
        geometry = [v2.Resize(imgsz, antialias=True), v2.CenterCrop(imgsz)]
    else:
        geometry = [v2.RandomResizedCrop(imgsz, scale=opts["scale"], antialias=True),
                    v2.RandomHorizontalFlip(opts["hflip"])]
    return v2.Compose([v2.PILToTensor(), *geometry, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(mean=list(mean), std=list(std))])


class ImageFolderDataset(torch.utils.data.Dataset):
    """One split of an ImageFolder tree; see the module doc for conventions.

    ``classes``: the class list (index = label); ``samples``: ``[(path, label)]``;
    ``split``: the folder's name; ``skipped``: the images dropped as bad (``skip_bad``).
    """

    def __init__(self, folder: PathLike, classes: Sequence[str], transform: Any,
                 skip_bad: bool = False):
        self.folder = Path(folder)
        self.split = self.folder.name
        self.classes = list(classes)
        self.skipped: List[str] = []
        self.transform = transform
        index = {name: i for i, name in enumerate(self.classes)}
        samples: List[Tuple[Path, int]] = []
        for name in find_classes(self.folder):
            if name not in index:
                raise DataError(f"{self.folder / name}: class {name!r} is not among the training "
                                f"classes ({', '.join(self.classes)})")
            samples += [(p, index[name]) for p in list_images(self.folder / name, IMG_EXTENSIONS)]
        if skip_bad:
            good = self._drop_bad(samples)
            self.skipped = sorted(str(p) for p, _ in set(samples) - set(good))
            samples = good
        if not samples:
            raise DataError(f"{self.folder}: no images found (extensions: {', '.join(IMG_EXTENSIONS)})")
        self.samples = samples

    @staticmethod
    def _drop_bad(samples: List[Tuple[Path, int]]) -> List[Tuple[Path, int]]:
        good = []
        for path, label in samples:
            try:
                load_rgb(path)
            except DataError as exc:
                warnings.warn(f"skipping bad image: {exc}", RuntimeWarning, stacklevel=3)
                continue
            good.append((path, label))
        return good

    def __len__(self) -> int:
        return len(self.samples)

    def skipped_files(self) -> List[str]:
        """The images dropped as bad when the dataset was built (``skip_bad``)."""
        return list(self.skipped)

    @property
    def targets(self) -> List[int]:
        return [label for _, label in self.samples]

    def __getitem__(self, i: int) -> Dict[str, Any]:
        path, label = self.samples[i]
        image = self.transform(load_rgb(path))
        return {"image": image, "label": label, "index": i, "id": path.relative_to(self.folder).as_posix()}


def collate(items: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Items -> ``{"images" (B,3,H,W), "labels" (B,) int64, "index" (B,) int64, "ids"}``."""
    return {
        "images": torch.stack([it["image"] for it in items]),
        "labels": torch.tensor([it["label"] for it in items], dtype=torch.int64),
        "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
        "ids": [it["id"] for it in items],
    }


def compute_mean_std(folder: PathLike, imgsz: int, max_images: Optional[int] = None) -> Tuple[List[float], List[float]]:
    """Per-channel mean and std (0..1 scale) over the images of ``folder``
    (recursively), each resized/centre-cropped to ``imgsz`` as for evaluation;
    pixels of all images pooled. ``max_images`` caps the count (evenly spaced)."""
    paths = list_images(folder, IMG_EXTENSIONS)
    if not paths:
        raise DataError(f"{folder}: no images to compute the normalisation from")
    if max_images is not None and len(paths) > max_images:
        step = len(paths) / max_images
        paths = [paths[int(i * step)] for i in range(max_images)]
    geometry = v2.Compose([v2.PILToTensor(), v2.Resize(imgsz, antialias=True), v2.CenterCrop(imgsz),
                           v2.ToDtype(torch.float64, scale=True)])
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    count = 0
    for path in paths:
        x = geometry(load_rgb(path)).reshape(3, -1)
        total += x.sum(1)
        total_sq += (x * x).sum(1)
        count += x.shape[1]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp(min=1e-12).sqrt()
    return [float(v) for v in mean], [float(v) for v in std]
