"""The multi-task model: backbone -> PAN neck -> detection and/or seg head.

A plain composition (smp's encoder -> decoder -> head split); nothing about
distillation lives here. Distillation losses read ``out["feats"]`` and size
their adapters from :attr:`MultiTaskModel.feat_channels`.

Output dict (:data:`mtkd.structures.OUTPUT_KEYS`)::

    {"det": DetOutput, "seg": (B, nc+1, H, W) logits,
     "feats": {"c2", "c3", "c4", "c5"  (backbone, strides 4..32),
               "p3", "p4", "p5"        (neck, strides 8..32)}}

``det``/``seg`` are absent when that head is.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from mtkd.heads.det import DetHead
from mtkd.heads.seg import SegHead
from mtkd.models.backbone import Backbone
from mtkd.models.neck import PAN


class MultiTaskModel(nn.Module):
    """``forward(images) -> {"det", "seg", "feats"}``; at least one head is required."""

    strides = (8, 16, 32)

    def __init__(self, backbone: Backbone, neck: PAN, det_head: Optional[DetHead] = None,
                 seg_head: Optional[SegHead] = None):
        super().__init__()
        if det_head is None and seg_head is None:
            raise ValueError("MultiTaskModel needs a detection head, a segmentation head or both")
        if det_head is not None and seg_head is not None and det_head.nc != seg_head.num_classes:
            raise ValueError(f"det head has {det_head.nc} classes, seg head {seg_head.num_classes}")
        self.backbone = backbone
        self.neck = neck
        self.det_head = det_head
        self.seg_head = seg_head
        self.num_classes: int = det_head.nc if det_head is not None else seg_head.num_classes
        names = ("c2", "c3", "c4", "c5", "p3", "p4", "p5")
        self.feat_channels: Dict[str, int] = dict(zip(names, tuple(backbone.channels) + tuple(neck.channels)))
        #: the ``model:`` config it was built from, resolved (set by ``mtkd.models.build_model``)
        self.arch: Optional[Dict[str, Any]] = None
        #: how it was pruned, when it was (see ``mtkd.models.restore``)
        self.pruning: Optional[Dict[str, Any]] = None

    def forward(self, images: torch.Tensor) -> Dict[str, Any]:
        c2, c3, c4, c5 = self.backbone(images)
        p3, p4, p5 = self.neck([c3, c4, c5])
        out: Dict[str, Any] = {"feats": {"c2": c2, "c3": c3, "c4": c4, "c5": c5, "p3": p3, "p4": p4, "p5": p5}}
        if self.det_head is not None:
            out["det"] = self.det_head([p3, p4, p5])
        if self.seg_head is not None:
            out["seg"] = self.seg_head([p3, p4, p5], images.shape[-2:], c2=c2 if self.seg_head.use_c2 else None)
        return out
