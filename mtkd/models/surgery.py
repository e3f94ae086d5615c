"""Structure-preserving rewrites and width bookkeeping for pruned models.

* :class:`C2fSplit` is Ultralytics' ``C2f`` with its first 1x1 conv split in
  two (``cv0`` gives the first half of the channels, ``cv1`` the second)
  instead of one conv whose output is ``chunk``-ed: Torch-Pruning's
  dependency graph cannot follow ``chunk`` (its index mapping fails), but it
  follows two convs and a ``cat``. :func:`split_c2f` swaps every ``C2f`` of
  a model for one, with the weights copied, so the outputs are unchanged
  (Torch-Pruning's own YOLOv8 example does the same). With
  ``subclasses=True`` it also swaps the ``C2f`` subclasses that keep its
  forward (``C3k2``). :func:`merge_c2f` turns each back into its original
  class, its ``cv1`` the two halves' convs stacked, once both halves have
  the same width. Ultralytics' per-layer bookkeeping (``i f type np``) goes
  along both ways, so a ``DetectionModel`` still runs.
* :func:`refresh_widths` rewrites the width attributes that pruning leaves
  stale (``Backbone.channels``, ``PAN.channels``,
  ``MultiTaskModel.feat_channels``) from one probe forward, so distillation
  losses size their adapters from the real widths.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn

from mtkd.errors import MtkdError

#: Name of the rewrite recorded in a pruned checkpoint (see :mod:`mtkd.models.restore`).
C2F_SPLIT = "c2f_split"

#: Input side of :func:`refresh_widths`' probe forward (a multiple of 32).
_PROBE = 64

#: Attributes Ultralytics' ``parse_model`` sets on each layer of a ``DetectionModel``.
_LAYER_ATTRS = ("i", "f", "type", "np")


def _copy_layer_attrs(src: nn.Module, dst: nn.Module) -> None:
    for key in _LAYER_ATTRS:
        if key in src.__dict__:
            setattr(dst, key, src.__dict__[key])


def _copy_bn(src: nn.BatchNorm2d, dst: nn.BatchNorm2d, rows: slice) -> None:
    """``dst`` := the ``rows`` entries of ``src`` (affine, running stats, eps, momentum)."""
    dst.weight.data.copy_(src.weight.data[rows])
    dst.bias.data.copy_(src.bias.data[rows])
    dst.running_mean.data.copy_(src.running_mean.data[rows])
    dst.running_var.data.copy_(src.running_var.data[rows])
    dst.num_batches_tracked.data.copy_(src.num_batches_tracked.data)
    dst.eps, dst.momentum = src.eps, src.momentum


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
            _copy_bn(cv1.bn, dst.bn, half)
            dst.act = cv1.act
        self.cv2 = c2f.cv2
        self.m = c2f.m
        self.source = type(c2f)  # what merge_c2f turns it back into
        _copy_layer_attrs(c2f, self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv0(x), self.cv1(x)]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


def split_c2f(model: nn.Module, subclasses: bool = False) -> List[str]:
    """Replace every Ultralytics ``C2f`` inside ``model`` by a :class:`C2fSplit` (in place).

    Returns the names of the replaced modules. Subclasses of ``C2f`` are
    replaced only with ``subclasses`` and only those that keep ``C2f``'s
    forward (``C3k2``: other inner blocks, the same chunked ``cv1``).
    """
    from ultralytics.nn.modules import C2f

    def splittable(m: nn.Module) -> bool:
        return type(m) is C2f or (subclasses and isinstance(m, C2f) and type(m).forward is C2f.forward)

    replaced = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if splittable(child):
                setattr(module, child_name, C2fSplit(child).to(child.cv1.conv.weight.device).train(child.training))
                replaced.append(f"{name}.{child_name}" if name else child_name)
    return replaced


def merge_c2f(model: nn.Module) -> List[str]:
    """Turn every :class:`C2fSplit` inside ``model`` back into its original class (in place).

    The merged ``cv1`` is one conv whose output channels are ``cv0``'s then
    ``cv1``'s, and ``c`` their common width, so the outputs are unchanged.
    Returns the names of the merged modules; two halves of different widths
    (which ``chunk(2)`` cannot split back) are an MtkdError naming the module.
    """
    from ultralytics.nn.modules import Conv

    merged = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, C2fSplit):
                continue
            full = f"{name}.{child_name}" if name else child_name
            a, b = child.cv0, child.cv1
            c, c_b = a.conv.out_channels, b.conv.out_channels
            if c != c_b:
                raise MtkdError(f"{full}: the halves of its first conv kept {c} and {c_b} channels; a "
                                f"{child.source.__name__} needs two equal halves")
            w = a.conv.weight
            cv1 = Conv(a.conv.in_channels, 2 * c, 1, 1).to(device=w.device, dtype=w.dtype)
            cv1.conv.weight.data.copy_(torch.cat([a.conv.weight.data, b.conv.weight.data]))
            for src, rows in ((a.bn, slice(0, c)), (b.bn, slice(c, 2 * c))):
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(cv1.bn, key).data[rows] = getattr(src, key).data
            cv1.bn.num_batches_tracked.data.copy_(a.bn.num_batches_tracked.data)
            cv1.bn.eps, cv1.bn.momentum, cv1.act = a.bn.eps, a.bn.momentum, a.act
            block = child.source.__new__(child.source)
            nn.Module.__init__(block)
            block.c, block.cv1, block.cv2, block.m = c, cv1, child.cv2, child.m
            _copy_layer_attrs(child, block)
            setattr(module, child_name, block.train(child.training))
            merged.append(full)
    return merged


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
