"""Classification metrics: top-1 / top-k accuracy in percent and the mean cross-entropy."""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F


class TopK:
    """Running ``top1``, ``top5`` (top-k with k = min(5, classes)) in percent and mean cross-entropy ``loss``.

    ``update`` takes (B, C) logits and (B,) class indices; ``compute`` needs at least one sample.
    """

    def __init__(self, num_classes: int):
        self.k = min(5, int(num_classes))
        self.n = self.top1 = self.topk = 0
        self.loss = 0.0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits = logits.float()
        self.loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        hits = logits.topk(self.k, dim=1).indices == labels[:, None]
        self.top1 += int(hits[:, 0].sum())
        self.topk += int(hits.any(dim=1).sum())
        self.n += len(labels)

    def compute(self) -> Dict[str, float]:
        if self.n == 0:
            raise ValueError("TopK.compute: no samples")
        return {"top1": 100.0 * self.top1 / self.n, "top5": 100.0 * self.topk / self.n, "loss": self.loss / self.n}
