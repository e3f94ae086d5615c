"""COCO layout: one ``instances_<split>.json`` plus an image folder.

Defaults match the synthetic layout (``root/annotations/instances_<split>.json``
and ``root/images/<split>/``); both are templates with ``{split}`` so a real
COCO tree works with ``ann_file="annotations/instances_{split}2017.json",
image_dir="{split}2017"``.

Conventions:
  * Classes: contiguous indices over the categories in sorted category-id
    order, or, when a class list is configured, the list's order matched by
    category name (a category whose name is not in the list is an error).
  * ``bbox`` is xywh and becomes xyxy. An annotation without ``bbox`` marks
    the whole image ``has_det=False`` (mtkd's way of writing "no detection
    labels" in COCO); likewise an annotation without ``segmentation`` marks
    the image ``has_seg=False``. An image with no annotation at all is a
    labelled, empty image for both tasks.
  * ``file_name`` is relative to the image folder and must stay inside it:
    an absolute path or a ``..`` component is a DataError naming the
    annotation file and the image.
  * Sample ids are the image ``file_name`` without its suffix (as the
    other formats' ids), so one image has the same id in every layout.
  * ``iscrowd=1`` annotations are not detection targets; they are painted
    VOID (255) into the mask and reported to COCO evaluation as
    ``iscrowd=1`` (ignored) by :meth:`coco_gt`.
  * Semantic mask: polygons and RLE (compressed string or uncompressed list
    ``counts``) are rasterised by pycocotools. Instances are painted in
    decreasing pixel area (ties in annotation order) so small objects stay on
    top of large ones; crowd regions are painted last, as VOID.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from pycocotools import mask as mask_utils

from mtkd.datasets.common import Record, RecordDataset, check_boxes
from mtkd.errors import DataError
from mtkd.registry import FORMATS
from mtkd.structures import VOID, Sample


def decode_rle(rle: Any) -> np.ndarray:
    """``pycocotools.mask.decode`` without its numpy-2 DeprecationWarning noise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle)


def segmentation_to_binary(seg: Any, h: int, w: int, source: Path | str) -> np.ndarray:
    """Rasterise one COCO segmentation (polygons, RLE or uncompressed RLE) to (h, w) uint8."""
    if isinstance(seg, list):
        rles = mask_utils.frPyObjects([list(map(float, p)) for p in seg], h, w)
        rle = mask_utils.merge(rles)
    elif isinstance(seg, dict):
        if list(seg.get("size", [])) != [h, w]:
            raise DataError(f"{source}: RLE size {seg.get('size')} does not match the image size {[h, w]}")
        rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else seg
        if isinstance(rle["counts"], str):
            rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    else:
        raise DataError(f"{source}: segmentation must be polygons or RLE, got {type(seg).__name__}")
    return np.asarray(decode_rle(rle), dtype=np.uint8).reshape(h, w)


@dataclass(frozen=True)
class _CocoMask:
    """Picklable mask builder for one image: ``[(segmentation, label or None for crowd)]``."""

    source: str
    instances: Tuple[Tuple[Any, Optional[int]], ...]

    def __call__(self, h: int, w: int) -> np.ndarray:
        mask = np.zeros((h, w), np.uint8)
        things, crowds = [], []
        for seg, label in self.instances:
            binary = segmentation_to_binary(seg, h, w, self.source).astype(bool)
            (crowds if label is None else things).append((binary, label))
        order = sorted(range(len(things)), key=lambda k: -int(things[k][0].sum()))
        for k in order:
            binary, label = things[k]
            mask[binary] = label + 1
        for binary, _ in crowds:
            mask[binary] = VOID
        return mask


def _check_segmentation(seg: Any, source: Path) -> None:
    if isinstance(seg, list):
        if not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in seg):
            raise DataError(f"{source}: polygon segmentation needs lists of >= 3 (x, y) points")
    elif isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            raise DataError(f"{source}: RLE segmentation needs 'counts' and 'size'")
    else:
        raise DataError(f"{source}: segmentation must be polygons or RLE, got {type(seg).__name__}")


def _inside_folder(file_name: str) -> bool:
    """Whether ``file_name`` is a relative path that stays below its folder.

    Checked on the text (POSIX and Windows spellings), not on the resolved
    path, so an image folder made of symlinks still works.
    """
    return not any(p.anchor or ".." in p.parts for p in (PurePosixPath(file_name), PureWindowsPath(file_name)))


def image_path_of(ann_path: Path, img_dir: Path, im: Dict[str, Any]) -> Path:
    """The path of image entry ``im`` of ``ann_path`` below ``img_dir``; a DataError naming the
    annotation file and the image id when its ``file_name`` leaves that folder."""
    if not _inside_folder(im["file_name"]):
        raise DataError(f"{ann_path}: image {im.get('id')} file_name {im['file_name']!r} points outside "
                        f"the image folder {img_dir}")
    return img_dir / im["file_name"]


