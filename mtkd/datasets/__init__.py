"""Datasets: VOC, COCO and YOLO layouts, a synthetic generator, transforms, collate.

Every format yields the same :class:`mtkd.structures.Sample` and the same item
dicts, so the rest of mtkd never knows which format it reads. The ``data``
config section::

    format: voc | coco | yolo    # a reader of mtkd.registry.FORMATS
    root: <tree root>            # yolo: the data yaml
    train: train                 # split names (yolo: the yaml's keys)
    val: val
    test: test
    classes: null                # or a list of names
    imgsz: 160
    skip_bad: false
    augment: {hflip: 0.5, scale: [0.5, 1.5], translate: 0.1, color: 0.3}
    mean: [0.485, 0.456, 0.406]
    std: [0.229, 0.224, 0.225]
    ann_file: annotations/instances_{split}.json   # coco only
    image_dir: images/{split}                      # coco only
    unlabeled: null              # folder or split name of images without labels (mtkd.datasets.unlabeled)
    unlabeled_ratio: 0.5         # fraction of each training batch drawn from them (mtkd.datasets.mixing)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Tuple

from mtkd.datasets.coco import COCODataset
from mtkd.datasets.collate import collate
from mtkd.datasets.common import RecordDataset
from mtkd.datasets.mixing import MixedBatchSampler, MixedDataset, mixed_shares
from mtkd.datasets.synthetic import SYNTHETIC_CLASSES, make_synthetic
from mtkd.datasets.transforms import build_transforms, unletterbox_boxes
from mtkd.datasets.unlabeled import UnlabeledDataset, build_unlabeled_dataset
from mtkd.datasets.voc import VOCDataset
from mtkd.datasets.yolo import YOLODataset
from mtkd.errors import ConfigError
from mtkd.registry import FORMATS

__all__ = [
    "VOCDataset",
    "COCODataset",
    "YOLODataset",
    "RecordDataset",
    "UnlabeledDataset",
    "MixedDataset",
    "MixedBatchSampler",
    "mixed_shares",
    "make_synthetic",
    "SYNTHETIC_CLASSES",
    "collate",
    "build_dataset",
    "build_unlabeled",
    "infer_format",
    "build_transforms",
    "unletterbox_boxes",
]

_KEYS = {"format", "root", "train", "val", "test", "classes", "imgsz", "skip_bad", "cache", "augment", "mean", "std",
         "ann_file", "image_dir", "unlabeled", "unlabeled_ratio"}
_COCO_ONLY = {"ann_file", "image_dir"}


def build_dataset(data_cfg: Mapping[str, Any], split: str, train: bool, seed: Optional[int] = None) -> RecordDataset:
    """Dataset of one split from a ``data`` config section.

    ``split`` is the config key (``"train"``, ``"val"`` or ``"test"``); its
    value names the split in the data (defaults: the key itself). ``train``
    selects the augmenting transform; ``seed`` seeds it.
    """
    unknown = set(data_cfg) - _KEYS
    if unknown:
        raise ConfigError(f"data.{sorted(unknown)[0]}: unknown key (known: {', '.join(sorted(_KEYS))})")
    if split not in ("train", "val", "test"):
        raise ConfigError(f"data.{split}: split must be train, val or test")
    fmt = data_cfg.get("format")
    reader = FORMATS.get(fmt, "data.format")
    if not data_cfg.get("root"):
        raise ConfigError("data.root: missing")
    coco_only = sorted(k for k in _COCO_ONLY if data_cfg.get(k))
    if fmt != "coco" and coco_only:
        raise ConfigError(f"data.{coco_only[0]}: only used with format coco")
    classes = data_cfg.get("classes")
    if classes is not None and (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)):
        raise ConfigError(f"data.classes: must be a list of names or null, got {classes!r}")
    name = str(data_cfg.get(split) or split)
    transform = build_transforms(data_cfg, train=train, seed=seed)
    skip_bad = bool(data_cfg.get("skip_bad", False))
    common = {"classes": classes, "transform": transform, "skip_bad": skip_bad}
    cache = data_cfg.get("cache", False)
    if not isinstance(cache, bool):
        raise ConfigError(f"data.cache: expected true or false, got {cache!r}")
    extra = {k: data_cfg[k] for k in _COCO_ONLY if data_cfg.get(k)}
    ds: RecordDataset = reader(data_cfg["root"], name, **common, **extra)
    if cache:
        ds.enable_cache()
    return ds


def build_unlabeled(data_cfg: Mapping[str, Any], classes: Sequence[str],
                    seed: Optional[int] = None) -> Optional[UnlabeledDataset]:
    """The ``data.unlabeled`` images with the training transform, or ``None`` when unset.

    ``classes`` are the labelled training set's. The transform is seeded
    with ``seed + 1`` so its random draws differ from the labelled one's.
    """
    if data_cfg.get("unlabeled") is None:
        return None
    transform = build_transforms(data_cfg, train=True, seed=None if seed is None else seed + 1)
    return build_unlabeled_dataset(dict(data_cfg), classes, transform)


def infer_format(path: str | Path, key: str = "data.root", format_key: str = "data.format") -> Tuple[str, Path]:
    """``(format, root)`` of a dataset path, read from its layout.

    * a ``.yaml``/``.yml`` file -> ``yolo`` (the data yaml is the root);
    * a folder with ``Annotations/`` or ``JPEGImages/`` -> ``voc``;
    * a folder with ``annotations/*.json`` -> ``coco``;
    * a folder holding ``voc/`` (or ``coco/``, or ``yolo/data.yaml``), as
      ``mtkd make-synthetic`` writes it -> that layout, in this order.

    Raises a one-line ConfigError naming ``key`` (where the path came from)
    and the path when nothing matches, pointing at ``format_key``.
    """
    p = Path(path)
    if p.is_file() and p.suffix in (".yaml", ".yml"):
        return "yolo", p
    if not p.is_dir():
        raise ConfigError(f"{key} {p}: no such dataset folder or YOLO data yaml")
    if (p / "Annotations").is_dir() or (p / "JPEGImages").is_dir():
        return "voc", p
    if (p / "annotations").is_dir() and any((p / "annotations").glob("*.json")):
        return "coco", p
    for sub in ("voc", "coco"):
        if (p / sub).is_dir():
            return infer_format(p / sub, key, format_key)
    if (p / "yolo" / "data.yaml").is_file():
        return "yolo", p / "yolo" / "data.yaml"
    raise ConfigError(f"{key} {p}: not a VOC tree (Annotations/), COCO tree (annotations/*.json), "
                      f"YOLO data yaml or make-synthetic folder; pass {format_key}")
