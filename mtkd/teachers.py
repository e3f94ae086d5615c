"""Frozen teachers of every kind, built in one place.

Two entry points:

* :func:`load_teacher` (the trainer's ``teacher:`` config section): a
  :class:`FrozenTeacher` whose forward returns the student's output dict.
* :func:`detection_teacher` (the YOLO bridge's ``kd_teacher``, see
  :mod:`mtkd.yolo.teacher`): a :class:`YoloTeacher` or :class:`MtkdTeacher`
  that maps a batch of 0..1 RGB images to ``(DetOutput, neck maps)``.

This module sits above :mod:`mtkd.models`, :mod:`mtkd.checkpoint` and the
Ultralytics adapter (:mod:`mtkd.yolo.adapter`), and below :mod:`mtkd.engine`
and the YOLO bridge, which both call it.

``load_teacher(teacher_cfg, num_classes, student=None)`` understands two
``teacher:`` config shapes:

(a) an mtkd multi-task model::

        teacher: {ckpt: runs/teacher/best.pt, model: {preset: teacher}, trust_pickle: false}

    ``model`` defaults to the checkpoint's own ``config.model``; weights come
    from the checkpoint's ``model`` entry (so a ``model.pretrained`` there is
    not fetched or read: the checkpoint replaces those weights), read with
    :func:`mtkd.checkpoint.load_checkpoint` (``weights_only=True``
    unless ``trust_pickle``). A pruned checkpoint (``mtkd prune``) rebuilds
    the architecture it records and ignores ``model``
    (:mod:`mtkd.models.restore`).

(b) a composite of an Ultralytics detector and an smp segmenter::

        teacher:
          trust_pickle: true             # needed for a YOLO .pt (a pickle)
          composite:
            yolo: runs/yolo/best.pt      # or a model yaml (random init, for tests)
            seg: {arch: FPN, encoder: resnet34, ckpt: seg_teacher.pt}
            mean: [0.485, 0.456, 0.406]  # the data's normalisation (defaults: ImageNet)
            std: [0.229, 0.224, 0.225]

    The YOLO branch sees the batch images un-normalised to 0..1 RGB (what
    Ultralytics trains on); the smp branch sees them as they are (it is
    assumed trained with the data's normalisation). ``seg.ckpt`` is a
    ``weights_only`` state dict (bare, or under ``"model"``/``"state_dict"``);
    without it the smp model keeps its random init (tests, smoke runs).
    Output: ``{"det": DetOutput (mtkd.yolo.adapter), "seg": smp logits,
    "feats": {"p3","p4","p5": YOLO neck maps, "c2".."c5": smp encoder maps}}``.

Every such teacher is wrapped in :class:`FrozenTeacher`: eval mode forever,
no parameter requires grad. It exposes ``num_classes``, ``strides`` and
``feat_channels`` like the student. Class counts and strides are checked up
front against ``num_classes`` and ``student.strides``; each mismatch is a
one-line ConfigError naming both values.

``detection_teacher(path, num_classes)`` reads a checkpoint file, one of:

* an **Ultralytics detection ``.pt``** (``runs/detect/train/weights/best.pt``):
  loaded with Ultralytics' own ``load_checkpoint``, which unpickles - the same
  trust Ultralytics gives any ``model=...pt``. Segmentation, pose, OBB and
  classification models are refused (their heads are not what a detection
  student learns). Its conv+BN pairs are fused (the teacher only infers, so
  this is exact and cheaper); an end-to-end head keeps its one2many branch,
  the one distilled.
* an **mtkd checkpoint** (``format: mtkd-ckpt-*``, read ``weights_only``; pruned or not):
  built through :func:`load_teacher`; its images are normalised with the
  mean/std recorded in the checkpoint's ``config.data`` (ImageNet's where
  absent), since mtkd models train on normalised images while Ultralytics
  batches are 0..1 RGB.

Its errors name ``kd_teacher``, the key the YOLO bridge reads the path from.
Each such teacher is frozen (eval mode, no grad) and exposes ``kind``, ``nc``,
``names`` (its class names, or ``None`` where the checkpoint records none),
``strides`` and ``channels`` (neck widths ``{"p3","p4","p5"}``).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from mtkd import checkpoint as ckpt_io
from mtkd.errors import ConfigError, DataError
from mtkd.structures import DetOutput
from mtkd.yolo.adapter import NECK_NAMES, detect_head, forward_detoutput, name_list, neck_channels

Batch = Tuple[DetOutput, Dict[str, torch.Tensor]]

#: Shapes of a composite's ``seg`` entry and of the two kinds.
_SEG_KEYS = {"arch", "encoder", "ckpt"}
_COMPOSITE_KEYS = {"yolo", "seg", "mean", "std"}
_TEACHER_KEYS = {"ckpt", "model", "trust_pickle", "composite"}
#: Input size of the probe forward that measures feature widths.
_PROBE = 64


class FrozenTeacher(nn.Module):
    """A model frozen for distillation.

    ``train(mode)`` always leaves it in eval mode (BatchNorm keeps its
    running statistics, dropout stays off), so a trainer that calls
    ``.train()`` on every module cannot unfreeze it. Parameters never
    require grad; the forward itself does not force ``no_grad``, so losses
    that differentiate through the teacher w.r.t. its input still can.
    """

    def __init__(self, model: nn.Module, num_classes: int, strides: Sequence[int],
                 feat_channels: Mapping[str, int]):
        super().__init__()
        self.model = model
        self.num_classes = int(num_classes)
        self.strides: Tuple[int, ...] = tuple(int(s) for s in strides)
        self.feat_channels: Dict[str, int] = dict(feat_channels)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)

    def forward(self, images: torch.Tensor) -> Dict[str, Any]:
        return self.model(images)


class CompositeTeacher(nn.Module):
    """An Ultralytics ``DetectionModel`` and an smp model as one multi-task model."""

    def __init__(self, yolo: nn.Module, seg: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.yolo = yolo
        self.seg = seg
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> Dict[str, Any]:
        det, neck = forward_detoutput(self.yolo, images * self.std + self.mean)
        encoded: List[List[torch.Tensor]] = []
        handle = self.seg.encoder.register_forward_hook(lambda _m, _i, out: encoded.append(out))
        try:
            logits = self.seg(images)
        finally:
            handle.remove()
        # smp encoders return [input, stride 2, 4, 8, 16, 32]: the last four are c2..c5.
        feats = dict(zip(("c2", "c3", "c4", "c5"), encoded[0][-4:]))
        feats.update(neck)
        return {"det": det, "seg": logits, "feats": feats}


def load_teacher(teacher_cfg: Mapping[str, Any], num_classes: int,
                 student: Optional[nn.Module] = None) -> FrozenTeacher:
    """Build the frozen teacher described by a ``teacher:`` config section.

    Args:
        teacher_cfg: kind (a) ``{ckpt, model?, trust_pickle?}`` or kind (b)
            ``{composite: {yolo, seg, mean?, std?}, trust_pickle?}``.
        num_classes: the student's detection class count.
        student: when given, its ``strides`` must equal the teacher's.
    """
    if not isinstance(teacher_cfg, Mapping):
        raise ConfigError(f"teacher: expected a mapping, got {type(teacher_cfg).__name__}")
    for key in teacher_cfg:
        if key not in _TEACHER_KEYS:
            raise ConfigError(f"teacher.{key}: unknown key; known: {', '.join(sorted(_TEACHER_KEYS))}")
    # Null entries (and an empty model config) mean "not given", as in mtkd/configs/defaults.yaml.
    cfg = {k: v for k, v in teacher_cfg.items() if v is not None and not (k == "model" and v == {})}
    trust = cfg.get("trust_pickle", False)
    if not isinstance(trust, bool):
        raise ConfigError(f"teacher.trust_pickle: expected true/false, got {trust!r}")
    if "composite" in cfg:
        if "ckpt" in cfg or "model" in cfg:
            raise ConfigError("teacher.composite: give either composite or ckpt/model, not both")
        model, nc, strides = _composite(cfg["composite"], num_classes, trust)
    elif "ckpt" in cfg:
        model, nc, strides = _mtkd_model(cfg, num_classes, trust)
    else:
        raise ConfigError("teacher: expected 'ckpt' (an mtkd checkpoint) or 'composite' (YOLO + smp)")
    if student is not None:
        s_strides = tuple(int(s) for s in getattr(student, "strides", ()))
        if s_strides != tuple(strides):
            raise ConfigError(f"teacher: teacher strides {list(strides)} differ from student strides "
                              f"{list(s_strides)}")
    return FrozenTeacher(model, nc, strides, _probe_channels(model))


def _probe_channels(model: nn.Module) -> Dict[str, int]:
    """Feature widths from one small eval forward (exact whatever the model)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            out = model(torch.zeros(1, 3, _PROBE, _PROBE, device=device))
    finally:
        model.train(was_training)
    return {name: int(f.shape[1]) for name, f in out.get("feats", {}).items()}


