"""ST: soft targets (the original knowledge distillation).

Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network",
NIPS 2014 Deep Learning Workshop, https://arxiv.org/pdf/1503.02531.pdf

Reference (AberHu/Knowledge-Distillation-Zoo ``kd_losses/st.py``)::

    SoftTarget(T)(out_s, out_t) =
        KL(softmax(out_t / T) || softmax(out_s / T)), reduction 'batchmean', * T * T

i.e. the KL summed over classes and rows, divided by the number of rows, and
scaled by T^2 so gradients keep their magnitude across temperatures. Default
``T=4`` as in the reference's train script.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from mtkd.losses._common import need_teacher
from mtkd.losses._functional import soft_kl
from mtkd.losses.base import Loss, register
from mtkd.losses.zoo._adapt import logit_pair, zero_like_graph


class SoftTarget(nn.Module):
    """Tensor core: batchmean KL(p_t || p_s) at temperature ``T``, times ``T**2``.

    ``out_s``, ``out_t``: (N, C) logits; classes along dim 1.
    """

    def __init__(self, T: float):
        super().__init__()
        self.T = float(T)

    def forward(self, out_s: torch.Tensor, out_t: torch.Tensor) -> torch.Tensor:
        return soft_kl(out_s, out_t, self.T, reduction="batchmean") * self.T * self.T


ST = SoftTarget


@register("st")
class STLoss(Loss):
    """Adapter: :class:`SoftTarget` on ``out[output]``.

    ``output="logits"`` for classifiers; ``output="seg"`` distils segmentation
    logits per pixel ((B,K,H,W) -> (B*H*W, K), so 'batchmean' divides by the
    number of pixels); ``ignore_void=True`` drops VOID pixels of
    ``batch["masks"]`` first (0 when none is labelled).

    The option is named ``output`` (not ``key``) because
    :func:`mtkd.losses.base.build_loss` reserves ``key`` for the config path.
    """

    requires = frozenset({"teacher"})

    def __init__(self, T: float = 4.0, output: str = "logits", ignore_void: bool = False):
        super().__init__()
        self.output = output
        self.ignore_void = ignore_void
        self.core = SoftTarget(T)

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> torch.Tensor:
        teacher_out = need_teacher("st", teacher_out)
        ls, lt = logit_pair(student_out, teacher_out, batch, self.output, self.ignore_void, "st")
        if ls.shape[0] == 0:
            return zero_like_graph(student_out[self.output])
        return self.core(ls, lt)
