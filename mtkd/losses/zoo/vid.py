"""VID: variational information distillation.

Ahn et al., "Variational Information Distillation for Knowledge Transfer",
CVPR 2019, https://zpascal.net/cvpr2019/Ahn_Variational_Information_Distillation_for_Knowledge_Transfer_CVPR_2019_paper.pdf

Reference (AberHu/Knowledge-Distillation-Zoo ``kd_losses/vid.py``, after
RepDistiller), ``VID(in_channels, mid_channels, out_channels, init_var, eps=1e-6)(fm_s, fm_t)``:

* mean regressor: 1x1 conv (no bias) -> ReLU -> 1x1 conv -> ReLU -> 1x1 conv,
  in -> mid -> mid -> out channels, kaiming-normal (fan_out) init;
* trainable per-channel variance ``var = log(1 + exp(alpha)) + eps`` with
  ``alpha`` initialised to ``log(exp(init_var - eps) - 1)`` so that
  ``var = init_var`` at the start;
* loss: the Gaussian negative log-likelihood without its constant,
  ``mean(0.5 * (log var + (mu(fm_s) - fm_t)^2 / var))`` over every element.

The adapter makes one VID per feature name on the first call (the trainer's
dry forward) with ``in`` = student width, ``out`` = teacher width and
``mid = int(sf * out)`` (reference defaults ``sf=1.0, init_var=5.0``), resizes
the student map to the teacher's spatial size when they differ, and averages
over ``feats``. The regressors and ``alpha`` are parameters of the loss and so
reach the student's optimizer.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from mtkd.errors import ConfigError
from mtkd.losses._common import need_teacher
from mtkd.losses.base import Loss, register
from mtkd.losses.zoo._adapt import FeaturePairs, mean_of


def _conv1x1(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=1, padding=0, bias=False)


class VID(nn.Module):
    """Tensor core: Gaussian NLL of the teacher map under a regressed mean and
    a trainable per-channel variance."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, init_var: float,
                 eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.regressor = nn.Sequential(
            _conv1x1(in_channels, mid_channels), nn.ReLU(),
            _conv1x1(mid_channels, mid_channels), nn.ReLU(),
            _conv1x1(mid_channels, out_channels),
        )
        self.alpha = nn.Parameter(math.log(math.exp(init_var - eps) - 1.0) * torch.ones(out_channels))
        for m in self.regressor:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def variance(self) -> torch.Tensor:
        """(1, C, 1, 1) predicted variance."""
        return (torch.log(1.0 + torch.exp(self.alpha)) + self.eps).view(1, -1, 1, 1)

    def forward(self, fm_s: torch.Tensor, fm_t: torch.Tensor) -> torch.Tensor:
        mean = self.regressor(fm_s)
        var = self.variance()
        return torch.mean(0.5 * (torch.log(var) + (mean - fm_t) ** 2 / var))


@register("vid")
class VIDLoss(Loss):
    """Adapter: one :class:`VID` per feature in ``feats`` (default ``p3, p4,
    p5`` dense, ``f1..f4`` classifiers), averaged."""

    requires = frozenset({"teacher"})

    def __init__(self, feats: Optional[Sequence[str]] = None, sf: float = 1.0, init_var: float = 5.0,
                 eps: float = 1e-6):
        super().__init__()
        if init_var <= eps:
            raise ConfigError(f"loss 'vid': init_var: must exceed eps={eps}, got {init_var}")
        self.sf = float(sf)
        self.init_var = float(init_var)
        self.eps = float(eps)
        self.pairs = FeaturePairs("vid", feats, adapt=False, resize=True)
        self.cores = nn.ModuleDict()

    def _core(self, name: str, fs: torch.Tensor, ft: torch.Tensor) -> VID:
        cs, ct = fs.shape[1], ft.shape[1]
        if name not in self.cores:
            mid = int(self.sf * ct)
            if mid < 1:
                raise ConfigError(f"loss 'vid': sf: {self.sf} x {ct} channels leaves no mid channels")
            self.cores[name] = VID(cs, mid, ct, self.init_var, self.eps).to(device=fs.device)
        core = self.cores[name]
        first, last = core.regressor[0], core.regressor[-1]
        if (first.in_channels, last.out_channels) != (cs, ct):
            raise ConfigError(f"loss 'vid': feats: {name!r} changed width ({first.in_channels}->"
                              f"{last.out_channels} expected, got {cs}->{ct})")
        return core

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> torch.Tensor:
        teacher_out = need_teacher("vid", teacher_out)
        names = self.pairs.names(student_out)
        pairs = self.pairs(student_out, teacher_out)
        return mean_of([self._core(n, fs, ft)(fs, ft) for n, (fs, ft) in zip(names, pairs)])