# -- kind (a): an mtkd checkpoint ----------------------------------------------------------
def _mtkd_model(cfg: Mapping[str, Any], num_classes: int,
                trust: bool) -> Tuple[nn.Module, int, Tuple[int, ...]]:
    from mtkd.models import build_model
    from mtkd.models.restore import architecture_keys, model_from_checkpoint
    from mtkd.pretrained import check_pretrained

    path = cfg["ckpt"]
    ckpt = ckpt_io.load_checkpoint(path, trust_pickle=trust)
    model_cfg = cfg.get("model") or (ckpt.get("config") or {}).get("model")
    if model_cfg is None:
        raise ConfigError(f"teacher.model: not given and {path} records no config.model")
    classes = ckpt.get("classes")
    nc = len(classes) if isinstance(classes, (list, tuple)) else int(classes or num_classes)
    if nc != num_classes:
        raise ConfigError(f"teacher.ckpt: {path} has {nc} classes but the student has {num_classes}")
    if not isinstance(model_cfg, Mapping):
        raise ConfigError(f"teacher.model: expected a mapping, got {type(model_cfg).__name__}")
    if model_cfg.get("pretrained") is not None:
        check_pretrained(model_cfg["pretrained"], "teacher.model.pretrained")
    # the checkpoint replaces every weight: no pretrained init to fetch or read first; a pruned
    # checkpoint rebuilds the architecture it records (teacher.model cannot describe it)
    model = model_from_checkpoint(
        ckpt, path, lambda: build_model({**architecture_keys(model_cfg), "pretrained": False}, nc),
        mismatch=lambda d: ConfigError(f"teacher.ckpt: {path} does not match teacher.model: {d}"), num_classes=nc,
        model_cfg=model_cfg)
    return model, model.num_classes, tuple(int(s) for s in model.strides)


