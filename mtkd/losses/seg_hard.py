"""Pixel cross-entropy (the hard segmentation loss), with an optional Dice term.

* ``ce``: cross-entropy of ``student_out["seg"]`` (B, K, H, W) logits against
  ``batch["masks"]`` (B, H, W), ignoring :data:`~mtkd.structures.VOID`
  pixels, averaged over the labelled pixels of the batch (FCN, Long et al.
  2015).
* ``dice``: ``1 - mean_k`` soft Dice (Milletari et al., V-Net, 2016) over the
  classes present in the labelled pixels, on softmax probabilities; added
  only when its weight ``dice > 0`` (default 0).

Samples with ``has_seg=False`` are excluded (their whole mask is treated as
void here, whatever the collate put there). With no labelled pixel in the
batch the loss is a graph-connected zero.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

from mtkd.errors import DataError
from mtkd.losses.base import Loss, register
from mtkd.structures import VOID


@register("seg_ce")
class SegCELoss(Loss):
    """``forward(student_out, teacher_out, batch) -> {"ce"[, "dice"]}``."""

    def __init__(self, dice: float = 0.0):
        super().__init__()
        self.dice = float(dice)

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        logits: torch.Tensor = student_out["seg"]
        k = logits.shape[1]
        masks = batch["masks"].to(device=logits.device, dtype=torch.long)
        has_seg = torch.as_tensor(batch["has_seg"], dtype=torch.bool, device=logits.device).reshape(-1)
        masks = torch.where(has_seg[:, None, None], masks, torch.full_like(masks, VOID))
        labelled = masks != VOID
        zero = 0.0 * logits.sum()
        out: Dict[str, torch.Tensor] = {}
        if not bool(labelled.any()):
            out["ce"] = zero
            if self.dice > 0:
                out["dice"] = zero
            return out
        lo, hi = torch.where(labelled, masks, 0).aminmax()  # no boolean indexing: it copies
        if int(hi) >= k or int(lo) < 0:
            raise DataError(f"batch['masks']: label outside 0..{k - 1} (and {VOID} = void)")
        out["ce"] = F.cross_entropy(logits, masks, ignore_index=VOID)
        if self.dice > 0:
            out["dice"] = self.dice * self._dice(logits, masks, labelled)
        return out

    @staticmethod
    def _dice(logits: torch.Tensor, masks: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
        k = logits.shape[1]
        w = labelled.unsqueeze(1).float()                                   # (B,1,H,W)
        prob = logits.float().softmax(1) * w
        onehot = F.one_hot(masks.clamp(max=k - 1) * labelled, k).permute(0, 3, 1, 2).float() * w
        inter = (prob * onehot).sum((0, 2, 3))
        denom = prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
        present = onehot.sum((0, 2, 3)) > 0
        dice = (2 * inter + 1.0) / (denom + 1.0)
        return 1.0 - dice[present].mean()
