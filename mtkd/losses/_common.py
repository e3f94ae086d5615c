"""Plumbing every loss family shares: the teacher check and the width adapters.

* :func:`need_teacher`: ``teacher_out``, or a one-line ConfigError when a KD
  loss runs without a teacher.
* :class:`FeatureAdapters`: per-feature 1x1 convolutions that map student
  maps to the teacher's width (the distillation core's adapters and, without
  bias, the zoo's :class:`~mtkd.losses.zoo._adapt.FeaturePairs`).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Optional

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from mtkd.errors import ConfigError


def need_teacher(loss: str, teacher_out: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Return ``teacher_out`` or fail clearly when a KD loss runs without one."""
    if teacher_out is None:
        raise ConfigError(f"loss {loss}: needs a teacher but none is configured (set 'teacher:')")
    return teacher_out


class FeatureAdapters(nn.Module):
    """1x1 convolutions mapping student features to the teacher's width.

    One ``nn.LazyConv2d(teacher_channels, 1, bias=bias)`` per feature name,
    made either by :meth:`build` (from the models' ``feat_channels``, called
    by a loss's ``bind``) or at the first call that needs it (the trainer's
    dry forward, before the optimizer is built), on the student map's
    device. With ``always`` every name gets one (a learned projection, as
    feat_gan needs); otherwise only names whose widths differ. With
    ``identity`` every name gets an ``nn.Conv2d`` made with its weights at
    once (PyTorch's default init, drawn when it is made), and those between
    equal widths start as the identity map, so the distillation term starts
    at the raw maps' value. The adapters are ordinary submodules
    (``self.convs[name]``), so they join the student's optimizer; lazy
    parameters are materialised in place, so an optimizer built after
    ``bind`` but before the first forward still updates them. A map whose
    width differs from the one its adapter was made for is a ConfigError
    naming the loss and the feature.
    """

    def __init__(self, loss: str, always: bool = False, bias: bool = True, identity: bool = False) -> None:
        super().__init__()
        self.loss, self.always, self.bias, self.identity = loss, always or identity, bias, identity
        self.convs = nn.ModuleDict()

    def _make(self, name: str, student: int, teacher: int, device: Optional[torch.device]) -> None:
        if name in self.convs or not (self.always or student != teacher):
            return
        if not self.identity:
            self.convs[name] = nn.LazyConv2d(teacher, kernel_size=1, bias=self.bias, device=device)
            return
        conv = nn.Conv2d(student, teacher, kernel_size=1, bias=self.bias, device=device)
        if student == teacher:
            with torch.no_grad():
                conv.weight.copy_(torch.eye(student, device=conv.weight.device).view(student, student, 1, 1))
                if conv.bias is not None:
                    conv.bias.zero_()
        self.convs[name] = conv

    def build(self, names: Iterable[str], student: Mapping[str, int], teacher: Mapping[str, int],
              device: Optional[torch.device] = None) -> None:
        """Create the adapters for ``names``; unknown names raise a ConfigError."""
        for name in names:
            for who, chans in (("student", student), ("teacher", teacher)):
                if name not in chans:
                    raise ConfigError(f"loss {self.loss}.feats: the {who} has no feature {name!r}; "
                                      f"available: {sorted(chans)}")
            self._make(name, student[name], teacher[name], device)

    def to_teacher(self, name: str, x: torch.Tensor, teacher_channels: int) -> torch.Tensor:
        """Student map ``x`` of feature ``name`` mapped to ``teacher_channels`` (as is without an adapter)."""
        self._make(name, x.shape[1], teacher_channels, x.device)
        if name not in self.convs:
            return x
        conv = self.convs[name]
        if not is_lazy(conv.weight):  # made (or loaded from a state dict) for these widths
            c_out, c_in = conv.weight.shape[:2]
            if (c_in, c_out) != (x.shape[1], teacher_channels):
                raise ConfigError(f"loss {self.loss!r}: feats: {name!r} changed width ({c_in}->{c_out} expected, "
                                  f"got {x.shape[1]}->{teacher_channels})")
        return conv(x)

    forward = to_teacher