# -- kind (b): YOLO + smp ----------------------------------------------------------------------
def _composite(cfg: Any, num_classes: int, trust: bool) -> Tuple[nn.Module, int, Tuple[int, ...]]:
    from mtkd.datasets.transforms import IMAGENET_MEAN, IMAGENET_STD

    if not isinstance(cfg, Mapping):
        raise ConfigError("teacher.composite: expected a mapping with 'yolo' and 'seg'")
    for key in cfg:
        if key not in _COMPOSITE_KEYS:
            raise ConfigError(f"teacher.composite.{key}: unknown key; known: {', '.join(sorted(_COMPOSITE_KEYS))}")
    for key in ("yolo", "seg"):
        if key not in cfg:
            raise ConfigError(f"teacher.composite.{key}: required")
    mean = _triple(cfg, "mean", IMAGENET_MEAN)
    std = _triple(cfg, "std", IMAGENET_STD)
    yolo = _yolo(cfg["yolo"], num_classes, trust)
    nc = int(detect_head(yolo).nc)
    if nc != num_classes:
        raise ConfigError(f"teacher.composite.yolo: YOLO has {nc} classes but the student has {num_classes}")
    seg = _smp(cfg["seg"], num_classes)
    strides = tuple(int(s) for s in yolo.stride.tolist())
    return CompositeTeacher(yolo, seg, mean, std), nc, strides


def _triple(cfg: Mapping[str, Any], key: str, default: Sequence[float]) -> Tuple[float, ...]:
    value = cfg.get(key, default)
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ConfigError(f"teacher.composite.{key}: expected 3 numbers, got {value!r}")
    return tuple(float(v) for v in value)


