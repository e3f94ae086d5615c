"""Ultralytics ``Detect`` head output -> mtkd's canonical :class:`~mtkd.structures.DetOutput`.

Ultralytics 8.4 heads (v8, 11, 26) return, in train mode, a dict
``{"boxes": (B, 4*reg_max, A), "scores": (B, nc, A), "feats": [p3, p4, p5]}``;
end-to-end heads (YOLO26) wrap two such dicts as ``{"one2many", "one2one"}``. In
eval mode the same dict is the second element of ``(decoded, preds)``.

Conventions and choices (the contract in :mod:`mtkd.structures` is silent on these):

* End-to-end heads: the **one2many** branch is used. It is the dense branch the
  assigner trains with top-k positives, so it carries the richest per-anchor
  signal; the one2one branch is trained on detached features and only selects.
* Objectness: these heads have none. ``obj`` is the max class logit and
  ``obj_is_proxy=True``, so ``sigmoid(obj)`` is the best class score.
* Boxes: ``box`` is ltrb in stride units, the DFL expectation computed by the
  head's own ``dfl`` module (for ``reg_max == 1`` heads ``dfl`` is the identity
  and the raw 4 channels are the distances, as Ultralytics decodes them).
  ``box_dist`` is the (B, A, 4, reg_max) logits for DFL heads, ``None`` otherwise.
* Anchors and strides come from Ultralytics' ``make_anchors`` with the 0.5 cell
  offset, exactly as its loss and decoder use them.
* ``levels``: per-level ``{"box", "obj", "cls"}`` maps (B, C, H, W) as views
  into the flat tensors.

:func:`name_list` turns Ultralytics' class ``names`` (a dict or a list) into a list.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import nn

from mtkd.errors import ConfigError
from mtkd.structures import DetOutput

#: Names of the neck levels feeding the head, in Ultralytics' order (strides 8/16/32).
NECK_NAMES = ("p3", "p4", "p5")


def detect_head(model: nn.Module) -> nn.Module:
    """The Ultralytics ``Detect`` head (last layer) of a ``DetectionModel``."""
    from ultralytics.nn.modules.head import Detect

    layers = getattr(model, "model", None)
    head = layers[-1] if isinstance(layers, nn.Sequential) and len(layers) else None
    if not isinstance(head, Detect):
        raise ConfigError(f"model: {type(model).__name__} is not an Ultralytics detection model (no Detect head)")
    return head


def name_list(names: Any) -> Optional[List[str]]:
    """Ultralytics' ``names`` (``{index: name}`` or a list) as a list, ``None`` when absent."""
    if isinstance(names, Mapping):
        return [str(names[k]) for k in sorted(names)]
    if isinstance(names, (list, tuple)):
        return [str(n) for n in names]
    return None


def train_preds(preds: Any) -> Dict[str, Any]:
    """The dense (one2many) train-mode dict out of any Detect output form.

    Accepts the train-mode dict, the eval-mode ``(decoded, dict)`` tuple, and the
    end-to-end ``{"one2many", "one2one"}`` wrapper.
    """
    if isinstance(preds, (tuple, list)) and len(preds) == 2 and isinstance(preds[1], dict):
        preds = preds[1]
    if not isinstance(preds, dict):
        raise TypeError(f"expected a Detect head's raw prediction dict, got {type(preds).__name__}")
    if "one2many" in preds:
        preds = preds["one2many"]
    if not {"boxes", "scores", "feats"} <= set(preds):
        raise TypeError(f"Detect prediction dict lacks boxes/scores/feats (keys: {sorted(preds)})")
    return preds


