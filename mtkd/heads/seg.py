"""Semantic segmentation head over the neck, smp FPN-decoder style.

Built from segmentation_models_pytorch's FPN decoder blocks: each neck level
(p3/p4/p5) goes through a ``SegmentationBlock`` (3x3 conv + GroupNorm(32) +
ReLU, upsampling x2 per step) to a common stride, the levels are summed
(``MergeBlock("add")``), dropped out, projected by a 1x1 conv to ``nc + 1``
logits (channel 0 = background) and bilinearly resized to the input size.

With ``use_c2=True`` the stride-4 backbone map joins as in smp's FPN: an
``FPNBlock`` adds its 1x1 projection to the upsampled p3, and everything is
fused at stride 4 instead of 8 (sharper masks, more compute); the input
side must then be a multiple of 8 so that c2 is exactly twice p3.

``channels`` must be a multiple of 32 (smp's blocks use GroupNorm(32)).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from segmentation_models_pytorch.decoders.fpn.decoder import FPNBlock, MergeBlock, SegmentationBlock
from torch import nn

from mtkd.heads.resize import resize_bilinear


class SegHead(nn.Module):
    """``forward([p3, p4, p5], size, c2=None) -> (B, nc+1, *size)`` logits."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 64,
                 c2_channels: Optional[int] = None, dropout: float = 0.1):
        super().__init__()
        if channels % 32:
            raise ValueError(f"SegHead: channels must be a multiple of 32, got {channels}")
        self.num_classes = int(num_classes)
        self.use_c2 = c2_channels is not None
        extra = 1 if self.use_c2 else 0  # one more x2 step when fusing at stride 4
        c3 = in_channels[0]
        self.c2_block = FPNBlock(c3, c2_channels) if self.use_c2 else None
        levels = list(in_channels) + ([c3] if self.use_c2 else [])
        ups = [extra + i for i in range(len(in_channels))] + ([0] if self.use_c2 else [])
        self.blocks = nn.ModuleList(SegmentationBlock(c, channels, n_upsamples=n) for c, n in zip(levels, ups))
        self.merge = MergeBlock("add")
        self.dropout = nn.Dropout2d(p=dropout)
        self.classifier = nn.Conv2d(channels, self.num_classes + 1, 1)

    def forward(self, feats: Sequence[torch.Tensor], size: Sequence[int],
                c2: Optional[torch.Tensor] = None) -> torch.Tensor:
        maps = list(feats)
        if self.c2_block is not None:
            if c2 is None:
                raise ValueError("SegHead built with c2_channels needs the stride-4 map c2")
            maps.append(self.c2_block(maps[0], c2))
        outs = [blk(m) for blk, m in zip(self.blocks, maps)]
        target = outs[-1].shape[-2:]
        outs = [resize_bilinear(o, target) for o in outs]
        x = self.dropout(self.merge(outs))
        return resize_bilinear(self.classifier(x), size)
