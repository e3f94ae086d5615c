"""Ultralytics YOLO layout, plus optional semantic masks.

::

    data.yaml        path: <root>, train: images/train, val: ..., test: ...,
                     names: [a, b] or {0: a, 1: b}
    <root>/images/<split>/<stem>.jpg|png
    <root>/labels/<split>/<stem>.txt   "cls cx cy w h" normalised, one object a line
    <root>/masks/<split>/<stem>.png    optional index PNG (VOC convention)

Conventions:
  * ``path`` may be absolute or relative to the yaml file's folder (not to
    Ultralytics' ``datasets_dir``); missing ``path`` means the yaml's folder.
  * A split entry is a folder of images, a ``.txt`` list of image paths
    (relative ones resolved against the list's folder), or a list of those.
  * Label and mask paths follow Ultralytics' rule: the last ``/images/`` of
    the image path becomes ``/labels/`` (``.txt``) or ``/masks/`` (``.png``).
  * A missing label file is an image with no objects (Ultralytics'
    convention); a missing mask PNG means ``has_seg=False``.
  * A label line with more than 5 numbers is an Ultralytics segment
    (``cls x1 y1 x2 y2 ...``); its box is the polygon's bounding box.
  * YOLO has no way to say "this image has no detection labels"; mtkd reads
    an optional ``mtkd_no_det: {<split key>: [stem, ...]}`` entry of the yaml
    (Ultralytics ignores unknown keys) and flags those images ``has_det=False``.
  * A configured class list overrides ``names`` (it may rename classes) but
    must have as many entries.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import yaml

from mtkd.datasets.common import Record, RecordDataset, check_labels, png_mask_fn
from mtkd.errors import DataError
from mtkd.imageio import list_images
from mtkd.registry import FORMATS
from mtkd.structures import Sample


def _swap_dir(image: Path, folder: str, suffix: str) -> Path:
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}{folder}{os.sep}"
    return Path(sb.join(str(image).rsplit(sa, 1))).with_suffix(suffix)


def label_path(image: Path) -> Path:
    """Ultralytics' label path of an image."""
    return _swap_dir(image, "labels", ".txt")


def mask_path(image: Path) -> Path:
    """mtkd's mask path of an image (``/images/`` -> ``/masks/``, ``.png``)."""
    return _swap_dir(image, "masks", ".png")


def load_data_yaml(path: Path) -> Dict[str, Any]:
    """Read an Ultralytics data yaml; DataError naming it when missing/malformed."""
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: data yaml not found") from None
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: malformed YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict) or "names" not in data:
        raise DataError(f"{path}: data yaml needs a 'names' entry")
    return data


def yaml_names(data: Dict[str, Any], source: Path) -> List[str]:
    """``names`` as a list (a dict must have keys 0..n-1)."""
    names = data["names"]
    if isinstance(names, dict):
        try:
            keys = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            raise DataError(f"{source}: 'names' keys must be integers") from None
        if keys != list(range(len(keys))):
            raise DataError(f"{source}: 'names' keys must be 0..{len(keys) - 1}, got {keys}")
        return [str(names[k] if k in names else names[str(k)]) for k in keys]
    if isinstance(names, list):
        return [str(n) for n in names]
    raise DataError(f"{source}: 'names' must be a list or a dict")


