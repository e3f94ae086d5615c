"""Models: ``build_model(model_cfg, num_classes)`` and the student/teacher presets.

``model_cfg`` keys (every key optional; missing ones come from ``preset``,
which defaults to ``"student"``):

* ``preset``: ``"student"`` or ``"teacher"``, the base the other keys override;
* ``backbone``: a timm model name or ``"smp:<encoder>"``;
* ``pretrained``: the backbone's initial weights: ``false`` (random, the
  default), ``true`` (timm's / smp's own, downloaded by them) or the path of
  a local state dict of the encoder (see :mod:`mtkd.pretrained`); the
  neck and heads always start random;
* ``neck_channels`` / ``neck_depth``: PAN width ``c`` (levels c, 2c, 4c) and
  bottlenecks per C2f;
* ``head_channels``: width of the detection head's towers;
* ``reg_max``: DFL bins per box side (1 = direct ltrb regression);
* ``seg_channels``: segmentation head width (a multiple of 32);
* ``seg_c2``: also fuse the stride-4 backbone map in the seg head;
* ``det`` / ``seg``: which heads to build.

Unknown or ill-typed keys raise :class:`~mtkd.errors.ConfigError` naming
``model.<key>``.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

from mtkd.errors import ConfigError
from mtkd.heads.det import DetHead
from mtkd.heads.seg import SegHead
from mtkd.models.backbone import Backbone, build_backbone
from mtkd.models.info import model_info
from mtkd.models.multitask import MultiTaskModel
from mtkd.models.neck import PAN
from mtkd.pretrained import check_pretrained

#: Presets, measured at 128 px with nc=20 on the 2-core CPU (``model_info``;
#: a train step = forward + yolo_det + seg_ce + backward at batch 16):
#: student 3.6 M params, 0.21 GFLOPs, forward+backward 0.66 s on 1 thread;
#: teacher (resnet18) 13.9 M params, 1.47 GFLOPs (7x), forward+backward 1.34 s
#: on 1 thread. A resnet34 teacher (24.0 M, 2.68 GFLOPs, 2.57 s) was the first
#: choice; it doubled the teacher's training time on this CPU for no need.
PRESETS: Dict[str, Dict[str, Any]] = {
    "student": {"backbone": "mobilenetv3_large_100", "neck_channels": 32, "neck_depth": 1, "head_channels": 32,
                "reg_max": 16, "seg_channels": 32, "seg_c2": False, "det": True, "seg": True},
    "teacher": {"backbone": "resnet18", "neck_channels": 64, "neck_depth": 2, "head_channels": 64,
                "reg_max": 16, "seg_channels": 64, "seg_c2": False, "det": True, "seg": True},
    "student_small": {"backbone": "cnn_w12", "neck_channels": 12, "neck_depth": 1, "head_channels": 16,
                      "reg_max": 8, "seg_channels": 32, "seg_c2": True, "det": True, "seg": True},
    "teacher_small": {"backbone": "cnn_w32", "neck_channels": 32, "neck_depth": 1, "head_channels": 48,
                      "reg_max": 8, "seg_channels": 64, "seg_c2": True, "det": True, "seg": True},
}

_TYPES = {"backbone": str, "neck_channels": int, "neck_depth": int, "head_channels": int,
          "reg_max": int, "seg_channels": int, "seg_c2": bool, "det": bool, "seg": bool}


def _resolve(model_cfg: Mapping[str, Any]) -> Dict[str, Any]:
    if not isinstance(model_cfg, Mapping):
        raise ConfigError(f"model: expected a mapping, got {type(model_cfg).__name__}")
    preset = model_cfg.get("preset", "student")
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    cfg = dict(PRESETS[preset])
    pretrained = model_cfg.get("pretrained")
    cfg["pretrained"] = check_pretrained(False if pretrained is None else pretrained)
    for key, value in model_cfg.items():
        if key in ("preset", "pretrained") or value is None:  # null = take the preset's value
            continue
        if key not in _TYPES:
            raise ConfigError(f"model.{key}: unknown key; known: preset, pretrained, {', '.join(_TYPES)}")
        want = _TYPES[key]
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ConfigError(f"model.{key}: expected {want.__name__}, got {value!r}")
        if want is int and value < 1:
            raise ConfigError(f"model.{key}: must be >= 1, got {value}")
        cfg[key] = value
    if cfg["seg_channels"] % 32:
        raise ConfigError(f"model.seg_channels: must be a multiple of 32, got {cfg['seg_channels']}")
    if not (cfg["det"] or cfg["seg"]):
        raise ConfigError("model.det: at least one of model.det / model.seg must be true")
    return cfg


def build_model(model_cfg: Mapping[str, Any], num_classes: int) -> MultiTaskModel:
    """Build a :class:`MultiTaskModel` from a ``model:`` config section.

    Random init, except the backbone when ``model_cfg["pretrained"]`` says otherwise.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes: expected a positive int, got {num_classes!r}")
    cfg = _resolve(model_cfg)
    backbone = build_backbone(cfg["backbone"], pretrained=cfg["pretrained"])
    neck = PAN(backbone.channels[1:], cfg["neck_channels"], cfg["neck_depth"])
    det = DetHead(neck.channels, num_classes, cfg["head_channels"], cfg["reg_max"]) if cfg["det"] else None
    seg = (SegHead(neck.channels, num_classes, cfg["seg_channels"],
                   c2_channels=backbone.channels[0] if cfg["seg_c2"] else None) if cfg["seg"] else None)
    model = MultiTaskModel(backbone, neck, det, seg)
    # every architecture key, resolved against the preset (plain types, no initial weights):
    # build_model(model.arch, nc) builds the same network whatever the presets become
    model.arch = {k: v for k, v in cfg.items() if k != "pretrained"}
    return model


__all__ = ["PRESETS", "Backbone", "DetHead", "MultiTaskModel", "PAN", "SegHead", "build_backbone",
           "build_model", "model_info"]
