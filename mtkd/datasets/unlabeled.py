"""Images without labels, for distillation: ``data.unlabeled``.

What the value names:

* **A folder** when it contains a path separator (``/``) or is an existing
  directory (relative paths from the working directory, like
  ``data.root``): every file under it, recursively, with a suffix of
  :data:`~mtkd.imageio.IMAGE_SUFFIXES` (sorted by path). Sample ids
  are the paths relative to the folder, without suffix.
* **Otherwise a split name of** ``data.format``, read from the same tree as
  ``data.train`` with any labels ignored: VOC, the ids of
  ``ImageSets/Main/<name>.txt`` and ``ImageSets/Segmentation/<name>.txt``
  (images ``JPEGImages/<id>.jpg``; no annotation file is needed); YOLO, the
  data yaml's ``<name>`` entry (folder, ``.txt`` list or a list of them);
  COCO, the ``images`` of ``data.ann_file`` with ``{split}`` = ``<name>``
  (default ``annotations/instances_<name>.json``, images in
  ``data.image_dir``; ``annotations`` and ``categories`` are not read).

Every sample has no boxes, no mask, ``has_det=False`` and ``has_seg=False``:
the hard losses skip it and only the teacher supervises it. Images go
through the training transform (augment + letterbox) like labelled ones.
Images are checked for existence at construction and decoded lazily; a
missing or corrupt image follows ``data.skip_bad`` as in every format.
Errors name ``data.unlabeled`` and the path.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from mtkd.datasets.coco import image_path_of
from mtkd.datasets.common import Record, RecordDataset
from mtkd.datasets.voc import read_id_list
from mtkd.datasets.yolo import _list_images, load_data_yaml, yolo_root
from mtkd.errors import ConfigError, DataError
from mtkd.imageio import IMAGE_SUFFIXES, list_images
from mtkd.structures import Sample


def is_folder_value(value: str) -> bool:
    """Whether ``data.unlabeled: value`` names a folder (else a split name)."""
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return any(s in value for s in seps) or Path(value).is_dir()


def folder_images(folder: Path) -> List[Tuple[str, Path]]:
    """``(id, path)`` of every image under ``folder``, recursively, sorted by path."""
    return [(p.relative_to(folder).with_suffix("").as_posix(), p) for p in list_images(folder)]


def voc_split_images(root: Path, split: str) -> Tuple[List[Tuple[str, Path]], Path]:
    """``(id, JPEGImages/<id>.jpg)`` of a VOC split's id lists, and the list file that names it."""
    if not root.is_dir():
        raise DataError(f"{root}: VOC root not found")
    main = root / "ImageSets" / "Main" / f"{split}.txt"
    seg = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not main.is_file() and not seg.is_file():
        raise DataError(f"{main}: split file not found (nor {seg})")
    ids = set()
    for path in (main, seg):
        if path.is_file():
            ids.update(read_id_list(path))
    return [(i, root / "JPEGImages" / f"{i}.jpg") for i in sorted(ids)], main if main.is_file() else seg


def yolo_split_images(data_yaml: Path, split: str) -> List[Tuple[str, Path]]:
    """``(stem, path)`` of the images of the data yaml's ``split`` entry."""
    data = load_data_yaml(data_yaml)
    root = yolo_root(data, data_yaml)
    if not data.get(split):
        raise DataError(f"{data_yaml}: no {split!r} split entry")
    return [(p.stem, p) for p in _list_images(data[split], root, data_yaml)]


def coco_split_images(root: Path, split: str, ann_file: str, image_dir: str) -> Tuple[List[Tuple[str, Path]], Path]:
    """``(file stem, path)`` of the ``images`` of a COCO json (sorted by image id), and the json; a
    ``file_name`` that leaves the image folder is a DataError."""
    if not root.is_dir():
        raise DataError(f"{root}: COCO root not found")
    ann_path = root / ann_file.format(split=split)
    img_dir = root / image_dir.format(split=split)
    try:
        data = json.loads(ann_path.read_text())
    except FileNotFoundError:
        raise DataError(f"{ann_path}: annotation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise DataError(f"{ann_path}: malformed JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{ann_path}: needs an 'images' list")
    try:
        images = sorted(data["images"], key=lambda im: int(im["id"]))
        return [(str(Path(im["file_name"]).with_suffix("")), image_path_of(ann_path, img_dir, im))
                for im in images], ann_path
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{ann_path}: malformed image entry ({exc!r})") from None


class UnlabeledDataset(RecordDataset):
    """Images without labels (see module docstring).

    Args:
        images: ``(id, path)`` pairs.
        classes: the labelled set's classes (so both sets agree).
        transform: Sample -> item dict (``None``: ``__getitem__`` gives Samples).
        skip_bad: skip missing/corrupt images with a warning instead of raising.
        source: the folder or split file, named in errors.
    """

    def __init__(
        self,
        images: Sequence[Tuple[str, Path]],
        classes: Sequence[str],
        transform: Optional[Callable[[Sample], Dict[str, Any]]] = None,
        skip_bad: bool = False,
        source: Path | str = "data.unlabeled",
    ) -> None:
        records: List[Record] = []
        skipped: List[str] = []
        for img_id, path in images:
            if not Path(path).is_file():
                if not skip_bad:
                    raise DataError(f"{path}: image file not found")
                warnings.warn(f"skipping bad sample: {path}: image file not found", stacklevel=2)
                skipped.append(str(path))
                continue
            records.append(Record(id=img_id, image_path=Path(path), label_path=None,
                                  boxes=np.zeros((0, 4), np.float32), labels=np.zeros(0, np.int64),
                                  difficult=np.zeros(0, bool), has_det=False, has_seg=False))
        super().__init__(records, classes, transform, skip_bad, skipped, source)


def build_unlabeled_dataset(data_cfg: Dict[str, Any], classes: Sequence[str],
                            transform: Optional[Callable[[Sample], Dict[str, Any]]],
                            ) -> Optional[UnlabeledDataset]:
    """The ``data.unlabeled`` dataset of a (validated) ``data`` section, or ``None`` when unset."""
    value = data_cfg.get("unlabeled")
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"data.unlabeled: expected a folder path or a split name, got {value!r}")
    skip_bad = bool(data_cfg.get("skip_bad", False))
    if is_folder_value(value):
        folder = Path(value).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"data.unlabeled: folder {folder} not found")
        images, source = folder_images(folder), folder
        if not images:
            raise DataError(f"data.unlabeled: no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    else:
        fmt, root = data_cfg.get("format"), Path(str(data_cfg.get("root")))
        try:
            if fmt == "voc":
                images, source = voc_split_images(root, value)
            elif fmt == "yolo":
                images, source = yolo_split_images(root, value), root
            elif fmt == "coco":
                images, source = coco_split_images(root, value, data_cfg.get("ann_file") or
                                                   "annotations/instances_{split}.json",
                                                   data_cfg.get("image_dir") or "images/{split}")
            else:
                raise ConfigError(f"data.unlabeled: split names need format voc, coco or yolo, got {fmt!r}")
        except DataError as exc:
            raise DataError(f"data.unlabeled: {exc}") from None
    try:
        return UnlabeledDataset(images, classes, transform, skip_bad, source)
    except DataError as exc:
        raise DataError(f"data.unlabeled: {exc}") from None
