"""Pieces every dataset format shares.

A format parser (VOC, COCO, YOLO) turns its label files into a list of
:class:`Record` at construction (cheap: no image is decoded), and a
:class:`RecordDataset` turns records into :class:`~mtkd.structures.Sample`
lazily and runs the transform on them. The format classes compose these two
things; they only differ in how they parse.

Conventions (all formats):
  * Boxes in a record are xyxy float32 in *original* image pixels, 0-based,
    with ``x2``/``y2`` the right/bottom pixel *edge* (a box covering pixel
    columns 3..5 is ``x1=3, x2=6``).
  * A box may overshoot the image by at most :data:`BOX_TOLERANCE` pixels and
    is then clipped; a larger overshoot, or a box with zero or negative size
    (after clipping), is a :class:`~mtkd.errors.DataError`.
  * Masks follow the :class:`~mtkd.structures.Sample` convention: ``0``
    background, ``k + 1`` class ``k``, :data:`~mtkd.structures.VOID` ignore.
    An index ``> nc`` (other than VOID) is a class-count mismatch.
  * Images are decoded upright and as 8-bit RGB (:func:`mtkd.imageio.to_rgb`:
    the EXIF orientation is applied), so label sizes and boxes refer to the
    image as a viewer shows it.
  * Images are checked for existence at construction and decoded lazily. With
    ``skip_bad=True`` a sample that turns out bad when it is loaded by
    ``__getitem__`` is replaced by the next good one (its ``index`` then names
    the sample actually returned), a warning names the file, and the file is
    appended to ``.skipped``. ``load_sample`` always raises.
    :meth:`RecordDataset.skipped_files` lists every file skipped so far, also
    by DataLoader worker processes (whose ``.skipped`` lists stay theirs): a
    shared-memory flag per record marks the bad ones.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from mtkd.errors import DataError
from mtkd.imageio import open_image, oriented_size, to_rgb
from mtkd.structures import VOID, Sample

#: Pixels a box may overshoot the image border before it is an error.
BOX_TOLERANCE = 1.0

#: Builds a mask of shape (h, w) for a record, or raises DataError.
MaskFn = Callable[[int, int], np.ndarray]


@dataclass
class Record:
    """Parsed labels of one image; the image itself is not decoded yet.

    ``size`` is the (h, w) the label file declares, or ``None`` when the
    format does not say (YOLO). ``crowd_boxes``/``crowd_labels`` are regions
    excluded from the detection targets but reported to COCO evaluation as
    ``iscrowd=1`` (COCO crowds). ``boxes_normalised`` marks YOLO boxes that
    are still in 0..1 units until the image size is known.
    """

    id: str
    image_path: Path
    label_path: Optional[Path]
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray
    has_det: bool
    has_seg: bool
    mask_fn: Optional[MaskFn] = None
    size: Optional[Tuple[int, int]] = None
    crowd_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    crowd_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    boxes_normalised: bool = False


def check_boxes(boxes: np.ndarray, h: int, w: int, source: Path | str) -> np.ndarray:
    """Validate xyxy pixel boxes against an (h, w) image; return them clipped.

    Raises DataError naming ``source`` for a box beyond :data:`BOX_TOLERANCE`
    outside the image or with zero/negative size.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if len(boxes) == 0:
        return boxes
    if not np.isfinite(boxes).all():
        raise DataError(f"{source}: non-finite box coordinates")
    lo = (boxes[:, 0] < -BOX_TOLERANCE) | (boxes[:, 1] < -BOX_TOLERANCE)
    hi = (boxes[:, 2] > w + BOX_TOLERANCE) | (boxes[:, 3] > h + BOX_TOLERANCE)
    if (lo | hi).any():
        b = boxes[np.argmax(lo | hi)].tolist()
        raise DataError(f"{source}: box {b} lies outside the {w}x{h} image")
    clipped = boxes.copy()
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, w)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, h)
    bad = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
    if bad.any():
        raise DataError(f"{source}: box {boxes[np.argmax(bad)].tolist()} has zero or negative size")
    return clipped


def check_labels(labels: np.ndarray, nc: int, source: Path | str) -> None:
    """Raise DataError naming ``source`` if a class index is outside ``0..nc-1``."""
    if len(labels) and (labels.min() < 0 or labels.max() >= nc):
        bad = int(labels[(labels < 0) | (labels >= nc)][0])
        raise DataError(f"{source}: class id {bad} is outside 0..{nc - 1} ({nc} classes configured)")