def yolo_root(data: Dict[str, Any], data_yaml: Path) -> Path:
    """The dataset root of a data yaml (``path``, relative to the yaml's folder); DataError if missing."""
    root = Path(str(data.get("path") or "."))
    root = root if root.is_absolute() else (data_yaml.parent / root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset root not found (from {data_yaml})")
    return root


def _list_images(entry: Any, root: Path, source: Path) -> List[Path]:
    entries = entry if isinstance(entry, list) else [entry]
    images: List[Path] = []
    for e in entries:
        p = Path(str(e))
        p = p if p.is_absolute() else root / p
        if p.is_dir():
            images += list_images(p)
        elif p.is_file() and p.suffix == ".txt":
            for line in p.read_text().splitlines():
                if line.strip():
                    q = Path(line.strip())
                    images.append(q if q.is_absolute() else (p.parent / q).resolve())
        else:
            raise DataError(f"{p}: split folder or list not found (from {source})")
    return images


def parse_label_file(path: Path, nc: int) -> tuple[np.ndarray, np.ndarray]:
    """Read a YOLO label txt: normalised xyxy boxes (N,4) and labels (N,)."""
    boxes, labels = [], []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise DataError(f"{path}: cannot read label file ({exc})") from None
    for n, line in enumerate(lines, 1):
        tokens = line.split()
        if not tokens:
            continue
        try:
            values = [float(t) for t in tokens]
        except ValueError:
            raise DataError(f"{path}: line {n} is not numbers: {line.strip()!r}") from None
        if len(values) == 5:
            _, cx, cy, w, h = values
            box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        elif len(values) >= 7 and len(values) % 2 == 1:
            xs, ys = values[1::2], values[2::2]
            box = [min(xs), min(ys), max(xs), max(ys)]
        else:
            raise DataError(f"{path}: line {n} needs 'cls cx cy w h' (or a segment), got {len(values)} numbers")
        if box[2] <= box[0] or box[3] <= box[1]:
            raise DataError(f"{path}: line {n} box has zero or negative size")
        if values[0] != int(values[0]):
            raise DataError(f"{path}: line {n} class id {tokens[0]!r} is not an integer")
        boxes.append(box)
        labels.append(int(values[0]))
    labels_arr = np.array(labels, np.int64)
    check_labels(labels_arr, nc, path)
    return np.array(boxes, np.float32).reshape(-1, 4), labels_arr


@FORMATS.register("yolo")
class YOLODataset(RecordDataset):
    """One split of an Ultralytics data yaml (see module docstring).

    Args:
        data_yaml: path of the data yaml.
        split: the yaml key of the split (``"train"``, ``"val"``, ``"test"``).
        classes: class names overriding ``names``, or ``None``.
        transform: Sample -> item dict (``None``: ``__getitem__`` gives Samples).
        skip_bad: skip bad samples with a warning instead of raising.
    """

    def __init__(
        self,
        data_yaml: str | Path,
        split: str,
        classes: Optional[Sequence[str]] = None,
        transform: Optional[Callable[[Sample], Dict[str, Any]]] = None,
        skip_bad: bool = False,
    ) -> None:
        data_yaml = Path(data_yaml)
        data = load_data_yaml(data_yaml)
        names = yaml_names(data, data_yaml)
        if classes:
            classes = list(classes)
            if len(classes) != len(names):
                raise DataError(f"{data_yaml}: {len(names)} names but {len(classes)} classes configured")
        else:
            classes = names
        root = yolo_root(data, data_yaml)
        if not data.get(split):
            raise DataError(f"{data_yaml}: no {split!r} split entry")
        no_det = set((data.get("mtkd_no_det") or {}).get(split) or [])
        records: List[Record] = []
        skipped: List[str] = []
        for image in _list_images(data[split], root, data_yaml):
            try:
                records.append(self._record(image, len(classes), image.stem not in no_det))
            except DataError as exc:
                if not skip_bad:
                    raise
                warnings.warn(f"skipping bad sample: {exc}", stacklevel=2)
                skipped.append(str(image))
        self.root = root
        self.split = split
        self.data_yaml = data_yaml
        super().__init__(records, classes, transform, skip_bad, skipped, data_yaml)

    @staticmethod
    def _record(image: Path, nc: int, has_det: bool) -> Record:
        if not image.is_file():
            raise DataError(f"{image}: image file not found")
        txt = label_path(image)
        boxes, labels = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
        if has_det and txt.is_file():
            boxes, labels = parse_label_file(txt, nc)
        png = mask_path(image)
        return Record(
            id=image.stem,
            image_path=image,
            label_path=txt,
            boxes=boxes,
            labels=labels,
            difficult=np.zeros(len(labels), bool),
            has_det=has_det,
            has_seg=png.is_file(),
            mask_fn=png_mask_fn(png, nc) if png.is_file() else None,
            boxes_normalised=True,
        )
