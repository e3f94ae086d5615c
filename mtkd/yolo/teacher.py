"""Teachers for the YOLO plug-in: anything that maps a batch to ``(DetOutput, neck maps)``.

``kd_teacher`` (one string, so it travels through Ultralytics' args and its DDP
relaunch) names a checkpoint file, one of:

* an **Ultralytics detection ``.pt``** (``runs/detect/train/weights/best.pt``):
  loaded with Ultralytics' own ``load_checkpoint``, which unpickles - the same
  trust Ultralytics gives any ``model=...pt``. Segmentation, pose, OBB and
  classification models are refused (their heads are not what a detection
  student learns). Its conv+BN pairs are fused (the teacher only infers, so
  this is exact and cheaper); an end-to-end head keeps its one2many branch,
  the one distilled.
* an **mtkd checkpoint** (``format: mtkd-ckpt-*``, read ``weights_only``; pruned or not):
  built through :func:`mtkd.models.teacher.load_teacher`; its images are
  normalised with the mean/std recorded in the checkpoint's ``config.data``
  (ImageNet's where absent), since mtkd models train on normalised images
  while Ultralytics batches are 0..1 RGB.

A directory or a YAML file (a model architecture, a data yaml, an mtkd config)
is refused with one line saying what it is. Every teacher is frozen (eval
mode, no grad) and exposes ``kind``, ``nc``, ``names`` (its class names, or
``None`` where the checkpoint records none), ``strides`` and ``channels``
(neck widths ``{"p3","p4","p5"}``). :func:`check_classes` compares ``nc`` and
``names`` with the data's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from mtkd.errors import ConfigError
from mtkd.structures import DetOutput
from mtkd.yolo.adapter import NECK_NAMES, detect_head, forward_detoutput, neck_channels

Batch = Tuple[DetOutput, Dict[str, torch.Tensor]]


class YoloTeacher:
    """A frozen Ultralytics ``DetectionModel``."""

    kind = "ultralytics"

    def __init__(self, model: nn.Module, source: str):
        head = detect_head(model)
        self.model = model.eval().requires_grad_(False)
        self.source = source
        self.nc = int(head.nc)
        self.names = name_list(getattr(model, "names", None))
        self.strides = tuple(int(s) for s in head.stride.tolist())
        self.channels = neck_channels(model)

    def to(self, device: torch.device) -> "YoloTeacher":
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> Batch:
        return forward_detoutput(self.model, images)


class MtkdTeacher:
    """A frozen mtkd teacher (``mtkd.models.teacher.FrozenTeacher``) fed normalised images."""

    kind = "mtkd"

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float], source: str,
                 names: Optional[Sequence[str]] = None):
        self.model = model
        self.source = source
        self.nc = int(model.num_classes)
        self.names = [str(n) for n in names] if names else None
        self.strides = tuple(int(s) for s in model.strides)
        self.channels = {k: int(v) for k, v in model.feat_channels.items() if k in NECK_NAMES}
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1)

    def to(self, device: torch.device) -> "MtkdTeacher":
        self.model.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> Batch:
        out = self.model((images - self.mean.to(images.dtype)) / self.std.to(images.dtype))
        if "det" not in out:
            raise ConfigError(f"kd_teacher: {self.source} has no detection head")
        return out["det"], {k: v for k, v in out.get("feats", {}).items() if k in NECK_NAMES}


def check_path(spec: Any) -> Path:
    """``kd_teacher`` as a path to a checkpoint file; one-line ConfigError for anything else.

    Checked before anything is loaded, so Ultralytics never tries to download a name.
    """
    if spec in (None, ""):
        raise ConfigError("kd_teacher: required (an Ultralytics detection .pt or an mtkd checkpoint)")
    path = Path(str(spec))
    if path.is_dir():
        raise ConfigError(f"kd_teacher: {spec} is a directory; give the teacher's checkpoint file "
                          "(e.g. runs/detect/train/weights/best.pt)")
    if not path.is_file():
        raise ConfigError(f"kd_teacher: {spec} not found")
    if path.suffix.lower() in (".yaml", ".yml"):
        raise ConfigError(f"kd_teacher: {spec} is a YAML file; the teacher must be trained weights "
                          "(an Ultralytics detection .pt or an mtkd checkpoint)")
    return path


def build_teacher(spec: str, names: Sequence[str], device: torch.device | str = "cpu",
                  names_ok: bool = False) -> Any:
    """Load the teacher named by ``kd_teacher`` onto ``device`` and check it against the data's class ``names``.

    Raises :class:`ConfigError` (one line naming ``kd_teacher``) for a path that
    is not a checkpoint, a model that is not a detector, or other classes
    (:func:`check_classes`).
    """
    path = check_path(spec)
    ckpt = _weights_only(path)
    teacher = _from_mtkd_ckpt(path, ckpt, len(names)) if ckpt is not None else _from_ultralytics(path)
    check_classes(teacher, names, names_ok)
    return teacher.to(torch.device(device))


def check_classes(teacher: Any, names: Sequence[str], names_ok: bool = False) -> None:
    """One-line ConfigError unless the teacher's classes are the data's.

    The counts must match. The names must match in order, unless ``names_ok``
    (the same classes under other names) or the teacher records none.
    """
    names = [str(n) for n in names]
    if teacher.nc != len(names):
        raise ConfigError(f"kd_teacher: teacher {teacher.source} has {teacher.nc} classes but the student (data) "
                          f"has {len(names)}")
    if names_ok or teacher.names is None or list(teacher.names) == names:
        return
    i = next(i for i, (a, b) in enumerate(zip(teacher.names, names)) if a != b)
    raise ConfigError(f"kd_teacher: teacher {teacher.source} class {i} is {teacher.names[i]!r} but the data's is "
                      f"{names[i]!r}; set kd_names_ok=true if they are the same classes")


def name_list(names: Any) -> Optional[List[str]]:
    """Ultralytics' ``names`` (``{index: name}`` or a list) as a list, ``None`` when absent."""
    if isinstance(names, Mapping):
        return [str(names[k]) for k in sorted(names)]
    if isinstance(names, (list, tuple)):
        return [str(n) for n in names]
    return None


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


