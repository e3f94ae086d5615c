"""Helpers shared by the distillation losses: input checks, the seg validity
mask and feature pairing (the teacher check and the 1x1 width adapters are
:mod:`mtkd.losses._common`'s, resizing is :mod:`mtkd.losses._functional`'s).

Conventions (apply to every loss in this package):

* Teacher outputs are always detached inside a loss, so no gradient ever
  reaches the teacher, whatever the trainer's ``no_grad`` policy.
* A mismatch between student and teacher (class count, anchor grid, feature
  width without an adapter) raises a one-line :class:`ConfigError` naming
  the loss and both values.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mtkd.errors import ConfigError
from mtkd.losses._common import FeatureAdapters
from mtkd.structures import VOID


def output_entry(out: Dict[str, Any], key: str, who: str, loss: str) -> Any:
    """``out[key]`` or a ConfigError naming the missing output."""
    if key not in out or out[key] is None:
        raise ConfigError(f"loss {loss}: the {who} output has no {key!r} entry")
    return out[key]


def feature(out: Dict[str, Any], name: str, who: str, loss: str) -> torch.Tensor:
    """``out["feats"][name]`` or a ConfigError listing the available names."""
    feats = out.get("feats") or {}
    if name not in feats:
        raise ConfigError(f"loss {loss}.feats: the {who} has no feature {name!r}; "
                          f"available: {sorted(feats)}")
    return feats[name]


def check_classes(loss: str, student: int, teacher: int) -> None:
    if student != teacher:
        raise ConfigError(f"loss {loss}: teacher has {teacher} classes but the student has {student}")


def letterbox_content(batch: Mapping[str, Any], size: Tuple[int, int]) -> Optional[torch.Tensor]:
    """(B,H,W) bool: pixels of the letterboxed input that show the image.

    ``batch["letterbox"][b] = (scale, pad_x, pad_y)`` maps input pixels to
    original ones as ``orig = (input - pad) / scale``. Input pixel column ``c``
    (centre ``c + 0.5``) is content when ``pad_x <= c + 0.5 < pad_x + w *
    scale`` with ``w = orig_sizes[b, 1]``; rows likewise with ``pad_y`` and
    ``h``. Returns ``None`` when the batch lacks ``letterbox`` or
    ``orig_sizes`` (then no pixel is treated as padding).
    """
    lb, orig = batch.get("letterbox"), batch.get("orig_sizes")
    if lb is None or orig is None:
        return None
    lb = torch.as_tensor(lb).detach().float().cpu()
    orig = torch.as_tensor(orig).detach().float().cpu()
    h, w = size
    scale, pad_x, pad_y = lb[:, 0:1], lb[:, 1:2], lb[:, 2:3]
    cols = torch.arange(w, dtype=torch.float32) + 0.5
    rows = torch.arange(h, dtype=torch.float32) + 0.5
    in_x = (cols >= pad_x) & (cols < pad_x + orig[:, 1:2] * scale)  # (B, W)
    in_y = (rows >= pad_y) & (rows < pad_y + orig[:, 0:1] * scale)  # (B, H)
    return in_y[:, :, None] & in_x[:, None, :]


def seg_valid_mask(batch: Mapping[str, Any], size: Tuple[int, int],
                   device: torch.device) -> Optional[torch.Tensor]:
    """(B,H,W) bool of the pixels a segmentation KD term is averaged over.

    * Samples with segmentation labels (``has_seg``): pixels whose mask is
      not :data:`VOID` (255).
    * Samples without them: the collate sets their whole mask to VOID, so
      every pixel counts except the letterbox padding, recovered from
      ``letterbox`` and ``orig_sizes`` (:func:`letterbox_content`). The
      teacher only ever sees the image, never a mask.

    The mask is computed at the resolution of ``batch["masks"]`` (the input)
    and nearest-resized to ``size`` if the logits differ. ``None`` when the
    batch has no ``masks``: then every pixel is valid.
    """
    masks = batch.get("masks")
    if masks is None:
        return None
    valid = masks != VOID
    has_seg = batch.get("has_seg")
    if has_seg is not None:
        unlabelled = ~torch.as_tensor(has_seg, dtype=torch.bool, device=valid.device)
        if bool(unlabelled.any()):
            content = letterbox_content(batch, tuple(masks.shape[-2:]))
            content = torch.ones_like(valid) if content is None else content.to(valid.device)
            valid = torch.where(unlabelled[:, None, None], content, valid)
    if tuple(valid.shape[-2:]) != tuple(size):
        valid = F.interpolate(valid[:, None].float(), size=tuple(size), mode="nearest")[:, 0] > 0.5
    return valid.to(device)


def model_device(model: Any) -> torch.device:
    """Device of a model's first parameter (CPU for parameter-less stubs)."""
    params = model.parameters() if isinstance(model, nn.Module) else iter(())
    return next((p.device for p in params), torch.device("cpu"))


def widths(model: Any, who: str, loss: str) -> Dict[str, int]:
    """``model.feat_channels`` (name -> channels) or a ConfigError."""
    chans = getattr(model, "feat_channels", None)
    if not isinstance(chans, Mapping):
        raise ConfigError(f"loss {loss}: the {who} model does not expose feat_channels "
                          "(name -> channels), needed to build the adapters")
    return {str(k): int(v) for k, v in chans.items()}


def pairs(student_out: Dict[str, Any], teacher_out: Dict[str, Any], names: Sequence[str],
          adapters: FeatureAdapters) -> Iterable[Tuple[str, torch.Tensor, torch.Tensor]]:
    """Yield ``(name, adapted student map, detached teacher map)`` per name,
    checking that the channel counts agree after adaptation (an adapter
    built by ``bind`` from ``feat_channels`` that disagree with the real
    outputs would not)."""
    loss = adapters.loss
    for name in names:
        t = feature(teacher_out, name, "teacher", loss).detach()
        s = adapters.to_teacher(name, feature(student_out, name, "student", loss), t.shape[1])
        if s.shape[1] != t.shape[1]:
            raise ConfigError(f"loss {loss}.feats: {name!r} has {s.shape[1]} adapted student channels "
                              f"vs {t.shape[1]} teacher channels (feat_channels disagree with the outputs)")
        yield name, s, t


def dense_maps(loss: str, key: Optional[str], student_out: Dict[str, Any], teacher_out: Dict[str, Any],
               names: Sequence[str], adapters: FeatureAdapters) -> Iterable[Tuple[torch.Tensor, torch.Tensor]]:
    """The ``(student map, detached teacher map)`` pairs a dense KD loss
    compares: with ``key == "seg"`` the segmentation logits (class counts
    checked), else each feature in ``names`` through ``adapters``
    (:func:`pairs`). Spatial sizes may still differ (see
    :func:`mtkd.losses._functional.resize_to`)."""
    if key == "seg":
        s = output_entry(student_out, "seg", "student", loss)
        t = output_entry(teacher_out, "seg", "teacher", loss).detach()
        check_classes(loss, s.shape[1] - 1, t.shape[1] - 1)
        return [(s, t)]
    return [(s, t) for _, s, t in pairs(student_out, teacher_out, names, adapters)]
