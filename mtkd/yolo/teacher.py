"""``kd_teacher`` -> a frozen teacher for the YOLO plug-in, checked against the data's classes.

``kd_teacher`` (one string, so it travels through Ultralytics' args and its DDP
relaunch) names a checkpoint file: an Ultralytics detection ``.pt`` or an mtkd
checkpoint, loaded by :func:`mtkd.teachers.detection_teacher` (which says how
each kind is read and what it exposes). A directory or a YAML file (a model
architecture, a data yaml, an mtkd config) is refused with one line saying what
it is. :func:`check_classes` compares the teacher's ``nc`` and ``names`` with
the data's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from mtkd.errors import ConfigError
from mtkd.teachers import detection_teacher


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
    teacher = detection_teacher(check_path(spec), len(names))
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