def _yolo(spec: Any, num_classes: int, trust: bool) -> nn.Module:
    """A ``DetectionModel`` from a ``.pt`` (trusted pickle) or a model yaml."""
    from ultralytics.nn.tasks import DetectionModel, load_checkpoint

    spec = str(spec)
    suffix = Path(spec).suffix.lower()
    if suffix in (".yaml", ".yml"):
        try:
            return DetectionModel(spec, nc=num_classes, verbose=False)
        except FileNotFoundError:
            raise DataError(f"teacher.composite.yolo: model yaml {spec} not found") from None
    if suffix != ".pt":
        raise ConfigError(f"teacher.composite.yolo: expected a .pt checkpoint or a model .yaml, got {spec}")
    if not trust:
        raise ConfigError(f"teacher.composite.yolo: {spec} is a pickle; set teacher.trust_pickle: true "
                          "if you trust it")
    if not Path(spec).is_file():  # checked here so Ultralytics never tries a download
        raise DataError(f"teacher.composite.yolo: {spec} not found")
    try:
        model, _ = load_checkpoint(spec)
    except Exception as exc:  # Ultralytics raises TypeError/RuntimeError/... for foreign files
        raise DataError(f"teacher.composite.yolo: cannot load {spec}: {str(exc).strip()[:200]}") from None
    if not isinstance(model, DetectionModel):
        raise ConfigError(f"teacher.composite.yolo: {spec} holds a {type(model).__name__}, not a detection model")
    return model.float()


def _smp(spec: Any, num_classes: int) -> nn.Module:
    """An smp model (``encoder_weights=None``) with weights from a state-dict checkpoint."""
    import segmentation_models_pytorch as smp

    if not isinstance(spec, Mapping):
        raise ConfigError("teacher.composite.seg: expected {arch, encoder, ckpt}")
    for key in spec:
        if key not in _SEG_KEYS:
            raise ConfigError(f"teacher.composite.seg.{key}: unknown key; known: {', '.join(sorted(_SEG_KEYS))}")
    arch, encoder = str(spec.get("arch", "FPN")), str(spec.get("encoder", "resnet34"))
    state = _smp_state(spec["ckpt"]) if spec.get("ckpt") else None
    classes = num_classes + 1
    if state is not None:
        head = [v for k, v in state.items() if k.endswith("segmentation_head.0.weight")]
        if head and head[0].shape[0] != classes:
            raise ConfigError(f"teacher.composite.seg.ckpt: smp model has {head[0].shape[0] - 1} classes "
                              f"(+ background) but the student has {num_classes}")
    try:
        model = smp.create_model(arch, encoder_name=encoder, encoder_weights=None, classes=classes)
    except KeyError as exc:
        reason = re.split(r"[.,] ", str(exc).strip("'\""))[0][:160]  # smp lists every option after it
        raise ConfigError(f"teacher.composite.seg: {reason}") from None
    if state is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[1:2] or [str(exc)]
            raise ConfigError(f"teacher.composite.seg.ckpt: {spec['ckpt']} does not match smp "
                              f"{arch}/{encoder}: {first[0].strip()[:200]}") from None
    return model


def _smp_state(path: Any) -> Dict[str, torch.Tensor]:
    path = Path(str(path))
    if not path.is_file():
        raise DataError(f"teacher.composite.seg.ckpt: {path} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torn or pickled-object files
        raise DataError(f"teacher.composite.seg.ckpt: cannot read {path} as a state dict: "
                        f"{str(exc).strip().splitlines()[0][:200]}") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DataError(f"teacher.composite.seg.ckpt: {path} is not a state dict of tensors")
    return dict(obj)


# -- detection teachers for the YOLO bridge ------------------------------------------------
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
    """A frozen mtkd teacher (:class:`FrozenTeacher`) fed normalised images."""

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


def detection_teacher(path: Path, num_classes: int) -> YoloTeacher | MtkdTeacher:
    """The frozen detection teacher in checkpoint file ``path`` (Ultralytics ``.pt`` or mtkd checkpoint).

    ``num_classes`` is used where an mtkd checkpoint records no classes.
    Raises :class:`ConfigError` (one line naming ``kd_teacher``) for a file
    Ultralytics cannot load or a model that is not a detector.
    """
    ckpt = _weights_only(path)
    return _from_mtkd_ckpt(path, ckpt, num_classes) if ckpt is not None else _from_ultralytics(path)


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

    data_cfg = (ckpt.get("config") or {}).get("data") or {}
    classes = ckpt.get("classes")
    names = classes if isinstance(classes, (list, tuple)) else None
    nc = len(names) if names is not None else int(classes or num_classes)
    model = load_teacher({"ckpt": str(path)}, nc)
    return MtkdTeacher(model, data_cfg.get("mean") or IMAGENET_MEAN, data_cfg.get("std") or IMAGENET_STD,
                       str(path), names)
