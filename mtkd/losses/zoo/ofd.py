"""OFD: a comprehensive overhaul of feature distillation.

Heo et al., "A Comprehensive Overhaul of Feature Distillation", ICCV 2019,
http://openaccess.thecvf.com/content_ICCV_2019/papers/Heo_A_Comprehensive_Overhaul_of_Feature_Distillation_ICCV_2019_paper.pdf

Reference (AberHu/Knowledge-Distillation-Zoo ``kd_losses/ofd.py``),
``OFD(in_channels, out_channels)(fm_s, fm_t)``:

* connector: 1x1 conv (no bias, kaiming-normal fan_out init) + BatchNorm
  (weight 1, bias 0) from the student's width to the teacher's;
* margin: per teacher channel, the mean of the teacher's negative responses
  over batch and space (``sum(fm_t * [fm_t < 0]) / (count + 1e-6)``), computed
  from the current batch; the target is ``max(fm_t, margin)``;
* partial L2: ``mean((s - t)^2 * mask)`` over every element, where
  ``mask = 0`` where the student is at or below a non-positive target
  (``s <= t <= 0``) and 1 elsewhere.

The reference distils pre-ReLU maps; the adapter distils the named feature
maps as the model outputs them (the neck's maps are SiLU outputs, which still
have negative responses). The student map is resized to the teacher's spatial
size before the connector when they differ. The loss averages over ``feats``.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from mtkd.errors import ConfigError
from mtkd.losses._common import need_teacher
from mtkd.losses.base import Loss, register
from mtkd.losses.zoo._adapt import FeaturePairs, mean_of


def ofd_margin(fm_t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(1, C, 1, 1): mean of each channel's negative teacher responses."""
    neg = (fm_t < 0.0).to(fm_t.dtype)
    return (fm_t * neg).sum(dim=(0, 2, 3), keepdim=True) / (neg.sum(dim=(0, 2, 3), keepdim=True) + eps)


def ofd_distance(fm_s: torch.Tensor, fm_t: torch.Tensor) -> torch.Tensor:
    """Partial L2 between connected student map ``fm_s`` and teacher map ``fm_t``
    (margin applied here)."""
    target = torch.max(fm_t, ofd_margin(fm_t))
    mask = 1.0 - ((fm_s <= target) & (target <= 0.0)).to(fm_s.dtype)
    return torch.mean((fm_s - target) ** 2 * mask)


class OFD(nn.Module):
    """Tensor core: connector (1x1 conv + BN) then the margin partial L2."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.connector = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        nn.init.kaiming_normal_(self.connector[0].weight, mode="fan_out", nonlinearity="relu")
        nn.init.ones_(self.connector[1].weight)
        nn.init.zeros_(self.connector[1].bias)

    def forward(self, fm_s: torch.Tensor, fm_t: torch.Tensor) -> torch.Tensor:
        return ofd_distance(self.connector(fm_s), fm_t)


@register("ofd")
class OFDLoss(Loss):
    """Adapter: one :class:`OFD` per feature name, made on the first call (the
    trainer's dry forward) from the observed widths, averaged over ``feats``
    (default ``p3, p4, p5`` dense, ``f1..f4`` classifiers)."""

    requires = frozenset({"teacher"})

    def __init__(self, feats: Optional[Sequence[str]] = None):
        super().__init__()
        self.pairs = FeaturePairs("ofd", feats, adapt=False, resize=True)
        self.cores = nn.ModuleDict()

    def _core(self, name: str, fs: torch.Tensor, ft: torch.Tensor) -> OFD:
        if name not in self.cores:
            self.cores[name] = OFD(fs.shape[1], ft.shape[1]).to(device=fs.device)
        conv = self.cores[name].connector[0]
        if (conv.in_channels, conv.out_channels) != (fs.shape[1], ft.shape[1]):
            raise ConfigError(f"loss 'ofd': feats: {name!r} changed width ({conv.in_channels}->"
                              f"{conv.out_channels} expected, got {fs.shape[1]}->{ft.shape[1]})")
        return self.cores[name]

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> torch.Tensor:
        teacher_out = need_teacher("ofd", teacher_out)
        names = self.pairs.names(student_out)
        pairs = self.pairs(student_out, teacher_out)
        return mean_of([self._core(n, fs, ft)(fs, ft) for n, (fs, ft) in zip(names, pairs)])
