"""AFD: attention feature distillation.

Wang et al., "Pay Attention to Features, Transfer Learn Faster CNNs",
ICLR 2020, https://openreview.net/pdf?id=ryxyCeHtPB

Reference (AberHu/Knowledge-Distillation-Zoo ``kd_losses/afd.py``), which
keeps only the distillation half of AFDS and replaces the paper's attention
with an SE-style block, ``AFD(in_channels, att_f)(fm_s, fm_t, eps=1e-6)``:

* attention on the teacher: global average pool -> 1x1 conv (bias) -> ReLU ->
  1x1 conv (bias), ``in -> int(in * att_f) -> in``, kaiming-normal (fan_out)
  weights, zero biases; ``rho = sigmoid(.)`` normalised to sum 1 over channels;
* each channel of both maps divided by its spatial L2 norm (+ eps);
* loss: ``sum_c rho_c * mean_hw (s - t)^2``, averaged over the batch.

Student and teacher maps must have the same width (the reference's networks
do); the adapter maps the student to the teacher's width with the shared 1x1
conv adapter (and resizes it to the teacher's spatial size) when they differ.
The attention's parameters are submodules of the loss, so they are trained
by the student's optimizer, as in the reference.

Fixed defect: the reference squeezes the (B, C, 1, 1) attention with
``.squeeze()``, which drops the batch dimension at batch size 1 and then
fails; here it is flattened to (B, C).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtkd.errors import ConfigError
from mtkd.losses._common import need_teacher
from mtkd.losses.base import Loss, register
from mtkd.losses.zoo._adapt import FeaturePairs, mean_of


class AFD(nn.Module):
    """Tensor core: teacher-attention-weighted distance of spatially normalised maps."""

    def __init__(self, in_channels: int, att_f: float):
        super().__init__()
        mid_channels = int(in_channels * att_f)
        self.attention = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 1, 1, 0, bias=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, in_channels, 1, 1, 0, bias=True),
        )
        for m in self.attention:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, fm_s: torch.Tensor, fm_t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        rho = torch.sigmoid(self.attention(F.adaptive_avg_pool2d(fm_t, 1)).flatten(1))
        rho = rho / rho.sum(dim=1, keepdim=True)
        fm_s = fm_s / (torch.norm(fm_s, dim=(2, 3), keepdim=True) + eps)
        fm_t = fm_t / (torch.norm(fm_t, dim=(2, 3), keepdim=True) + eps)
        return (rho * (fm_s - fm_t).pow(2).mean(dim=(2, 3))).sum(1).mean(0)


@register("afd")
class AFDLoss(Loss):
    """Adapter: one :class:`AFD` per feature in ``feats`` (default ``p3, p4,
    p5`` dense, ``f1..f4`` classifiers), made on the first call from the
    teacher's width, averaged; ``att_f`` defaults to the reference's 1.0."""

    requires = frozenset({"teacher"})

    def __init__(self, feats: Optional[Sequence[str]] = None, att_f: float = 1.0):
        super().__init__()
        self.att_f = float(att_f)
        self.pairs = FeaturePairs("afd", feats, adapt=True, resize=True)
        self.cores = nn.ModuleDict()

    def _core(self, name: str, ft: torch.Tensor) -> AFD:
        c = ft.shape[1]
        if name not in self.cores:
            if int(c * self.att_f) < 1:
                raise ConfigError(f"loss 'afd': att_f: {self.att_f} x {c} channels leaves no mid channels")
            self.cores[name] = AFD(c, self.att_f).to(device=ft.device)
        core = self.cores[name]
        if core.attention[0].in_channels != c:
            raise ConfigError(f"loss 'afd': feats: {name!r} changed width "
                              f"({core.attention[0].in_channels} expected, got {c})")
        return core

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> torch.Tensor:
        teacher_out = need_teacher("afd", teacher_out)
        names = self.pairs.names(student_out)
        pairs = self.pairs(student_out, teacher_out)
        return mean_of([self._core(n, ft)(fs, ft) for n, (fs, ft) in zip(names, pairs)])