def load_coco_json(path: Path) -> Dict[str, Any]:
    """Read an instances JSON; DataError naming it when missing or malformed."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise DataError(f"{path}: malformed JSON ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
        raise DataError(f"{path}: not a COCO instances file (needs 'images' and 'categories' lists)")
    return data


@FORMATS.register("coco")
class COCODataset(RecordDataset):
    """COCO instances split (see module docstring).

    Args:
        root: dataset root.
        split: split name substituted for ``{split}`` in the two templates.
        classes: class names to match categories by name, or ``None``.
        transform: Sample -> item dict (``None``: ``__getitem__`` gives Samples).
        skip_bad: skip bad samples with a warning instead of raising.
        ann_file: annotation path template relative to ``root`` (or absolute).
        image_dir: image folder template relative to ``root`` (or absolute).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        classes: Optional[Sequence[str]] = None,
        transform: Optional[Callable[[Sample], Dict[str, Any]]] = None,
        skip_bad: bool = False,
        ann_file: str = "annotations/instances_{split}.json",
        image_dir: str = "images/{split}",
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: COCO root not found")
        ann_path = root / ann_file.format(split=split)
        img_dir = root / image_dir.format(split=split)
        data = load_coco_json(ann_path)
        try:
            cats = sorted(data["categories"], key=lambda c: int(c["id"]))
            if classes:
                classes = list(classes)
                by_name = {name: k for k, name in enumerate(classes)}
                for c in cats:
                    if c["name"] not in by_name:
                        raise DataError(f"{ann_path}: unknown class name {c['name']!r}")
                cat_index = {int(c["id"]): by_name[c["name"]] for c in cats}
            else:
                classes = [str(c["name"]) for c in cats]
                cat_index = {int(c["id"]): k for k, c in enumerate(cats)}
            by_image: Dict[int, List[Dict[str, Any]]] = {int(im["id"]): [] for im in data["images"]}
            for ann in data.get("annotations", []):
                image_id = int(ann["image_id"])
                if image_id not in by_image:
                    raise DataError(f"{ann_path}: annotation {ann.get('id')} refers to unknown image {image_id}")
                by_image[image_id].append(ann)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{ann_path}: malformed COCO field ({exc!r})") from None
        records: List[Record] = []
        skipped: List[str] = []
        for im in sorted(data["images"], key=lambda im: int(im["id"])):
            try:
                records.append(self._record(im, by_image[int(im["id"])], img_dir, ann_path, cat_index))
            except DataError as exc:
                if not skip_bad:
                    raise
                warnings.warn(f"skipping bad sample: {exc}", stacklevel=2)
                skipped.append(str(img_dir / str(im.get("file_name"))))
        self.root = root
        self.split = split
        self.ann_path = ann_path
        super().__init__(records, classes, transform, skip_bad, skipped, ann_path)

    @staticmethod
    def _record(
        im: Dict[str, Any], anns: List[Dict[str, Any]], img_dir: Path, ann_path: Path, cat_index: Dict[int, int]
    ) -> Record:
        try:
            image_path = img_dir / im["file_name"]
            h, w = int(im["height"]), int(im["width"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{ann_path}: image entry {im.get('id')} malformed ({exc!r})") from None
        image_path = image_path_of(ann_path, img_dir, im)
        if not image_path.is_file():
            raise DataError(f"{image_path}: image file not found")
        source = f"{ann_path} (image {im['id']}, {image_path.name})"
        has_det = all(a.get("bbox") for a in anns)
        has_seg = all(a.get("segmentation") for a in anns)
        boxes, labels, crowd_boxes, crowd_labels, instances = [], [], [], [], []
        for a in anns:
            if int(a.get("category_id", -1)) not in cat_index:
                raise DataError(f"{source}: annotation {a.get('id')} has unknown category id {a.get('category_id')}")
            label = cat_index[int(a["category_id"])]
            crowd = bool(a.get("iscrowd", 0))
            if has_det:
                try:
                    x, y, bw, bh = (float(v) for v in a["bbox"])
                except (TypeError, ValueError):
                    raise DataError(f"{source}: bbox {a['bbox']!r} is not four numbers") from None
                (crowd_boxes if crowd else boxes).append([x, y, x + bw, y + bh])
                (crowd_labels if crowd else labels).append(label)
            if has_seg:
                _check_segmentation(a["segmentation"], ann_path)
                instances.append((a["segmentation"], None if crowd else label))
        return Record(
            id=str(Path(im["file_name"]).with_suffix("")),
            image_path=image_path,
            label_path=ann_path,
            boxes=check_boxes(np.array(boxes, np.float32), h, w, source),
            labels=np.array(labels, np.int64),
            difficult=np.zeros(len(labels), bool),
            has_det=has_det,
            has_seg=has_seg,
            mask_fn=_CocoMask(str(ann_path), tuple(instances)) if has_seg else None,
            size=(h, w),
            crowd_boxes=check_boxes(np.array(crowd_boxes, np.float32), h, w, source),
            crowd_labels=np.array(crowd_labels, np.int64),
        )
