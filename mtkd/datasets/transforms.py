"""Augmentation and letterboxing: one pipeline moves image, boxes and mask together.

Config (the ``data`` section)::

    imgsz: 160                     # square model input size, a multiple of 32 (default 640)
    augment: {hflip: 0.5, scale: [0.5, 1.5], translate: 0.1, color: 0.3}
    mean: [0.485, 0.456, 0.406]    # on 0..1 pixels (ImageNet defaults)
    std: [0.229, 0.224, 0.225]

``augment`` keys not given take the defaults shown; an unknown key is a
ConfigError naming ``data.augment.<key>``.

Train pipeline (albumentations 2.x, each step off when its value is 0/null):
  * ``hflip``: probability of ``HorizontalFlip``.
  * ``scale``: ``[lo, hi]`` zoom range of an ``Affine`` (aspect kept), with
    ``translate`` (fraction of the side, default 0.1) as its shift range;
    uncovered image pixels are filled with 114 grey and mask pixels with VOID.
  * ``color``: strength ``c`` of ``ColorJitter(brightness=c, contrast=c,
    saturation=c, hue=c/6)``.
  Boxes are ``pascal_voc`` with ``labels`` and ``difficult`` as label fields;
  a box with less than 20 % of its area left inside the image is dropped
  (``min_visibility=0.2``), the rest are clipped.

Then, always (train and eval), a deterministic letterbox to ``imgsz``:
``scale = imgsz / max(h, w)``, resize to ``round(w*scale) x round(h*scale)``
(linear for the image, nearest for the mask), pad centred (``pad_x =
(imgsz - new_w) // 2``; image 114 grey, mask VOID). Boxes map as
``inp = orig * scale + pad`` so ``orig = (inp - pad) / scale``; the item
records ``(scale, pad_x, pad_y)``. In training the mapping refers to the
augmented image; in evaluation, to the original one.

VOC ``difficult`` boxes are dropped from the items (they are neither targets
nor counted by :meth:`coco_gt`-based evaluation, where they are ``iscrowd=1``).
A sample without segmentation labels gets an all-VOID mask.

Seeding: albumentations ignores ``np.random.seed``; the pipeline is built with
``Compose(seed=seed)``. Once :meth:`Transform.set_epoch` has been called (the
trainer calls it through the dataset at the start of every epoch), the
pipeline is reseeded before the first sample that each process draws in that
epoch, from :func:`stream_seed` of ``(seed, epoch, rank, worker)`` (worker
``-1`` = the main process, ``workers=0``). The augmentations of an epoch
therefore depend only on those numbers, never on what earlier epochs drew, and
a resumed run replays exactly the augmentations of the uninterrupted one for
any worker count. Without ``set_epoch``, the main process keeps the stream of
``Compose(seed=seed)`` and a DataLoader worker reseeds once from ``seed +
torch.initial_seed()``.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import albumentations as A
import cv2
import numpy as np
import torch

from mtkd.errors import ConfigError
from mtkd.structures import VOID, Sample

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PAD_VALUE = 114
DEFAULT_AUGMENT: Dict[str, Any] = {"hflip": 0.5, "scale": [0.5, 1.5], "translate": 0.1, "color": 0.3}


def letterbox(
    image: np.ndarray, boxes: np.ndarray, mask: np.ndarray, size: int
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Tuple[float, int, int]]:
    """Resize the longer side to ``size`` and pad centred to ``size x size``.

    Returns ``(image, boxes, mask, (scale, pad_x, pad_y))``; see module docstring.
    """
    h, w = image.shape[:2]
    scale = size / max(h, w)
    nw, nh = min(size, max(1, round(w * scale))), min(size, max(1, round(h * scale)))
    pad_x, pad_y = (size - nw) // 2, (size - nh) // 2
    out_img = np.full((size, size, 3), PAD_VALUE, np.uint8)
    out_img[pad_y : pad_y + nh, pad_x : pad_x + nw] = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    out_mask = np.full((size, size), VOID, np.uint8)
    out_mask[pad_y : pad_y + nh, pad_x : pad_x + nw] = cv2.resize(mask, (nw, nh), interpolation=cv2.INTER_NEAREST)
    out_boxes = boxes.astype(np.float32) * scale + np.array([pad_x, pad_y, pad_x, pad_y], np.float32)
    return out_img, out_boxes, out_mask, (float(scale), pad_x, pad_y)


def unletterbox_boxes(boxes: torch.Tensor | np.ndarray, lb: Sequence[float]) -> torch.Tensor | np.ndarray:
    """Map xyxy boxes from input pixels back to original pixels: ``(inp - pad) / scale``."""
    scale, pad_x, pad_y = (float(v) for v in lb)
    offset = [pad_x, pad_y, pad_x, pad_y]
    if isinstance(boxes, torch.Tensor):
        return (boxes - boxes.new_tensor(offset)) / scale
    return (np.asarray(boxes, np.float32) - np.array(offset, np.float32)) / scale


def _augment_config(cfg: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    merged = dict(DEFAULT_AUGMENT)
    for key, value in (cfg or {}).items():
        if key not in DEFAULT_AUGMENT:
            raise ConfigError(f"data.augment.{key}: unknown augmentation (known: {', '.join(DEFAULT_AUGMENT)})")
        merged[key] = value
    for key in ("hflip", "translate", "color"):
        value = merged[key] or 0.0
        if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ConfigError(f"data.augment.{key}: must be a number in [0, 1], got {merged[key]!r}")
        merged[key] = float(value)
    scale = merged["scale"]
    if scale:
        ok = isinstance(scale, (list, tuple)) and len(scale) == 2 and all(isinstance(v, (int, float)) for v in scale)
        if not ok or not 0 < scale[0] <= scale[1]:
            raise ConfigError(f"data.augment.scale: must be [lo, hi] with 0 < lo <= hi, got {scale!r}")
    return merged


def build_albumentations(augment: Optional[Mapping[str, Any]], seed: Optional[int] = None) -> A.Compose:
    """The train-time albumentations Compose from an ``augment`` dict."""
    cfg = _augment_config(augment)
    steps = []
    if cfg["hflip"] > 0:
        steps.append(A.HorizontalFlip(p=cfg["hflip"]))
    if cfg["scale"]:
        t = cfg["translate"]
        steps.append(
            A.Affine(
                scale=tuple(float(v) for v in cfg["scale"]),
                translate_percent=(-t, t),
                keep_ratio=True,
                border_mode=cv2.BORDER_CONSTANT,
                fill=PAD_VALUE,
                fill_mask=VOID,
                p=1.0,
            )
        )
    if cfg["color"] > 0:
        c = cfg["color"]
        steps.append(A.ColorJitter(brightness=c, contrast=c, saturation=c, hue=c / 6, p=1.0))
    return A.Compose(
        steps,
        bbox_params=A.BboxParams(
            format="pascal_voc",
            label_fields=["labels", "difficult"],
            min_visibility=0.2,
            clip=True,
            filter_invalid_bboxes=True,
        ),
        seed=seed,
    )


def _vector(cfg: Mapping[str, Any], key: str, default: Sequence[float]) -> np.ndarray:
    value = cfg.get(key)
    value = default if value is None else value
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ConfigError(f"data.{key}: must be a list of 3 numbers, got {value!r}")
    arr = np.asarray(value, np.float32)
    if key == "std" and (arr <= 0).any():
        raise ConfigError(f"data.std: must be positive, got {value!r}")
    return arr


def stream_seed(seed: int, epoch: int, rank: int, worker: int) -> int:
    """A 32-bit seed that mixes ``(seed, epoch, rank, worker)``; ``worker`` -1 is the main process."""
    entropy = [seed % 2**63, epoch, rank, worker + 1]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


class Transform:
    """Sample -> item dict for :func:`mtkd.datasets.collate.collate`.

    Item keys: ``image`` float32 (3,S,S) normalised, ``boxes`` float32 (N,4)
    input pixels, ``labels`` int64 (N,), ``mask`` int64 (S,S), ``has_det``,
    ``has_seg``, ``id``, ``index``, ``orig_size`` (h, w), ``letterbox``
    (scale, pad_x, pad_y).
    """

    def __init__(
        self,
        imgsz: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: Optional[A.Compose],
        seed: Optional[int],
    ) -> None:
        self.imgsz = imgsz
        self.mean = np.asarray(mean, np.float32) * 255.0
        self.std = np.asarray(std, np.float32) * 255.0
        self.augment = augment
        self.seed = seed
        self.epoch: Optional[int] = None
        self.rank = 0
        self._stream: Optional[Tuple[Any, ...]] = None

    def set_epoch(self, epoch: int, rank: int = 0) -> None:
        """Draw the augmentations of ``epoch`` on process ``rank`` from their own stream (module doc)."""
        self.epoch, self.rank = int(epoch), int(rank)
        self._stream = None

    def _reseed(self) -> None:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else -1
        key = (self.epoch, self.rank, worker, os.getpid())
        if self.augment is None or self._stream == key:
            return
        if self.epoch is not None:
            self.augment.set_random_seed(stream_seed(self.seed or 0, self.epoch, self.rank, worker))
        elif info is not None:
            self.augment.set_random_seed(((self.seed or 0) + torch.initial_seed()) % 2**32)
        self._stream = key

    def __call__(self, sample: Sample) -> Dict[str, Any]:
        image, boxes, labels = sample.image, sample.boxes, sample.labels
        difficult = sample.difficult
        mask = sample.mask if sample.mask is not None else np.full(image.shape[:2], VOID, np.uint8)
        if self.augment is not None:
            self._reseed()
            out = self.augment(image=image, mask=mask, bboxes=boxes, labels=labels, difficult=difficult)
            image, mask = out["image"], out["mask"]
            boxes = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
            labels = np.asarray(out["labels"], np.int64).reshape(-1)
            difficult = np.asarray(out["difficult"], bool).reshape(-1)
        keep = ~difficult
        image, boxes, mask, lb = letterbox(image, boxes[keep], mask, self.imgsz)
        tensor = torch.from_numpy(((image.astype(np.float32) - self.mean) / self.std).transpose(2, 0, 1).copy())
        return {
            "image": tensor,
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(labels[keep].copy()),
            "mask": torch.from_numpy(mask.astype(np.int64)),
            "has_det": bool(sample.has_det),
            "has_seg": bool(sample.has_seg),
            "id": sample.id,
            "index": int(sample.index),
            "orig_size": tuple(sample.image.shape[:2]),
            "letterbox": lb,
        }


def build_transforms(data_cfg: Mapping[str, Any], train: bool, seed: Optional[int] = None) -> Transform:
    """The train (augment + letterbox) or eval (letterbox only) transform of a ``data`` config."""
    imgsz = data_cfg.get("imgsz", 640)
    if not isinstance(imgsz, int) or isinstance(imgsz, bool) or imgsz < 32 or imgsz % 32:
        raise ConfigError(f"data.imgsz: must be a positive multiple of 32, got {imgsz!r}")
    augment = data_cfg.get("augment")
    if augment is not None and not isinstance(augment, Mapping):
        raise ConfigError(f"data.augment: must be a mapping, got {augment!r}")
    pipeline = build_albumentations(augment, seed) if train else None
    if not train:
        _augment_config(augment)  # validate keys in eval-only runs too
    return Transform(imgsz, _vector(data_cfg, "mean", IMAGENET_MEAN), _vector(data_cfg, "std", IMAGENET_STD), pipeline, seed)
