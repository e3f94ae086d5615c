"""The data structures everything else plugs into.

Three contracts live here and nowhere else:

1. :class:`Sample` - what every dataset (VOC, COCO, YOLO, synthetic) yields.
2. The batch dict - what ``mtkd.datasets.collate`` builds from samples
   (keys listed in :data:`BATCH_KEYS`).
3. :class:`DetOutput` - the canonical per-anchor detection format that every
   detection head (mtkd's own, Ultralytics' ``Detect`` through an adapter)
   produces, and that every detection loss and decoder consumes.

The model-output dict is ``{"det": DetOutput, "seg": Tensor[B,K,H,W] logits at
input resolution, "feats": {name: Tensor}}``; see :data:`OUTPUT_KEYS`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

#: Value of a mask pixel that carries no label (VOC's border, crowd regions,
#: and every pixel of a sample without segmentation labels).
VOID = 255


@dataclass
class Sample:
    """One image with whatever labels it has.

    Conventions:
      * ``image``: HxWx3 uint8 RGB, original size.
      * ``boxes``: (N, 4) float32, xyxy in pixels of ``image``.
      * ``labels``: (N,) int64 detection class indices ``0..nc-1``.
      * ``mask``: HxW uint8 semantic mask, ``0`` = background,
        ``k + 1`` = detection class ``k``, :data:`VOID` = ignore. ``None`` when
        the sample has no segmentation labels.
      * ``has_det`` / ``has_seg``: which task's labels this sample carries. A
        sample missing one task is flagged, never dropped.
      * ``difficult``: (N,) bool, VOC's difficult flag (False elsewhere).
    """

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    mask: Optional[np.ndarray]
    has_det: bool
    has_seg: bool
    id: str
    difficult: Optional[np.ndarray] = None
    index: int = -1

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if self.difficult is None:
            self.difficult = np.zeros(len(self.labels), dtype=bool)
        else:
            self.difficult = np.asarray(self.difficult, dtype=bool).reshape(-1)

    @property
    def size(self) -> tuple:
        return tuple(self.image.shape[:2])


#: Keys of a collated batch (a plain dict so DDP, pin_memory and losses that
#: declare the fields they need all work without custom classes).
BATCH_KEYS = {
    "images": "float32 (B,3,H,W), normalised, letterboxed to the model size",
    "boxes": "list of B float32 (Ni,4) xyxy in *input* (letterboxed) pixels",
    "labels": "list of B int64 (Ni,)",
    "masks": "int64 (B,H,W) in input pixels; VOID where unlabelled",
    "has_det": "bool (B,)",
    "has_seg": "bool (B,)",
    "ids": "list of B str",
    "index": "int64 (B,) dataset indices (memory-bank losses such as CRD)",
    "orig_sizes": "int64 (B,2) original (h, w)",
    "letterbox": "float32 (B,3): (scale, pad_x, pad_y) to map back to original pixels",
}

#: Keys of a model's output dict.
OUTPUT_KEYS = {
    "det": "DetOutput (canonical per-anchor detection format)",
    "seg": "float (B,K,H,W) logits at input resolution, K = nc + 1 (background)",
    "feats": "dict name -> feature map; neck levels are 'p3','p4','p5'",
}


@dataclass
class DetOutput:
    """Canonical per-anchor detection output.

    ``A`` is the number of anchor points over all levels (strides 8/16/32,
    level-major, row-major inside a level, as Ultralytics' ``make_anchors``).

    * ``cls``: (B, A, nc) class logits.
    * ``obj``: (B, A) objectness logit. Heads without one (Ultralytics
      v8/11/26 ``Detect``) use the max class logit as the stand-in
      (``obj_is_proxy=True``), so ``sigmoid(obj)`` is the best class score.
    * ``box``: (B, A, 4) left/top/right/bottom distances from the anchor
      point, in units of that anchor's stride.
    * ``box_dist``: (B, A, 4, reg_max) box-distribution logits where the head
      has DFL, else ``None``.
    * ``anchors``: (A, 2) anchor-point centres in stride units (x, y).
    * ``strides``: (A, 1) stride of each anchor point, in pixels.
    * ``levels``: per-level raw maps ``[{"box", "obj", "cls"}]`` (B,C,H,W)
      for losses that want spatial maps.
    """

    cls: torch.Tensor
    obj: torch.Tensor
    box: torch.Tensor
    anchors: torch.Tensor
    strides: torch.Tensor
    box_dist: Optional[torch.Tensor] = None
    obj_is_proxy: bool = False
    levels: List[Dict[str, torch.Tensor]] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return self.cls.shape[-1]

    def boxes_xyxy(self) -> torch.Tensor:
        """(B, A, 4) boxes in input pixels."""
        lt, rb = self.box[..., :2], self.box[..., 2:]
        xy1 = self.anchors - lt
        xy2 = self.anchors + rb
        return torch.cat([xy1, xy2], -1) * self.strides

    def scores(self) -> torch.Tensor:
        """(B, A, nc) detection confidence per class."""
        if self.obj_is_proxy:
            return self.cls.sigmoid()
        return self.cls.sigmoid() * self.obj.sigmoid().unsqueeze(-1)

    def detach(self) -> "DetOutput":
        return DetOutput(
            cls=self.cls.detach(),
            obj=self.obj.detach(),
            box=self.box.detach(),
            anchors=self.anchors,
            strides=self.strides,
            box_dist=None if self.box_dist is None else self.box_dist.detach(),
            obj_is_proxy=self.obj_is_proxy,
            levels=[{k: v.detach() for k, v in lv.items()} for lv in self.levels],
        )
