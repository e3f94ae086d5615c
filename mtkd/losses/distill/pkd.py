"""Pearson-correlation feature distillation (PKD) for dense prediction."""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtkd.errors import ConfigError
from mtkd.losses._common import FeatureAdapters, need_teacher
from mtkd.losses._functional import resize_to
from mtkd.losses.base import Loss, register
from mtkd.losses.distill.common import dense_maps, model_device, widths

EPS = 1e-6


def standardise(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """(B,C,H,W) -> float32 map with each (sample, channel) at zero mean and
    unit variance over (H, W): ``(x - mean) / (std + eps)``, ``std`` the
    population standard deviation (divided by H*W, so a 1x1 map gives 0,
    not NaN)."""
    x = x.float()
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True, correction=0)
    return (x - mean) / (std + eps)


def pearson_mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``mean((standardise(s) - standardise(t))^2) / 2`` over (B,C,H,W) maps
    of equal shape, in float32; equals the mean over (b, c) of ``1 - r_bc``
    with ``r_bc`` the Pearson correlation of the two maps (up to ``eps``)."""
    return F.mse_loss(standardise(s), standardise(t)) / 2


@register("pkd")
class PKD(Loss):
    """Feature imitation via the Pearson correlation coefficient.

    Cao et al., "PKD: General Distillation Framework for Object Detectors
    via Pearson Correlation Coefficient" (NeurIPS 2022): normalise student and teacher maps to zero mean and unit
    variance, then take the MSE between them, which is ``1 - r`` of the
    Pearson correlation ``r``. The result ignores the teacher's feature
    magnitude: it is invariant to a per-channel positive affine rescaling of
    either side (``a_c * t + b_c``, ``a_c > 0``).

    Per level (:func:`pearson_mse`, in float32 whatever the AMP dtype)::

        z(x)[b,c] = (x[b,c] - mean_hw x[b,c]) / (std_hw x[b,c] + 1e-6)
        level     = F.mse_loss(z(s), z(t)) / 2          # mean over B*C*H*W
        loss      = mean over levels

    ``std_hw`` is the population standard deviation over the H*W positions
    of one sample's channel. MMRazor's ``PKDLoss`` (the reference code)
    differs in three ways: it normalises each channel over (N, H, W) jointly
    (batch statistics; here each sample on its own, so a sample's loss does
    not depend on the rest of the batch), uses the unbiased std (a factor
    ``(n-1)/n`` on the loss) and sums the levels (here averaged: multiply
    ``weight`` by the level count to match).

    * ``feats``: feature names (default the neck levels) when ``key`` is
      ``None``. Where the student width differs from the teacher's, a 1x1
      ``LazyConv2d`` adapter (as in ``cwd``: built by :meth:`bind` or at the
      first forward, trained with the student) maps the student map to the
      teacher's width; equal widths are compared directly.
    * ``key: "seg"``: apply it to the segmentation logits (class counts must
      match), every pixel included.
    * A teacher map of another spatial size is bilinearly resized to the
      student's. Teacher maps are detached.
    """

    requires = frozenset({"teacher"})

    def __init__(self, feats: Sequence[str] = ("p3", "p4", "p5"), key: Optional[str] = None):
        super().__init__()
        if key not in (None, "seg"):
            raise ConfigError(f"loss pkd.key: expected 'seg' (logits) or none (features), got {key!r}")
        if key is None and (isinstance(feats, str) or not feats):
            raise ConfigError("loss pkd.feats: expected a non-empty list of feature names")
        self.key = key
        self.feats: List[str] = [] if key else [str(f) for f in feats]
        self.adapters = FeatureAdapters("pkd", always=False)

    def bind(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        if teacher is None or self.key is not None:
            return
        self.adapters.build(self.feats, widths(student, "student", "pkd"),
                            widths(teacher, "teacher", "pkd"), model_device(student))

    def student_parameters(self) -> Iterable[nn.Parameter]:
        return self.adapters.parameters()

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> torch.Tensor:
        teacher_out = need_teacher("pkd", teacher_out)
        terms = [pearson_mse(s, resize_to(t.float(), tuple(s.shape[-2:])))
                 for s, t in dense_maps("pkd", self.key, student_out, teacher_out, self.feats, self.adapters)]
        return torch.stack(terms).mean()
