"""Logits: regression of the student's logits onto the teacher's.

Ba & Caruana, "Do Deep Nets Really Need to be Deep?", NeurIPS 2014,
http://papers.nips.cc/paper/5484-do-deep-nets-really-need-to-be-deep.pdf

Reference (AberHu/Knowledge-Distillation-Zoo ``kd_losses/logits.py``):
``Logits()(out_s, out_t) = F.mse_loss(out_s, out_t)``, i.e. the mean of the
squared differences over every element (batch x classes).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mtkd.losses._common import need_teacher
from mtkd.losses.base import Loss, register
from mtkd.losses.zoo._adapt import logit_pair, zero_like_graph


class Logits(nn.Module):
    """Tensor core: ``mean((out_s - out_t) ** 2)`` over all elements."""

    def forward(self, out_s: torch.Tensor, out_t: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out_s, out_t)


@register("logits")
class LogitsLoss(Loss):
    """Adapter: :class:`Logits` on ``out[output]``.

    ``output="logits"`` for classifiers; ``output="seg"`` compares segmentation
    logits per pixel ((B,K,H,W) -> (B*H*W, K)); ``ignore_void=True`` drops
    pixels whose ``batch["masks"]`` is VOID (255) first, so the mean is over
    labelled pixels (0 when none is labelled).

    The option is named ``output`` (not ``key``) because
    :func:`mtkd.losses.base.build_loss` reserves ``key`` for the config path.
    """

    requires = frozenset({"teacher"})

    def __init__(self, output: str = "logits", ignore_void: bool = False):
        super().__init__()
        self.output = output
        self.ignore_void = ignore_void
        self.core = Logits()

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> torch.Tensor:
        teacher_out = need_teacher("logits", teacher_out)
        ls, lt = logit_pair(student_out, teacher_out, batch, self.output, self.ignore_void, "logits")
        if ls.numel() == 0:
            return zero_like_graph(student_out[self.output])
        return self.core(ls, lt)