def read_image(path: Path) -> np.ndarray:
    """Decode an image file to upright HxWx3 uint8 RGB (:func:`mtkd.imageio.to_rgb`: EXIF
    orientation applied, 16-bit scaled); DataError naming it on failure
    (:func:`mtkd.imageio.open_image`: missing, not an image, corrupt)."""
    with open_image(path) as im:
        try:
            im.load()
            return np.asarray(to_rgb(im, path))
        except (OSError, ValueError, SyntaxError) as exc:
            raise DataError(f"{path}: corrupt or unreadable image ({exc})") from None


def image_size(path: Path) -> Tuple[int, int]:
    """(h, w) from the image header only (no decoding), EXIF orientation applied as :func:`read_image` does."""
    with open_image(path) as im:
        try:
            return oriented_size(im)
        except (OSError, ValueError, SyntaxError) as exc:
            raise DataError(f"{path}: corrupt or unreadable image ({exc})") from None


def read_index_mask(path: Path, h: int, w: int, nc: int) -> np.ndarray:
    """Read a palette ('P') or greyscale ('L') index PNG as an (h, w) uint8 mask.

    The stored index is the class value itself (palette index, not colour):
    ``0`` background, ``k + 1`` class ``k``, ``255`` void. The PNG is never
    converted to RGB. Raises DataError naming the file for a missing/corrupt
    file, an RGB mask, a size different from the image, or an index ``> nc``.
    """
    with open_image(path, "mask") as im:
        if im.mode not in ("P", "L"):
            raise DataError(f"{path}: mask must be a palette ('P') or 'L' PNG of class indices, got mode {im.mode}")
        try:
            mask = np.array(im, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError) as exc:
            raise DataError(f"{path}: corrupt or unreadable mask ({exc})") from None
    if mask.shape != (h, w):
        raise DataError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but the image is {w}x{h}")
    check_mask_values(mask, nc, path)
    return mask


def check_mask_values(mask: np.ndarray, nc: int, source: Path | str) -> None:
    """Raise DataError if ``mask`` holds an index in ``nc+1..254``."""
    values = np.unique(mask)
    bad = values[(values > nc) & (values != VOID)]
    if len(bad):
        raise DataError(f"{source}: mask index {int(bad[0])} exceeds the {nc} configured classes")


def png_mask_fn(path: Path, nc: int) -> MaskFn:
    """A :data:`MaskFn` reading an index PNG (picklable for DataLoader workers)."""
    return _PngMask(path, nc)


@dataclass(frozen=True)
class _PngMask:
    path: Path
    nc: int

    def __call__(self, h: int, w: int) -> np.ndarray:
        return read_index_mask(self.path, h, w, self.nc)


def require_file(path: Path, what: str) -> Path:
    """Return ``path`` if it is a file, else raise DataError naming it."""
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    return path


