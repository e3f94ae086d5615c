"""Plumbing every loss family shares: the teacher check, the width adapters and the multi-task KD pair.

* :func:`need_teacher`: ``teacher_out``, or a one-line ConfigError when a KD
  loss runs without a teacher.
* :func:`sub_loss` and :func:`seg_det_terms`: the ``seg_kd`` / ``det_kd``
  pair that ``adv_kd`` and ``mixup_kd`` apply to a second half of the batch
  with ``output: multitask``.
* :class:`FeatureAdapters`: per-feature 1x1 convolutions that map student
  maps to the teacher's width (the distillation core's adapters and, without
  bias, the zoo's :class:`~mtkd.losses.zoo._adapt.FeaturePairs`).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from mtkd.errors import ConfigError


def need_teacher(loss: str, teacher_out: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Return ``teacher_out`` or fail clearly when a KD loss runs without one."""
    if teacher_out is None:
        raise ConfigError(f"loss {loss}: needs a teacher but none is configured (set 'teacher:')")
    return teacher_out


def sub_loss(loss: str, key: str, spec: Optional[Mapping[str, Any]],
             default: Dict[str, Any]) -> Tuple[nn.Module, float]:
    """``(module, weight)`` of the ``key`` term of ``loss`` (e.g. ``adv_kd.seg_kd``): ``spec`` is
    ``{name, weight, **options}`` of a registered distillation loss; unset keys come from ``default``
    (its options only when the name is kept)."""
    from mtkd.losses.base import build_loss

    if spec is None:
        spec = {}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"loss {loss}.{key}: expected a mapping {{name, weight, options}}, got "
                          f"{type(spec).__name__}")
    spec = dict(spec)
    name = spec.pop("name", default["name"])
    weight = float(spec.pop("weight", 1.0))
    if weight < 0:
        raise ConfigError(f"loss {loss}.{key}.weight: must be >= 0, got {weight}")
    opts = {k: v for k, v in default.items() if k != "name"} if name == default["name"] else {}
    opts.update(spec)
    return build_loss(name, f"loss {loss}.{key}", **opts), weight


def seg_det_terms(pairs: Sequence[Tuple[str, nn.Module, float]], student_out: Dict[str, Any],
                  teacher_out: Dict[str, Any], batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """``{task: weight * loss}`` for each ``(task, loss, weight)`` of ``pairs`` (``"seg"``, ``"det"``)
    whose weight is positive and whose output both models have; a dict-valued loss is summed."""
    out: Dict[str, torch.Tensor] = {}
    for task, loss, weight in pairs:
        if weight <= 0 or student_out.get(task) is None or teacher_out.get(task) is None:
            continue
        v = loss(student_out, teacher_out, batch)
        out[task] = weight * (sum(v.values()) if isinstance(v, dict) else v)
    return out


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
