"""``KDDetectionTrainer``: Ultralytics' ``DetectionTrainer`` plus mtkd distillation.

A plug-in, not a fork: Ultralytics' data, augmentation, optimiser, EMA,
validation, run folder and checkpoints are all its own. The subclass only

1. accepts ``kd_*`` keys beside Ultralytics' own. They are taken out before
   Ultralytics validates its args and put back on ``self.args`` afterwards, so
   the args Ultralytics' DDP launcher hands each worker carry them and each
   worker rebuilds teacher, adapters and criterion from them (nothing is held
   in memory across the relaunch). They are recorded in ``kd.yaml`` beside
   ``args.yaml``, and kept out of everything Ultralytics re-validates or saves
   (the validator's args, the checkpoint's ``train_args`` and model ``args``),
   so ``args.yaml`` stays a plain Ultralytics one and a resumed run is not
   taken for another kind of run;
2. checks everything before Ultralytics creates the run folder: the ``kd_*``
   values, Ultralytics' own args, the data yaml, and the teacher
   (:mod:`mtkd.yolo.teacher`), loaded on the CPU and compared with the data's
   classes. A bad call exits with one line and leaves no run folder. (A
   ``resume`` reads its data from the checkpoint, so its teacher is loaded and
   checked when training is set up.);
3. adds the feature adapters' parameters to Ultralytics' optimiser through
   ``build_optimizer`` (same param-group rules as the student's);
4. wraps the student's criterion with :class:`KDCriterion`, which appends the
   KD terms (mtkd's registered losses ``kd_cls``, ``kd_dfl``, ``kd_obj`` and
   ``cwd``, built from the ``kd_*`` keys by
   :class:`~mtkd.yolo.losses.YoloKD`, the ones a multi-task config names in
   ``loss.extra``) to Ultralytics' loss vector; the trainer derives ``loss_names``
   from the loss dict, so each term becomes its own ``train/kd_*`` column in
   ``results.csv`` (``val/kd_*`` stay 0: validation computes the plain loss).
5. trains a pruned student (``mtkd yolo prune``) at its pruned widths
   (``get_model``), where Ultralytics would rebuild it from its yaml.

What is saved: Ultralytics saves its EMA, a deep copy of the student made
before the criterion is wrapped; :class:`KDCriterion` also reduces to the plain
criterion whenever it is copied or pickled, and Ultralytics strips criteria
from checkpoints. So ``best.pt`` holds only Ultralytics classes - no teacher,
no adapters, no mtkd class - and loads where mtkd is not installed. Beside
Ultralytics' entries it holds a top-level ``mtkd`` entry of plain types
(:meth:`KDDetectionTrainer.kd_record`: that the model was distilled, the
teacher's path, kind and class names, and the ``kd_*`` values). The optimizer
state in ``last.pt`` includes the adapters' moments (tensors only).
``resume`` needs the ``kd_*`` arguments again (Ultralytics resumes from
``train_args``, which holds none); the adapters then restart from their init.

DDP (multi-GPU, Ultralytics' own relaunch): Ultralytics wraps the student
alone in ``DistributedDataParallel`` in the middle of ``_setup_train``, before
``build_optimizer`` makes the adapters, and its EMA, validation and saving
all read that wrapped module; putting the adapters inside it would ship them
in the saved student. So the KD module that owns them gets its own
``DistributedDataParallel`` wrapper (:func:`kd_forward`), through which the
criterion calls it: DDP broadcasts rank 0's adapters at the start and
averages their gradients in the same backward as the student's.

Usage::

    from ultralytics import YOLO
    from mtkd.yolo.trainer import KDDetectionTrainer

    YOLO("yolo11n.yaml").train(trainer=KDDetectionTrainer, data="data.yaml", epochs=50,
                               kd_teacher="runs/detect/teacher/weights/best.pt", kd_feat=1.0)
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

import torch
from torch import nn

import mtkd
from mtkd.engine.distributed import DistInfo, wrap
from mtkd.errors import ConfigError
from mtkd.yolo.adapter import detect_to_detoutput, name_list, neck_channels, neck_feats
from mtkd.yolo.losses import YoloKD, check_value
from mtkd.yolo.teacher import build_teacher, check_path

from ultralytics.models.yolo.detect import DetectionTrainer  # noqa: E402  (after mtkd's offline switches)
from ultralytics.cfg import get_cfg
from ultralytics.utils import DEFAULT_CFG, RANK, YAML
from ultralytics.utils.torch_utils import unwrap_model

#: The ``kd_*`` arguments and their defaults. Weights of 0 switch a term off. The output
#: weights are kept small beside the hard loss so that the teacher does not dominate
#: fine-tuning; ``benchmarks/yolo_kd/README.md`` records how they were chosen. Tune them
#: on your own data.
KD_DEFAULTS: Dict[str, Any] = {
    "kd_teacher": None,  # path: an Ultralytics detection .pt or an mtkd checkpoint
    "kd_cls": 0.5,  # class-score KL (teacher-score gated)
    "kd_dfl": 0.25,  # box-distribution KL (L1 on ltrb, column kd_box, for heads without DFL)
    "kd_obj": 0.1,  # objectness-proxy KL, dense
    "kd_feat": 0.0,  # neck CWD through 1x1 adapters
    "kd_t": 2.0,  # temperature of the output terms
    "kd_feat_t": 1.0,  # CWD temperature
    "kd_names_ok": False,  # true: accept a teacher whose class names differ from the data's (same count)
}


def split_kd_args(args: Optional[Mapping[str, Any]]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Split ``args`` into (Ultralytics' keys, checked ``kd_*`` values)."""
    rest, kd = {}, {}
    for key, value in dict(args or {}).items():
        if not key.startswith("kd_"):
            rest[key] = value
            continue
        if key not in KD_DEFAULTS:
            raise ConfigError(f"{key}: unknown distillation argument; known: {', '.join(KD_DEFAULTS)}")
        if key == "kd_teacher":
            kd[key] = None if value in (None, "") else str(value)
        elif key == "kd_names_ok":
            if not isinstance(value, bool):
                raise ConfigError(f"{key}: expected true or false, got {value!r}")
            kd[key] = value
        else:
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
            kd[key] = check_value(key, number)
    return rest, kd