def _from_ultralytics(path: Path) -> YoloTeacher:
    from ultralytics.nn.tasks import DetectionModel, guess_model_task, load_checkpoint

    try:
        model, _ = load_checkpoint(path)
    except Exception as exc:  # Ultralytics raises many types for foreign files
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"kd_teacher: cannot load {path}: {reason}") from None
    # from the layers: the checkpoint's args say task=detect for any model saved without them
    task = guess_model_task(model.model) if isinstance(getattr(model, "model", None), nn.Module) else None
    if task != "detect" or not isinstance(model, DetectionModel):
        what = f"a {task} model" if task else f"a {type(model).__name__}"
        raise ConfigError(f"kd_teacher: {path} is {what}; distillation needs an Ultralytics detection model")
    model.end2end = False  # keep the dense one2many branch through fuse()
    return YoloTeacher(model.float().fuse(verbose=False), str(path))


def _from_mtkd_ckpt(path: Path, ckpt: Mapping[str, Any], num_classes: int) -> MtkdTeacher:
    from mtkd.datasets.transforms import IMAGENET_MEAN, IMAGENET_STD
    from mtkd.models.teacher import load_teacher

    data_cfg = (ckpt.get("config") or {}).get("data") or {}
    classes = ckpt.get("classes")
    names = classes if isinstance(classes, (list, tuple)) else None
    nc = len(names) if names is not None else int(classes or num_classes)
    model = load_teacher({"ckpt": str(path)}, nc)
    return MtkdTeacher(model, data_cfg.get("mean") or IMAGENET_MEAN, data_cfg.get("std") or IMAGENET_STD,
                       str(path), names)
