"""YOLO-style decoupled, anchor-free detection head with objectness.

Why not Ultralytics' ``Detect``: it has no objectness branch (v8/11/26 score
boxes by class logits alone), while mtkd's multi-task distillation (the
YOLO-style objectness/box/class terms) needs one. The head is otherwise
YOLOv8's: per level a box tower and a class tower of two 3x3 Ultralytics
``Conv`` each; the objectness logit is a 1x1 conv on the box tower (YOLOX's
placement, since objectness is a localisation-quality signal).

Box regression: ``reg_max > 1`` predicts a distribution over ``reg_max`` bins
per side (DFL, Generalized Focal Loss, Li et al. 2020), decoded by
Ultralytics' ``DFL`` into its expectation; ``reg_max == 1`` predicts the four
ltrb distances directly (as Ultralytics does for ``reg_max=1``), without any
activation, and ``box_dist`` is then ``None``.

Bias priors:

* box: 2.0 on every output, as Ultralytics' ``Detect.bias_init``;
* class: YOLOv8's ``log(5 / nc / (prior_imgsz / stride)^2)``, since the
  class branch is trained on every anchor (v8-style), not only on objects;
* objectness: YOLOv5's ``log(8 / (prior_imgsz / stride)^2)`` (about 8
  objects per ``prior_imgsz`` image); ``prior_imgsz`` defaults to 640.

The output is :class:`mtkd.structures.DetOutput`, anchors and strides from
Ultralytics' ``make_anchors`` (stride units, level-major), always float32
(anchors made in bf16 lose the .5 offsets beyond 128 cells).
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn
from ultralytics.nn.modules import DFL, Conv
from ultralytics.utils.tal import make_anchors

from mtkd.structures import DetOutput


def _tower(c_in: int, c_mid: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(Conv(c_in, c_mid, 3), Conv(c_mid, c_mid, 3), nn.Conv2d(c_mid, c_out, 1))


class DetHead(nn.Module):
    """Decoupled head over ``[p3, p4, p5]`` at ``strides`` -> :class:`DetOutput`.

    ``levels[i]`` holds the raw maps ``box`` (B, 4*reg_max, H, W), ``obj``
    (B, 1, H, W) and ``cls`` (B, nc, H, W).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 64,
                 reg_max: int = 16, strides: Sequence[int] = (8, 16, 32), prior_imgsz: int = 640):
        super().__init__()
        if len(in_channels) != len(strides):
            raise ValueError(f"DetHead: {len(in_channels)} input levels for {len(strides)} strides")
        self.nc = int(num_classes)
        self.reg_max = int(reg_max)
        self.strides: Tuple[int, ...] = tuple(int(s) for s in strides)
        self.box_tower = nn.ModuleList(
            nn.Sequential(Conv(c, channels, 3), Conv(channels, channels, 3)) for c in in_channels)
        self.box_pred = nn.ModuleList(nn.Conv2d(channels, 4 * self.reg_max, 1) for _ in in_channels)
        self.obj_pred = nn.ModuleList(nn.Conv2d(channels, 1, 1) for _ in in_channels)
        self.cls_branch = nn.ModuleList(_tower(c, channels, self.nc) for c in in_channels)
        self.dfl = DFL(self.reg_max) if self.reg_max > 1 else nn.Identity()
        self._init_bias(prior_imgsz)

    def _init_bias(self, imgsz: int) -> None:
        for s, box, obj, cls in zip(self.strides, self.box_pred, self.obj_pred, self.cls_branch):
            cells = (imgsz / s) ** 2
            nn.init.constant_(box.bias, 2.0)
            nn.init.constant_(obj.bias, math.log(8 / cells))
            nn.init.constant_(cls[-1].bias, math.log(5 / self.nc / cells))

    def forward(self, feats: Sequence[torch.Tensor]) -> DetOutput:
        levels: List[Dict[str, torch.Tensor]] = []
        for i, x in enumerate(feats):
            t = self.box_tower[i](x)
            levels.append({"box": self.box_pred[i](t), "obj": self.obj_pred[i](t), "cls": self.cls_branch[i](x)})
        b = feats[0].shape[0]
        box = torch.cat([lv["box"].flatten(2) for lv in levels], 2)              # (B, 4R, A)
        obj = torch.cat([lv["obj"].flatten(2) for lv in levels], 2)[:, 0]        # (B, A)
        cls = torch.cat([lv["cls"].flatten(2) for lv in levels], 2).transpose(1, 2)  # (B, A, nc)
        # Anchors from the level sizes in float32, so they stay exact under autocast.
        sizes = torch.tensor([f.shape[-2:] for f in feats], dtype=torch.float32, device=feats[0].device)
        anchors, stride_t = make_anchors(sizes, self.strides, 0.5)
        ltrb = self.dfl(box).transpose(1, 2)                                    # (B, A, 4)
        dist = box.transpose(1, 2).reshape(b, -1, 4, self.reg_max) if self.reg_max > 1 else None
        return DetOutput(cls=cls, obj=obj, box=ltrb, anchors=anchors, strides=stride_t,
                         box_dist=dist, obj_is_proxy=False, levels=levels)
