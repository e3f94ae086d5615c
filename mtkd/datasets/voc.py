"""Pascal VOC layout.

::

    root/JPEGImages/<id>.jpg
    root/Annotations/<id>.xml
    root/SegmentationClass/<id>.png          palette PNG, index = class value
    root/ImageSets/Main/<split>.txt          ids with detection labels
    root/ImageSets/Segmentation/<split>.txt  ids with segmentation labels
    root/classes.txt                         optional, one class name a line

A split is the union of both id lists (sorted by id). An id in only one list
keeps the other task flagged off (``has_det``/``has_seg`` False); it is never
dropped. One of the two list files may be absent; both absent is an error.
Only the first token of a list line is read (so VOC's ``<class>_<split>.txt``
style "id  1" lines also parse).

Coordinates: VOC boxes are 1-based inclusive pixel indices. They become
0-based xyxy edges as ``x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax``
(the convention Detectron2 uses); fractional coordinates are accepted.

Masks: ``SegmentationClass`` index ``k > 0`` is class ``k - 1`` of the class
list, ``0`` background, ``255`` void (VOC's object borders), exactly the
:class:`~mtkd.structures.Sample` convention, so it is used unchanged.

Classes: the configured list, else ``root/classes.txt``, else the sorted set of
object names over *all* XML files in ``Annotations`` (so every split of one
tree agrees). There a malformed XML is an error, or with ``skip_bad`` is
left out with a warning (its sample, when in the split, is then skipped as
bad; names only it held are not classes).
"""
from __future__ import annotations

import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from mtkd.datasets.common import Record, RecordDataset, check_boxes, png_mask_fn, require_file
from mtkd.errors import DataError
from mtkd.registry import FORMATS
from mtkd.structures import Sample


def read_id_list(path: Path) -> List[str]:
    """Ids in an ImageSets list file (first token of each non-empty line)."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise DataError(f"{path}: cannot read split file ({exc})") from None
    return [line.split()[0] for line in lines if line.strip()]


def parse_voc_xml(path: Path) -> Tuple[Optional[Tuple[int, int]], List[Dict[str, Any]]]:
    """Parse one VOC XML into ``((h, w) or None, [{name, box, difficult}])``.

    ``box`` is already 0-based xyxy (see module docstring). Raises DataError
    naming the file for malformed XML or a malformed object.
    """
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found") from None
    except (ET.ParseError, OSError) as exc:
        raise DataError(f"{path}: malformed XML ({exc})") from None
    size = None
    size_el = root.find("size")
    try:
        if size_el is not None and size_el.findtext("width") and size_el.findtext("height"):
            size = (int(float(size_el.findtext("height"))), int(float(size_el.findtext("width"))))
            if size[0] <= 0 or size[1] <= 0:
                size = None  # some VOC-style exporters write 0x0; fall back to the image
        objects = []
        for obj in root.iter("object"):
            name = (obj.findtext("name") or "").strip()
            bb = obj.find("bndbox")
            if not name or bb is None:
                raise DataError(f"{path}: <object> without <name> or <bndbox>")
            xmin, ymin, xmax, ymax = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            difficult = int(float(obj.findtext("difficult") or 0)) != 0
            objects.append({"name": name, "box": [xmin - 1.0, ymin - 1.0, xmax, ymax], "difficult": difficult})
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: malformed number in XML ({exc})") from None
    return size, objects


def voc_classes(root: Path, skip_bad: bool = False) -> List[str]:
    """Classes of a VOC tree: ``classes.txt`` if present, else names over all XMLs
    (a malformed one raises DataError, or with ``skip_bad`` warns and is left out)."""
    txt = root / "classes.txt"
    if txt.is_file():
        return [line.strip() for line in txt.read_text().splitlines() if line.strip()]
    names = set()
    for xml in sorted((root / "Annotations").glob("*.xml")):
        try:
            objects = list(ET.parse(xml).getroot().iter("object"))
        except (ET.ParseError, OSError) as exc:
            if not skip_bad:
                raise DataError(f"{xml}: malformed XML ({exc})") from None
            warnings.warn(f"skipping bad annotation while reading the class list: {xml}: malformed XML ({exc})",
                          stacklevel=2)
            continue
        names.update((obj.findtext("name") or "").strip() for obj in objects)
    names.discard("")
    if not names:
        raise DataError(f"{root}: no classes.txt and no object names in Annotations/*.xml")
    return sorted(names)


@FORMATS.register("voc")
class VOCDataset(RecordDataset):
    """Pascal VOC detection + segmentation split (see module docstring).

    Args:
        root: the tree root (the folder holding ``JPEGImages``).
        split: list-file stem, e.g. ``"train"``, ``"val"``, ``"trainval"``.
        classes: class names, or ``None`` to read them from the tree.
        transform: Sample -> item dict (``None``: ``__getitem__`` gives Samples).
        skip_bad: skip bad samples with a warning instead of raising.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        classes: Optional[Sequence[str]] = None,
        transform: Optional[Callable[[Sample], Dict[str, Any]]] = None,
        skip_bad: bool = False,
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: VOC root not found")
        classes = list(classes) if classes else voc_classes(root, skip_bad)
        index = {name: k for k, name in enumerate(classes)}
        main = root / "ImageSets" / "Main" / f"{split}.txt"
        seg = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not main.is_file() and not seg.is_file():
            raise DataError(f"{main}: split file not found (nor {seg})")
        det_ids = set(read_id_list(main)) if main.is_file() else set()
        seg_ids = set(read_id_list(seg)) if seg.is_file() else set()
        records: List[Record] = []
        skipped: List[str] = []
        for img_id in sorted(det_ids | seg_ids):
            try:
                records.append(self._record(root, img_id, img_id in det_ids, img_id in seg_ids, index))
            except DataError as exc:
                if not skip_bad:
                    raise
                warnings.warn(f"skipping bad sample: {exc}", stacklevel=2)
                skipped.append(str(root / "JPEGImages" / f"{img_id}.jpg"))
        self.root = root
        self.split = split
        super().__init__(records, classes, transform, skip_bad, skipped, main if main.is_file() else seg)

    @staticmethod
    def _record(root: Path, img_id: str, has_det: bool, has_seg: bool, index: Dict[str, int]) -> Record:
        image = require_file(root / "JPEGImages" / f"{img_id}.jpg", "image")
        xml = root / "Annotations" / f"{img_id}.xml"
        boxes = np.zeros((0, 4), np.float32)
        labels = np.zeros(0, np.int64)
        difficult = np.zeros(0, bool)
        size = None
        if has_det:
            size, objects = parse_voc_xml(xml)
            for obj in objects:
                if obj["name"] not in index:
                    raise DataError(f"{xml}: unknown class name {obj['name']!r}")
            boxes = np.array([o["box"] for o in objects], np.float32).reshape(-1, 4)
            labels = np.array([index[o["name"]] for o in objects], np.int64)
            difficult = np.array([o["difficult"] for o in objects], bool)
            if size is not None:
                boxes = check_boxes(boxes, size[0], size[1], xml)
            else:
                bad = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
                if bad.any():
                    raise DataError(f"{xml}: box {boxes[np.argmax(bad)].tolist()} has zero or negative size")
        mask_fn = None
        if has_seg:
            mask_fn = png_mask_fn(require_file(root / "SegmentationClass" / f"{img_id}.png", "mask"), len(index))
        return Record(
            id=img_id,
            image_path=image,
            label_path=xml if has_det else None,
            boxes=boxes,
            labels=labels,
            difficult=difficult,
            has_det=has_det,
            has_seg=has_seg,
            mask_fn=mask_fn,
            size=size,
        )
