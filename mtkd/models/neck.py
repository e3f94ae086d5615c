"""PAN neck (FPN top-down + bottom-up path) from Ultralytics blocks.

The layout is YOLOv8's neck (Ultralytics ``Conv``/``C2f``) over the backbone
maps at strides 8/16/32, with two choices of mtkd's own:

* each backbone map first goes through a 1x1 ``Conv`` to the level width, so
  the neck's cost does not depend on the backbone's (often 512-2048) widths;
* level widths follow YOLOv8's ratios: ``p3 = c``, ``p4 = 2c``, ``p5 = 4c``
  for ``channels = c``; ``depth`` is the number of bottlenecks per ``C2f``.

Top-down upsampling resizes to the exact size of the finer map, so inputs
whose side is not a multiple of 32 still work.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from ultralytics.nn.modules import C2f, Conv


class PAN(nn.Module):
    """``forward([c3, c4, c5]) -> [p3, p4, p5]``; ``.channels`` gives their widths."""

    def __init__(self, in_channels: Sequence[int], channels: int = 64, depth: int = 1):
        super().__init__()
        c3, c4, c5 = (int(c) for c in in_channels)
        w3, w4, w5 = channels, 2 * channels, 4 * channels
        self.channels: Tuple[int, int, int] = (w3, w4, w5)
        self.lat3 = Conv(c3, w3, 1)
        self.lat4 = Conv(c4, w4, 1)
        self.lat5 = Conv(c5, w5, 1)
        self.td4 = C2f(w5 + w4, w4, depth)   # top-down, stride 16
        self.td3 = C2f(w4 + w3, w3, depth)   # top-down, stride 8 -> p3
        self.down3 = Conv(w3, w3, 3, 2)
        self.bu4 = C2f(w3 + w4, w4, depth)   # bottom-up, stride 16 -> p4
        self.down4 = Conv(w4, w4, 3, 2)
        self.bu5 = C2f(w4 + w5, w5, depth)   # bottom-up, stride 32 -> p5

    @staticmethod
    def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=like.shape[-2:], mode="nearest")

    def forward(self, feats: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        c3, c4, c5 = feats
        c3, c4, c5 = self.lat3(c3), self.lat4(c4), self.lat5(c5)
        t4 = self.td4(torch.cat([self._up(c5, c4), c4], 1))
        p3 = self.td3(torch.cat([self._up(t4, c3), c3], 1))
        p4 = self.bu4(torch.cat([self.down3(p3), t4], 1))
        p5 = self.bu5(torch.cat([self.down4(p4), c5], 1))
        return [p3, p4, p5]
