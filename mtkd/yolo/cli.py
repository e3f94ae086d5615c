"""``mtkd yolo train key=value ...``: Ultralytics-style distillation from the command line.

``mtkd yolo prune model=best.pt ratio=R ...`` prunes a YOLO detection model
(:mod:`mtkd.yolo.prune`); ``mtkd yolo train model=<pruned>.pt ...`` then
fine-tunes it at its pruned widths.

Every Ultralytics train argument works as in ``yolo train`` (``model data epochs
imgsz batch device workers project name ...``), plus:

* ``teacher=PATH`` (alias of ``kd_teacher``): an Ultralytics detection ``.pt``
  or an mtkd checkpoint, with the data's classes (names too, unless
  ``kd_names_ok=true``);
* ``kd_cls kd_dfl kd_obj kd_feat kd_t kd_feat_t kd_names_ok``: see
  :data:`mtkd.yolo.trainer.KD_DEFAULTS`.

Examples::

    mtkd yolo train model=yolo11n.yaml teacher=runs/detect/t/weights/best.pt data=data.yaml epochs=50 imgsz=640
    python tools/distill_yolo.py model=yolov8n.pt teacher=t.pt data=data.yaml kd_feat=1.0 device=0,1

``model=`` and ``data=`` are required (``data`` comes from the checkpoint with
``resume=True``). ``device=cpu`` (or ``mps``) defaults ``amp=False``. Bad input
(arguments, a student, data or teacher that cannot be read) prints one line
and exits with status 2, before the run folder is created.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from mtkd.errors import ConfigError, MtkdError

USAGE = ("usage: mtkd yolo train model=STUDENT(.yaml|.pt) teacher=TEACHER data=DATA.yaml "
         "[epochs= imgsz= batch= device= workers= ...] [kd_cls= kd_dfl= kd_obj= kd_feat= kd_t= kd_feat_t= "
         "kd_names_ok=]\n       mtkd yolo prune model=MODEL.pt ratio=R [out= importance= round_to= imgsz= data=] "
         "(more: mtkd yolo prune help)")


def parse_args(argv: Sequence[str]) -> Dict[str, Any]:
    """``key=value`` tokens -> dict, values typed the way Ultralytics' CLI types them."""
    from ultralytics.cfg import smart_value

    args: Dict[str, Any] = {}
    for token in argv:
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise ConfigError(f"{token}: expected key=value")
        key = "kd_teacher" if key == "teacher" else key
        args[key] = smart_value(value)
    return args


def train(args: Dict[str, Any], callbacks: Optional[Mapping[str, Sequence[Callable[[Any], None]]]] = None) -> Any:
    """Run one distillation from parsed args; returns the finished ``KDDetectionTrainer``
    (``.save_dir``, ``.best``, ``.metrics``).

    ``callbacks`` (``{event: [fn, ...]}``, Ultralytics' event names such as
    ``on_train_epoch_end``) are added to the student model before training;
    Ultralytics hands them to the trainer, which calls ``fn(trainer)``.
    """
    from ultralytics.utils import DEFAULT_CFG_DICT

    from mtkd.yolo.trainer import KDDetectionTrainer, split_kd_args

    ultra, kd = split_kd_args(args)
    unknown = sorted(set(ultra) - set(DEFAULT_CFG_DICT))
    if unknown:
        raise ConfigError(f"{unknown[0]}: not an Ultralytics or mtkd argument")
    if not ultra.get("model"):
        raise ConfigError("model: required (a YOLO model .yaml or .pt, the student)")
    if not ultra.get("data") and not ultra.get("resume"):
        raise ConfigError("data: required (an Ultralytics data .yaml)")
    if str(ultra.get("device", "")).lower() in ("cpu", "mps"):
        ultra.setdefault("amp", False)
    ultra.pop("mode", None)
    model = _student(str(ultra.pop("model")))
    if model.task != "detect":
        raise ConfigError(f"model: {model.model_name} is a {model.task} model; distillation needs a detect model")
    for event, fns in (callbacks or {}).items():
        for fn in fns:
            model.add_callback(event, fn)
    model.train(trainer=KDDetectionTrainer, **ultra, **kd)
    return model.trainer


def _student(spec: str) -> Any:
    """``YOLO(spec)``, its failures (a missing or foreign file) as one ConfigError naming ``model``."""
    from ultralytics import YOLO

    offline = os.environ.get("YOLO_OFFLINE", "").lower() in ("1", "true")
    if offline and Path(spec).suffix.lower() not in (".yaml", ".yml") and not Path(spec).is_file():
        raise ConfigError(f"model: {spec} not found (offline: nothing is downloaded)")
    try:
        return YOLO(spec)
    except Exception as exc:  # Ultralytics raises many types for a missing or foreign file
        if isinstance(exc, FileNotFoundError) or not str(exc).strip():
            raise ConfigError(f"model: {spec} not found") from None
        raise ConfigError(f"model: cannot load {spec}: {str(exc).strip().splitlines()[0][:200]}") from None


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``mtkd yolo`` (``argv`` without the program name; a leading ``train`` is optional,
    a leading ``prune`` runs :func:`mtkd.yolo.prune.main`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "prune":
        from mtkd.yolo.prune import main as prune_main

        return prune_main(argv[1:])
    if argv and argv[0] == "train":
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    try:
        trainer = train(parse_args(argv))
    except MtkdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"results: {trainer.save_dir}")
    return 0
