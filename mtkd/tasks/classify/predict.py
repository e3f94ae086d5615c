"""Classify one image or every image of a folder: one ``file class prob`` line per image.

* Images are found recursively (sorted; image extensions only; a file given
  instead of a folder is read whatever its suffix) and go through the
  evaluation transform (resize, centre-crop ``imgsz``, normalise).
* ``file`` is the path relative to the folder (POSIX separators; the file's
  name when one file is given), ``class``
  the arg-max class name and ``prob`` its softmax probability with 4 decimals.
* A bad image raises DataError naming it, or with ``skip_bad`` is left out
  with a warning naming it.
* Class names come from a list (the dataset's or checkpoint's classes) or a
  labels file (``index name`` per line, see
  :func:`mtkd.tasks.classify.data.parse_labels_file`); their count must equal
  the model's number of outputs.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Union

import torch
from torch import nn
from torchvision.datasets.folder import IMG_EXTENSIONS

from mtkd.imageio import list_images
from mtkd.errors import DataError, MtkdError
from mtkd.tasks.classify.data import build_transform, load_rgb, parse_labels_file


def _class_names(classes_or_labels_file: Union[Sequence[str], str, Path]) -> List[str]:
    if isinstance(classes_or_labels_file, (str, Path)):
        return parse_labels_file(classes_or_labels_file)
    names = list(classes_or_labels_file)
    if not names:
        raise MtkdError("predict: the class list is empty")
    return names


@torch.no_grad()
def predict_folder(model: nn.Module, folder: Union[str, Path],
                   classes_or_labels_file: Union[Sequence[str], str, Path], imgsz: int,
                   mean: Sequence[float], std: Sequence[float], device: Optional[torch.device] = None,
                   batch_size: int = 16, skip_bad: bool = False) -> List[str]:
    """``["<file> <class> <prob>", ...]`` for every image under ``folder`` (or the image file it names)."""
    folder = Path(folder)
    names = _class_names(classes_or_labels_file)
    paths = list_images(folder, IMG_EXTENSIONS)
    root = folder if folder.is_dir() else folder.parent
    if not paths:
        raise DataError(f"{folder}: no images found")
    device = device if device is not None else next(model.parameters()).device
    transform = build_transform(imgsz, mean, std, augment=None)
    was_training = model.training
    model.eval()
    lines: List[str] = []
    try:
        for start in range(0, len(paths), batch_size):
            chunk, tensors = [], []
            for path in paths[start:start + batch_size]:
                try:
                    tensors.append(transform(load_rgb(path)))
                except DataError as exc:
                    if not skip_bad:
                        raise
                    warnings.warn(f"skipping bad image: {exc}", stacklevel=2)
                    continue
                chunk.append(path)
            if not chunk:
                continue
            images = torch.stack(tensors).to(device)
            logits = model(images)["logits"].float()
            if logits.shape[1] != len(names):
                raise MtkdError(f"predict: the model has {logits.shape[1]} classes but {len(names)} "
                                "class names were given")
            prob, idx = logits.softmax(dim=1).max(dim=1)
            for path, p, i in zip(chunk, prob.tolist(), idx.tolist()):
                lines.append(f"{path.relative_to(root).as_posix()} {names[i]} {p:.4f}")
    finally:
        model.train(was_training)
    return lines
