"""Structure-preserving rewrites and width bookkeeping for pruned models.

* :class:`C2fSplit` is Ultralytics' ``C2f`` with its first 1x1 conv split in
  two (``cv0`` gives the first half of the channels, ``cv1`` the second)
  instead of one conv whose output is ``chunk``-ed: Torch-Pruning's
  dependency graph cannot follow ``chunk`` (its index mapping fails), but it
  follows two convs and a ``cat``. :func:`split_c2f` swaps every ``C2f`` of
  a model for one, with the weights copied, so the outputs are unchanged
  (Torch-Pruning's own YOLOv8 example does the same).
* :func:`refresh_widths` rewrites the width attributes that pruning leaves
  stale (``Backbone.channels``, ``PAN.channels``,
  ``MultiTaskModel.feat_channels``) from one probe forward, so distillation
  losses size their adapters from the real widths.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn

#: Name of the rewrite recorded in a pruned checkpoint (see :mod:`mtkd.models.restore`).
C2F_SPLIT = "c2f_split"

#: Input side of :func:`refresh_widths`' probe forward (a multiple of 32).
_PROBE = 64


class C2fSplit(nn.Module):
    """``C2f`` computed as ``cv2(cat([cv0(x), cv1(x), m1(..), ...]))``; see the module doc."""

    def __init__(self, c2f: nn.Module):
        super().__init__()
        from ultralytics.nn.modules import Conv

        cv1 = c2f.cv1
        c = cv1.conv.out_channels // 2
        c1 = cv1.conv.in_channels
        self.cv0 = Conv(c1, c, 1, 1)
        self.cv1 = Conv(c1, c, 1, 1)
        for half, dst in ((slice(0, c), self.cv0), (slice(c, 2 * c), self.cv1)):
            dst.conv.weight.data.copy_(cv1.conv.weight.data[half])
            dst.bn.weight.data.copy_(cv1.bn.weight.data[half])
            dst.bn.bias.data.copy_(cv1.bn.bias.data[half])
            dst.bn.running_mean.data.copy_(cv1.bn.running_mean.data[half])
            dst.bn.running_var.data.copy_(cv1.bn.running_var.data[half])
            dst.bn.num_batches_tracked.data.copy_(cv1.bn.num_batches_tracked.data)
            dst.bn.eps, dst.bn.momentum = cv1.bn.eps, cv1.bn.momentum
            dst.act = cv1.act
        self.cv2 = c2f.cv2
        self.m = c2f.m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv0(x), self.cv1(x)]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


def split_c2f(model: nn.Module) -> List[str]:
    """Replace every Ultralytics ``C2f`` inside ``model`` by a :class:`C2fSplit` (in place).

    Returns the names of the replaced modules. Subclasses of ``C2f``
    (``C3k2`` and friends) are left alone: their forward differs.
    """
    from ultralytics.nn.modules import C2f

    replaced = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is C2f:
                setattr(module, child_name, C2fSplit(child).to(child.cv1.conv.weight.device).train(child.training))
                replaced.append(f"{name}.{child_name}" if name else child_name)
    return replaced


def refresh_widths(model: nn.Module) -> None:
    """Reset a :class:`~mtkd.models.multitask.MultiTaskModel`'s width attributes from a probe forward."""
    from mtkd.models.backbone import PlainCNN
    from mtkd.models.multitask import MultiTaskModel

    if not isinstance(model, MultiTaskModel):
        return
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, 3, _PROBE, _PROBE, device=device))
    finally:
        model.train(was_training)
    widths = {name: int(f.shape[1]) for name, f in out["feats"].items()}
    model.feat_channels = widths
    model.backbone.channels = tuple(widths[k] for k in ("c2", "c3", "c4", "c5"))
    model.neck.channels = tuple(widths[k] for k in ("p3", "p4", "p5"))
    if isinstance(model.backbone.body, PlainCNN):
        model.backbone.body.channels = model.backbone.channels