def _checked_args(cfg: Any, overrides: Mapping[str, Any]) -> Any:
    """Ultralytics' merged args (``get_cfg``), its complaints as one-line ConfigErrors."""
    try:
        return get_cfg(cfg, dict(overrides))
    except (SyntaxError, TypeError, ValueError, KeyError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise ConfigError(lines[0] if lines else type(exc).__name__) from None


def load_data(data: Any) -> Dict[str, Any]:
    """Ultralytics' ``check_det_dataset(data)``, its failures (a missing yaml, missing images) as one
    ConfigError naming ``data``."""
    from ultralytics.data.utils import check_det_dataset

    if not data:
        raise ConfigError("data: required (an Ultralytics data .yaml)")
    try:
        return check_det_dataset(data)
    except Exception as exc:  # Ultralytics raises many types for a bad data yaml
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise ConfigError(f"data: {data}: {lines[0] if lines else type(exc).__name__}") from None


def data_names(args: Any) -> list:
    """The class names of the data yaml ``args.data`` (:func:`load_data`; ``single_cls``: one)."""
    data = load_data(args.data)
    return ["item"] if args.single_cls else name_list(data["names"])


@contextlib.contextmanager
def _checkpoint_entry(key: str, value: Any) -> Iterator[None]:
    """Add ``{key: value}`` to the checkpoint dicts (those with ``train_args``) ``torch.save``d in the block.

    Ultralytics builds its checkpoint dict inside ``save_model`` and passes it straight
    to ``torch.save``; this is the one place an entry can join it.
    """
    real_save = torch.save

    def save(obj: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(obj, dict) and "train_args" in obj:
            obj = {**obj, key: value}
        return real_save(obj, *args, **kwargs)

    torch.save = save
    try:
        yield
    finally:
        torch.save = real_save


@contextlib.contextmanager
def _without_kd_args(*namespaces: Any) -> Iterator[None]:
    """Temporarily remove the ``kd_*`` attributes from argument namespaces."""
    saved = []
    for ns in namespaces:
        if ns is not None and hasattr(ns, "__dict__"):
            saved.append((ns, {k: ns.__dict__.pop(k) for k in KD_DEFAULTS if k in ns.__dict__}))
    try:
        yield
    finally:
        for ns, values in saved:
            ns.__dict__.update(values)


class KDCriterion:
    """Ultralytics' criterion with the KD terms appended to its loss vector.

    Called by the student's ``loss()`` with the train-mode predictions; the
    KD terms are scaled by the batch size exactly as Ultralytics scales its own
    (its trainer sums the vector and divides nothing). Eval-mode predictions
    (a tuple) get the plain loss, and so does every batch when all KD weights
    are 0 (the teacher is not run). Copying or pickling yields the plain
    criterion, so no EMA copy or checkpoint ever carries the teacher.
    """

    def __init__(self, base: Any, head: nn.Module, teacher: Any, kd: YoloKD,
                 forward: Optional[nn.Module] = None):
        self.base = base
        self.head = head
        self.teacher = teacher
        self.kd = kd
        self.kd_forward = kd if forward is None else forward  # ``kd`` or its DDP wrapper

    def __call__(self, preds: Any, batch: Dict[str, Any]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        loss, items = self.base(preds, batch)
        if isinstance(preds, tuple) or not self.kd.weights:
            return loss, items
        images = batch["img"]
        student = detect_to_detoutput(preds, self.head)
        teacher, t_feats = self.teacher(images)
        terms = self.kd_forward(student, teacher, neck_feats(preds) if self.kd.w_feat else None, t_feats)
        if not terms:
            return loss, items
        kd_vec = torch.stack(list(terms.values())).to(loss.dtype) * images.shape[0]
        return torch.cat([loss, kd_vec]), {**items, **{k: v.detach() for k, v in terms.items()}}

    def update(self) -> None:
        """Forward Ultralytics' per-epoch schedule (YOLO26's one2many/one2one mix)."""
        if hasattr(self.base, "update"):
            self.base.update()

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Rebuild as (a copy of) the plain criterion: stdlib ``copy.copy`` applied to the base.
        return copy.copy, (self.base,)


def kd_forward(kd: YoloKD, world_size: int, device: torch.device) -> nn.Module:
    """What the criterion calls: ``kd`` itself, or under DDP (``world_size > 1``) ``kd`` in its own
    ``DistributedDataParallel`` wrapper when it has trainable adapters, so their gradients are
    averaged across ranks like the student's. Needs the process group when it wraps."""
    if not any(p.requires_grad for p in kd.parameters()):
        return kd
    return wrap(kd, DistInfo(world_size=world_size, device=device))


class _StudentAndAdapters(nn.Module):
    """What Ultralytics' ``build_optimizer`` walks: the student and the KD adapters.

    ``model`` mirrors the student's layer list, which ``build_optimizer`` reads
    for MuSGD's head learning-rate boost.
    """

    def __init__(self, student: nn.Module, kd: nn.Module):
        super().__init__()
        self.student = student
        self.kd = kd

    @property
    def model(self) -> nn.Module:
        return self.student.model


class KDDetectionTrainer(DetectionTrainer):
    """``DetectionTrainer`` with a frozen teacher and mtkd's KD terms (see the module doc)."""

    def __init__(self, cfg: Any = DEFAULT_CFG, overrides: Optional[Dict[str, Any]] = None,
                 _callbacks: Optional[dict] = None):
        overrides, kd = split_kd_args(overrides)
        if isinstance(cfg, dict):
            cfg, kd_cfg = split_kd_args(cfg)
            kd = {**kd_cfg, **kd}
        kd = {**KD_DEFAULTS, **kd}
        # everything is checked before Ultralytics creates the run folder
        check_path(kd["kd_teacher"])
        args = _checked_args(cfg, overrides)
        if args.distill_model:
            raise ConfigError("kd_teacher: use kd_teacher or Ultralytics' distill_model, not both")
        teacher = None
        if not args.resume:
            teacher = build_teacher(kd["kd_teacher"], data_names(args), "cpu", kd["kd_names_ok"])
        super().__init__(cfg, overrides, _callbacks)
        for key, value in kd.items():
            setattr(self.args, key, value)
        if RANK in {-1, 0}:
            YAML.save(self.save_dir / "kd.yaml", {k: getattr(self.args, k) for k in KD_DEFAULTS})
        self.kd_teacher: Any = teacher
        self.kd_loss: Optional[YoloKD] = None

    # -- set-up ----------------------------------------------------------------------------
    def _setup_train(self) -> None:
        """Load the teacher, run Ultralytics' set-up, then wrap the student's criterion.

        The wrap comes last, after Ultralytics has made its EMA copy.
        """
        if self.kd_teacher is None:  # a resumed run: its data is known only now
            self.kd_teacher = build_teacher(self.args.kd_teacher, name_list(self.data["names"]), self.device,
                                            self.args.kd_names_ok)
        self.kd_teacher.to(self.device)
        super()._setup_train()
        student = unwrap_model(self.model)
        base = student.criterion if getattr(student, "criterion", None) is not None else student.init_criterion()
        student.criterion = KDCriterion(base, student.model[-1], self.kd_teacher, self.kd_loss,
                                        kd_forward(self.kd_loss, self.world_size, self.device))

    def build_optimizer(self, model: nn.Module, name: str = "auto", lr: float = 0.001, momentum: float = 0.9,
                        decay: float = 1e-5, iterations: float = 1e5) -> torch.optim.Optimizer:
        """Build the KD module (its adapters need the student), then Ultralytics' optimiser over both."""
        student = unwrap_model(model)
        s_strides = tuple(int(s) for s in student.stride.tolist())
        if s_strides != self.kd_teacher.strides:
            raise ConfigError(f"kd_teacher: teacher strides {list(self.kd_teacher.strides)} differ from the "
                              f"student's {list(s_strides)}")
        a = self.args
        self.kd_loss = YoloKD(cls=a.kd_cls, dfl=a.kd_dfl, obj=a.kd_obj, feat=a.kd_feat, t=a.kd_t,
                              feat_t=a.kd_feat_t, student_channels=neck_channels(student) if a.kd_feat else None,
                              teacher_channels=self.kd_teacher.channels).to(self.device)
        return super().build_optimizer(_StudentAndAdapters(student, self.kd_loss), name, lr, momentum, decay,
                                       iterations)

    def get_model(self, cfg: Any = None, weights: Any = None, verbose: bool = True) -> nn.Module:
        """Ultralytics' model built from ``cfg`` with ``weights`` loaded, except for a pruned ``weights``.

        Ultralytics builds the model from the yaml and copies in the weights
        whose shapes match, which trains a pruned model (``mtkd yolo prune``)
        at its original widths with most of its weights dropped. A ``weights``
        model whose layers are narrower than the yaml's is trained itself (a
        copy, in FP32), so training keeps the pruned widths.
        """
        from mtkd.yolo.prune import is_pruned

        source = (weights.get("ema") or weights.get("model")) if isinstance(weights, dict) else weights
        model = super().get_model(cfg, None, verbose)
        if isinstance(source, nn.Module) and is_pruned(source, model):
            nc = int(source.model[-1].nc)
            if nc != int(self.data["nc"]):
                raise ConfigError(f"model: a pruned model with {nc} classes cannot train on data with "
                                  f"{self.data['nc']} classes")
            pruned = self.set_model_names_for_load(copy.deepcopy(source).float())
            pruned.requires_grad_(True)
            return pruned
        if weights:
            model.load(weights)
        return model

    def get_validator(self) -> Any:
        """Ultralytics' validator, built from args without the ``kd_*`` keys it would reject."""
        with _without_kd_args(self.args):
            return super().get_validator()

    def kd_record(self) -> Dict[str, Any]:
        """The checkpoints' top-level ``mtkd`` entry (plain types only): what this distillation was."""
        teacher = self.kd_teacher
        return {
            "distilled": True,
            "teacher": {
                "path": str(Path(self.args.kd_teacher).resolve()),
                "kind": getattr(teacher, "kind", None),
                "names": list(teacher.names) if getattr(teacher, "names", None) else None,
            },
            "kd": {k: getattr(self.args, k) for k in KD_DEFAULTS if k != "kd_teacher"},
            "mtkd_version": mtkd.__version__,
        }

    def save_model(self) -> bool:
        """Ultralytics' save, plus the ``mtkd`` entry, with the ``kd_*`` keys out of ``train_args`` and the
        model's ``args``."""
        ema_args = getattr(getattr(self.ema, "ema", None), "args", None)
        record = self.kd_record()
        with _without_kd_args(self.args, ema_args), _checkpoint_entry("mtkd", record):
            return super().save_model()