def detect_to_detoutput(preds: Any, model: nn.Module) -> DetOutput:
    """Convert a Detect head's raw output into a :class:`DetOutput`.

    Args:
        preds: the head's output in train mode (dict), eval mode (``(y, dict)``),
            or an end-to-end wrapper; the one2many branch is used.
        model: the ``DetectionModel`` (or its ``Detect`` head) that produced it;
            supplies ``reg_max``, ``nc``, ``stride`` and the ``dfl`` decoder.
    """
    from ultralytics.nn.modules.head import Detect
    from ultralytics.utils.tal import make_anchors

    head = model if isinstance(model, Detect) else detect_head(model)
    p = train_preds(preds)
    boxes, scores, feats = p["boxes"], p["scores"], p["feats"]
    b, _, a = scores.shape
    reg_max = head.reg_max
    if boxes.shape[1] != 4 * reg_max:
        raise ValueError(f"boxes have {boxes.shape[1]} channels, expected 4*reg_max={4 * reg_max}")

    cls = scores.permute(0, 2, 1)  # (B, A, nc)
    ltrb = head.dfl(boxes).permute(0, 2, 1)  # (B, A, 4), DFL expectation (identity for reg_max=1)
    box_dist = boxes.view(b, 4, reg_max, a).permute(0, 3, 1, 2) if reg_max > 1 else None
    anchors, strides = make_anchors(feats, head.stride, 0.5)
    obj = cls.max(-1).values

    levels: List[Dict[str, torch.Tensor]] = []
    start = 0
    for f in feats:
        h, w = f.shape[-2:]
        sl = slice(start, start + h * w)
        levels.append({
            "box": boxes[..., sl].reshape(b, -1, h, w),
            "cls": scores[..., sl].reshape(b, -1, h, w),
            "obj": obj[:, sl].reshape(b, 1, h, w),
        })
        start += h * w
    if start != a:
        raise ValueError(f"feature maps give {start} anchors but the head output has {a}")
    return DetOutput(cls=cls, obj=obj, box=ltrb, anchors=anchors, strides=strides, box_dist=box_dist,
                     obj_is_proxy=True, levels=levels)


def neck_feats(preds: Any) -> Dict[str, torch.Tensor]:
    """The neck maps that fed the head, as ``{"p3", "p4", "p5"}`` (more levels: ``p6``...)."""
    feats = train_preds(preds)["feats"]
    return {f"p{i + 3}": f for i, f in enumerate(feats)}


@contextlib.contextmanager
def _head_train_flag(head: nn.Module) -> Iterator[None]:
    """Make the head return its raw dict without touching any BatchNorm mode.

    Only the head module's own ``training`` flag is flipped; its convolutions
    keep their mode, so an eval-mode teacher still uses running statistics.
    ``export`` is cleared too, since an exporting head returns only decoded boxes.
    """
    saved = head.training, head.export
    head.training, head.export = True, False
    try:
        yield
    finally:
        head.training, head.export = saved


def forward_detoutput(model: nn.Module, images: torch.Tensor) -> Tuple[DetOutput, Dict[str, torch.Tensor]]:
    """Run a ``DetectionModel`` and return ``(DetOutput, {"p3","p4","p5": neck map})``.

    Works whatever the model's train/eval state: the head yields its raw
    train-mode dict and the rest of the network keeps its mode (an eval teacher
    runs with BatchNorm running statistics). The neck maps are captured with
    forward hooks on the layers listed in the head's ``f`` (the layers feeding
    ``Detect``), so they are the exact tensors the head consumed.
    """
    head = detect_head(model)
    captured: Dict[int, torch.Tensor] = {}
    handles = [
        model.model[j].register_forward_hook(lambda _m, _i, out, k=k: captured.__setitem__(k, out))
        for k, j in enumerate(head.f)
    ]
    try:
        with _head_train_flag(head):
            preds = model.predict(images)
    finally:
        for h in handles:
            h.remove()
    det = detect_to_detoutput(preds, head)
    return det, {f"p{k + 3}": captured[k] for k in sorted(captured)}


def neck_channels(model: nn.Module, imgsz: int = 64) -> Dict[str, int]:
    """Widths of the neck maps feeding the head, from one small no-grad forward.

    The model's train/eval state is restored afterwards (the probe runs in eval
    mode so BatchNorm statistics are not touched).
    """
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    try:
        with torch.no_grad():
            _, feats = forward_detoutput(model, torch.zeros(1, 3, imgsz, imgsz, device=device))
    finally:
        model.train(was_training)
    return {name: int(f.shape[1]) for name, f in feats.items()}
