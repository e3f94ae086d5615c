"""CE: the hard classification loss, cross-entropy on the labels.

The baseline every KD paper adds its term to (e.g. Hinton et al. 2014,
https://arxiv.org/pdf/1503.02531.pdf, Eq. of the "hard targets"); used as the
``hard`` term of classification runs: ``F.cross_entropy(out["logits"],
batch["labels"])``, the mean over the batch.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

from mtkd.errors import ConfigError
from mtkd.losses.base import Loss, register
from mtkd.losses.zoo._adapt import get_output


@register("ce")
class CELoss(Loss):
    """Cross-entropy of ``out["logits"]`` (B,C) against ``batch["labels"]``
    (B,) int64 class indices; ``label_smoothing`` as in ``F.cross_entropy``.
    Needs no teacher."""

    requires = frozenset()

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"loss 'ce': label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> torch.Tensor:
        logits = get_output(student_out, "logits", "ce")
        labels = batch.get("labels")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
            raise ConfigError("loss 'ce': needs batch['labels'] as a (B,) class-index tensor "
                              "(a classification batch)")
        return F.cross_entropy(logits, labels.to(logits.device), label_smoothing=self.label_smoothing)
