"""Run a model over one image or a folder of images and save drawings, masks and a JSON.

Each image is read upright (EXIF orientation applied, see
:func:`mtkd.datasets.common.read_image`) and goes through the evaluation
transform (:func:`mtkd.datasets.transforms.build_transforms` with
``train=False``: the deterministic letterbox to ``imgsz`` and mean/std normalisation), so
predictions match what :func:`mtkd.tasks.multitask.evaluation.evaluate` scores. Boxes
and masks are mapped back to the original pixels with the same helpers as the
evaluator.

Output layout under ``out_dir`` (``<rel>`` = the image's path relative to
``image_dir`` with its suffix replaced by ``.png``, or its name when
``image_dir`` is one image file; when two inputs would
share a name, e.g. ``a.jpg`` and ``a.png``, the later one keeps its suffix
as ``a_png.png``):

* ``vis/<rel>``: the image with the mask alpha-blended and labelled boxes;
* ``masks/<rel>``: the class-index mask (palette PNG; value 0 background,
  ``k + 1`` class ``k``), only when the model has a segmentation head;
* ``detections.json``: a list with one entry per image, see
  :func:`predict_folder`.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import torch
from PIL import Image

from mtkd.datasets.common import read_image
from mtkd.datasets.transforms import build_transforms
from mtkd.tasks.multitask.evaluation import boxes_to_original, seg_to_original
from mtkd.tasks.multitask.plots import draw_predictions, mask_palette
from mtkd.errors import ConfigError, DataError, writing
from mtkd.heads.decode import detections, num_det_classes
from mtkd.structures import Sample

#: Image suffixes :func:`predict_folder` reads (lower case).
PREDICT_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def list_images(image_dir: Path) -> List[Path]:
    """Image files under ``image_dir`` (recursive, sorted; DataError if none), or ``[image_dir]``
    when it is a file (named explicitly, so read whatever its suffix)."""
    if image_dir.is_file():
        return [image_dir]
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: no such image file or folder")
    files = sorted(p for p in image_dir.rglob("*") if p.is_file() and p.suffix.lower() in PREDICT_SUFFIXES)
    if not files:
        raise DataError(f"{image_dir}: no {'/'.join(s[1:] for s in PREDICT_SUFFIXES)} images found")
    return files


def _output_name(rel: Path, used: set) -> Path:
    name = rel.with_suffix(".png")
    if name in used:
        name = rel.with_name(f"{rel.stem}_{rel.suffix[1:]}.png")
    used.add(name)
    return name


def _check_classes(out: Dict[str, Any], classes: Sequence[str]) -> None:
    nc, seg = num_det_classes(out), out.get("seg")
    if nc is not None and nc != len(classes):
        raise ConfigError(
            f"classes: the model predicts {nc} detection classes but {len(classes)} names were given"
        )
    if seg is not None and seg.shape[1] != len(classes) + 1:
        raise ConfigError(
            f"classes: the segmentation head has {seg.shape[1]} outputs, expected {len(classes)} classes + background"
        )


def predict_folder(
    model: torch.nn.Module,
    image_dir: str | Path,
    out_dir: str | Path,
    classes: Sequence[str],
    imgsz: int,
    mean: Sequence[float],
    std: Sequence[float],
    conf: float = 0.25,
    iou: float = 0.6,
    device: str | torch.device = "cpu",
    max_det: int = 300,
    skip_bad: bool = False,
) -> List[Dict[str, Any]]:
    """Predict every image under ``image_dir`` (or the one image file it names); write drawings,
    masks and ``detections.json``.

    ``model`` is an mtkd model or any module with the same output dict, such
    as an exported file run in onnxruntime (:class:`mtkd.export.runtime.OnnxModel`,
    ``"boxes"`` / ``"scores"`` in place of ``"det"``).

    ``imgsz``, ``mean`` and ``std`` are the training data config's (``mean``/
    ``std`` on 0..1 pixels). Images are processed one at a time (their sizes
    differ). A corrupt image raises DataError naming the file, or with
    ``skip_bad`` is skipped with a warning; a failed write (disk full,
    read-only folder) is an MtkdError naming the file. The model runs in eval
    mode under ``torch.inference_mode``; its previous mode is restored.

    Returns (and writes as ``out_dir/detections.json``) one dict per image:
    ``{"file": path relative to image_dir (its name for one file), "width", "height", "boxes": [[x1,
    y1, x2, y2], ...] in original pixels, "scores", "labels" (0-based),
    "classes" (names), "vis": drawing path, "mask": mask path or None}``
    (paths relative to ``out_dir``, POSIX style).
    """
    image_dir, out_dir = Path(image_dir), Path(out_dir)
    files = list_images(image_dir)
    root = image_dir if image_dir.is_dir() else image_dir.parent
    transform = build_transforms({"imgsz": imgsz, "mean": list(mean), "std": list(std)}, train=False)
    device = torch.device(device)
    was_training = model.training
    model.eval()
    results: List[Dict[str, Any]] = []
    used: set = set()
    try:
        for i, path in enumerate(files):
            try:
                image = read_image(path)
            except DataError as exc:
                if not skip_bad:
                    raise
                warnings.warn(f"skipping bad image: {exc}", stacklevel=2)
                continue
            rel = path.relative_to(root)
            h, w = image.shape[:2]
            empty = np.zeros((0, 4), np.float32)
            sample = Sample(image, empty, np.zeros(0), None, has_det=False, has_seg=False, id=rel.as_posix(), index=i)
            item = transform(sample)
            with torch.inference_mode():
                out = model(item["image"][None].to(device))
            _check_classes(out, classes)
            boxes, scores, labels = torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long)
            decoded = detections(out, conf, iou, max_det)
            if decoded is not None:
                d = decoded[0]
                boxes = boxes_to_original(d["boxes"].float().cpu(), item["letterbox"], (h, w))
                scores, labels = d["scores"].float().cpu(), d["labels"].long().cpu()
            mask = None
            if out.get("seg") is not None:
                mask = seg_to_original(out["seg"][0], item["letterbox"], (h, w)).cpu().numpy().astype(np.uint8)

            name = _output_name(rel, used)
            vis_path, mask_path = out_dir / "vis" / name, out_dir / "masks" / name
            with writing(vis_path):
                vis_path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(draw_predictions(image, boxes, labels, scores, mask, classes)).save(vis_path)
            if mask is not None:
                png = Image.fromarray(mask)  # mode "L"; putpalette turns it into "P", indices kept
                png.putpalette(mask_palette())
                with writing(mask_path):
                    mask_path.parent.mkdir(parents=True, exist_ok=True)
                    png.save(mask_path)
            results.append(
                {
                    "file": rel.as_posix(),
                    "width": w,
                    "height": h,
                    "boxes": [[round(float(v), 2) for v in box] for box in boxes.tolist()],
                    "scores": [round(float(s), 4) for s in scores.tolist()],
                    "labels": [int(k) for k in labels.tolist()],
                    "classes": [classes[int(k)] for k in labels.tolist()],
                    "vis": vis_path.relative_to(out_dir).as_posix(),
                    "mask": mask_path.relative_to(out_dir).as_posix() if mask is not None else None,
                }
            )
    finally:
        model.train(was_training)
    with writing(out_dir / "detections.json"):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "detections.json").write_text(json.dumps(results, indent=1))
    return results