class RecordDataset:
    """Lazy samples over parsed records plus a transform (shared by all formats).

    ``transform`` maps a :class:`Sample` to the item dict that
    :func:`mtkd.datasets.collate.collate` stacks; ``None`` makes
    ``__getitem__`` return the raw Sample. ``source`` (the split or
    annotation file) names the dataset in errors; ``skipped`` lists the files
    of samples skipped so far (at construction and while loading) in this
    process, :meth:`skipped_files` in every process.
    """

    def __init__(
        self,
        records: List[Record],
        classes: Sequence[str],
        transform: Optional[Callable[[Sample], Dict[str, Any]]],
        skip_bad: bool,
        skipped: List[str],
        source: Path | str,
    ) -> None:
        self.records = records
        self.classes = list(classes)
        self.transform = transform
        self.skip_bad = skip_bad
        self.skipped = skipped
        self.source = source
        if not records:
            raise DataError(f"{source}: the split has no usable images")
        self._skipped_at_build = list(skipped)
        # one flag per record, set by whichever process finds it bad (shared with DataLoader workers)
        self._bad = torch.zeros(len(records), dtype=torch.bool).share_memory_()

    def skipped_files(self) -> List[str]:
        """Files of the samples skipped so far, at construction or while loading in any process (sorted)."""
        flagged = torch.nonzero(self._bad).flatten().tolist()
        return sorted(set(self._skipped_at_build) | {str(self.records[i].image_path) for i in flagged})

    def _mark_bad(self, i: int) -> None:
        self._bad[i] = True
        if str(self.records[i].image_path) not in self.skipped:
            self.skipped.append(str(self.records[i].image_path))

    @property
    def num_classes(self) -> int:
        """Number of detection classes (background excluded)."""
        return len(self.classes)

    @property
    def seg_classes(self) -> List[str]:
        """Segmentation classes: ``"background"`` then the detection classes."""
        return ["background", *self.classes]

    def __len__(self) -> int:
        return len(self.records)

    def enable_cache(self) -> None:
        """Keep every decoded sample in memory after its first load (``data.cache: true``).

        Decoding (image, mask, label checks) then happens once per process;
        the transform still runs on every access. With DataLoader workers each
        worker holds its own cache, so it pays off with ``train.workers: 0``
        or persistent workers.
        """
        self._cache: Dict[int, Sample] = {}

    def load_sample(self, i: int) -> Sample:
        """Sample ``i`` in original pixels, untransformed (raises DataError if bad)."""
        cache = getattr(self, "_cache", None)
        if cache is not None:
            if i not in cache:
                cache[i] = self._decode(i)
            return cache[i]
        return self._decode(i)

    def _decode(self, i: int) -> Sample:
        rec = self.records[i]
        image = read_image(rec.image_path)
        h, w = image.shape[:2]
        if rec.size is not None and rec.size != (h, w):
            raise DataError(
                f"{rec.label_path}: declares a {rec.size[1]}x{rec.size[0]} image but "
                f"{rec.image_path.name} is {w}x{h}"
            )
        boxes = rec.boxes
        if rec.boxes_normalised:
            boxes = boxes * np.array([w, h, w, h], dtype=np.float32)
        boxes = check_boxes(boxes, h, w, rec.label_path or rec.image_path)
        mask = rec.mask_fn(h, w) if (rec.has_seg and rec.mask_fn is not None) else None
        return Sample(
            image=image,
            boxes=boxes,
            labels=rec.labels,
            mask=mask,
            has_det=rec.has_det,
            has_seg=mask is not None,
            id=rec.id,
            difficult=rec.difficult,
            index=i,
        )

    def __getitem__(self, i: int) -> Any:
        n = len(self.records)
        for attempt in range(n):
            j = (i + attempt) % n
            try:
                sample = self.load_sample(j)
            except DataError as exc:
                if not self.skip_bad:
                    raise
                warnings.warn(f"skipping bad sample: {exc}", stacklevel=2)
                self._mark_bad(j)
                continue
            return sample if self.transform is None else self.transform(sample)
        raise DataError(f"{self.source}: every sample of the split is bad")

    def set_epoch(self, epoch: int, rank: int = 0) -> None:
        """Pass the epoch (and DDP rank) on to the transform, which seeds its augmentations from it."""
        set_epoch = getattr(self.transform, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch, rank)

    def image_hw(self, i: int) -> Tuple[int, int]:
        """(h, w) of image ``i`` from the labels or, failing that, the header."""
        rec = self.records[i]
        if rec.size is None:
            rec.size = image_size(rec.image_path)
        return rec.size

    def coco_gt(self) -> Dict[str, Any]:
        """COCO-format detection ground truth in original pixels.

        Only samples with ``has_det`` are listed. Image id = dataset index,
        category id = class index + 1, ``bbox`` xywh. Conventions: VOC
        ``difficult`` boxes and COCO crowd regions are written with
        ``iscrowd=1``, which COCOeval treats as "ignore" (a detection matching
        one is neither a true nor a false positive); every other box has
        ``iscrowd=0``. ``area`` is the box area (masks are not evaluated here).
        With ``skip_bad`` an image whose labels turn out bad is left out.
        """
        images, anns = [], []
        for i, rec in enumerate(self.records):
            if not rec.has_det:
                continue
            try:
                h, w = self.image_hw(i)
                boxes = rec.boxes * (np.array([w, h, w, h], np.float32) if rec.boxes_normalised else 1.0)
                boxes = check_boxes(boxes, h, w, rec.label_path or rec.image_path)
            except DataError as exc:
                if not self.skip_bad:
                    raise
                warnings.warn(f"skipping bad sample in coco_gt: {exc}", stacklevel=2)
                self._mark_bad(i)
                continue
            images.append({"id": i, "width": int(w), "height": int(h), "file_name": rec.image_path.name})
            entries = [(b, l, bool(d)) for b, l, d in zip(boxes, rec.labels, rec.difficult)]
            entries += [(b, l, True) for b, l in zip(rec.crowd_boxes, rec.crowd_labels)]
            for box, label, ignore in entries:
                x1, y1, x2, y2 = (float(v) for v in box)
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": i,
                        "category_id": int(label) + 1,
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": (x2 - x1) * (y2 - y1),
                        "iscrowd": int(ignore),
                    }
                )
        cats = [{"id": k + 1, "name": name} for k, name in enumerate(self.classes)]
        return {"images": images, "annotations": anns, "categories": cats}
