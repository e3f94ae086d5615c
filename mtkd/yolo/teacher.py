"""Teachers for the YOLO plug-in: anything that maps a batch to ``(DetOutput, neck maps)``.

``kd_teacher`` (one string, so it travels through Ultralytics' args and its DDP
relaunch) names one of:

* an **Ultralytics ``.pt``** (``runs/detect/train/weights/best.pt``): loaded
  with Ultralytics' own ``load_checkpoint``, which unpickles - the same trust
  Ultralytics gives any ``model=...pt``. Its conv+BN pairs are fused (the
  teacher only infers, so this is exact and cheaper); an end-to-end head keeps
  its one2many branch, the one distilled.
* an **mtkd checkpoint** (``format: mtkd-ckpt-*``, read ``weights_only``; pruned or not):
  built through :func:`mtkd.models.teacher.load_teacher`; its images are
  normalised with the mean/std recorded in the checkpoint's ``config.data``
  (ImageNet's where absent), since mtkd models train on normalised images
  while Ultralytics batches are 0..1 RGB.
* a **YAML file** holding an mtkd ``teacher:`` section (or the section alone),
  e.g. a composite YOLO + smp teacher; images are normalised with the
  section's ``composite.mean/std`` (ImageNet's where absent), which the
  composite un-does for its YOLO branch.

Every teacher is frozen (eval mode, no grad) and exposes ``nc``, ``strides``
and ``channels`` (neck widths ``{"p3","p4","p5"}``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Sequence, Tuple

import torch
from torch import nn

from mtkd.errors import ConfigError
from mtkd.structures import DetOutput
from mtkd.yolo.adapter import NECK_NAMES, detect_head, forward_detoutput, neck_channels

Batch = Tuple[DetOutput, Dict[str, torch.Tensor]]


class YoloTeacher:
    """A frozen Ultralytics ``DetectionModel``."""

    def __init__(self, model: nn.Module, source: str):
        head = detect_head(model)
        self.model = model.eval().requires_grad_(False)
        self.source = source
        self.nc = int(head.nc)
        self.strides = tuple(int(s) for s in head.stride.tolist())
        self.channels = neck_channels(model)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> Batch:
        return forward_detoutput(self.model, images)


class MtkdTeacher:
    """A frozen mtkd teacher (``mtkd.models.teacher.FrozenTeacher``) fed normalised images."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float], source: str):
        self.model = model
        self.source = source
        self.nc = int(model.num_classes)
        self.strides = tuple(int(s) for s in model.strides)
        self.channels = {k: int(v) for k, v in model.feat_channels.items() if k in NECK_NAMES}
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.mean = torch.tensor(list(mean), dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32, device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> Batch:
        out = self.model((images - self.mean.to(images.dtype)) / self.std.to(images.dtype))
        if "det" not in out:
            raise ConfigError(f"kd_teacher: {self.source} has no detection head")
        return out["det"], {k: v for k, v in out.get("feats", {}).items() if k in NECK_NAMES}


def build_teacher(spec: str, num_classes: int, device: torch.device) -> Any:
    """Load the teacher named by ``kd_teacher`` and check its class count.

    Raises :class:`ConfigError` (one line naming ``kd_teacher`` and both counts)
    when the teacher's class count differs from ``num_classes``.
    """
    path = Path(str(spec))
    if not path.is_file():  # checked here so Ultralytics never tries to download a name
        raise ConfigError(f"kd_teacher: {spec} not found")
    if path.suffix.lower() in (".yaml", ".yml"):
        teacher = _from_yaml(path, num_classes, device)
    else:
        ckpt = _weights_only(path)
        teacher = _from_mtkd_ckpt(path, ckpt, num_classes, device) if ckpt is not None else _from_ultralytics(
            path, device)
    if teacher.nc != num_classes:
        raise ConfigError(f"kd_teacher: teacher {spec} has {teacher.nc} classes but the student (data) has "
                          f"{num_classes}")
    return teacher


def _weights_only(path: Path) -> Dict[str, Any] | None:
    """The checkpoint if it is an mtkd one (plain tensors and dicts), else ``None``.

    Ultralytics checkpoints pickle their model classes, so ``weights_only``
    refuses them at once; that refusal is how the two kinds are told apart.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a pickle of classes (Ultralytics) or not a torch file at all
        return None
    return obj if isinstance(obj, dict) and "model" in obj else None


def _from_ultralytics(path: Path, device: torch.device) -> YoloTeacher:
    from ultralytics.nn.modules.head import OBB
    from ultralytics.nn.tasks import DetectionModel, load_checkpoint

    try:
        model, _ = load_checkpoint(path)
    except Exception as exc:  # Ultralytics raises many types for foreign files
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"kd_teacher: cannot load {path}: {reason}") from None
    if not isinstance(model, DetectionModel) or isinstance(model.model[-1], OBB):
        raise ConfigError(f"kd_teacher: {path} holds a {type(model).__name__}, not an Ultralytics detection model")
    model.end2end = False  # keep the dense one2many branch through fuse()
    model = model.float().fuse(verbose=False).to(device)
    return YoloTeacher(model, str(path))


def _from_mtkd_ckpt(path: Path, ckpt: Mapping[str, Any], num_classes: int, device: torch.device) -> MtkdTeacher:
    from mtkd.models.teacher import load_teacher

    data_cfg = (ckpt.get("config") or {}).get("data") or {}
    return _mtkd(load_teacher({"ckpt": str(path)}, num_classes), data_cfg, str(path), device)


def _from_yaml(path: Path, num_classes: int, device: torch.device) -> MtkdTeacher:
    import yaml

    from mtkd.models.teacher import load_teacher

    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"kd_teacher: {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"kd_teacher: {path} must hold a mapping (an mtkd 'teacher:' section)")
    section = cfg.get("teacher", cfg)
    return _mtkd(load_teacher(section, num_classes), section.get("composite") or {}, str(path), device)


def _mtkd(model: nn.Module, norm: Mapping[str, Any], source: str, device: torch.device) -> MtkdTeacher:
    from mtkd.datasets.transforms import IMAGENET_MEAN, IMAGENET_STD

    model = model.to(device)
    return MtkdTeacher(model, norm.get("mean") or IMAGENET_MEAN, norm.get("std") or IMAGENET_STD, source)
