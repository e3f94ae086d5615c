"""The ``classify`` task: ImageFolder classification for the generic trainer.

Config (keys of ``mtkd/configs/defaults.yaml``, read as follows):

* ``data.format: imagefolder``; ``data.root`` holds the split folders named by
  ``data.train`` / ``data.val`` / ``data.test`` (the val folder stands in for
  a missing test folder); ``data.classes`` (null = the train folder's
  sub-folders); ``data.imgsz``; ``data.mean`` / ``data.std`` (null = computed
  from the training images and written back into the run's config, so
  ``config.yaml`` and the checkpoints record them for ``predict``);
  ``data.augment`` (``scale``, ``hflip``, ``enabled``); ``data.skip_bad``.
* ``model.preset: student`` -> the 4-block CNN (``cnn4``); ``model.backbone``
  -> any torchvision/timm classifier name instead (see
  :mod:`mtkd.tasks.classify.models`); ``model.pretrained`` (false, true for
  timm's weights, or a state dict path); the multi-task model keys must stay null.
* ``teacher.model: {name: densenet121, pretrained: false, <constructor
  kwargs>}`` (``backbone`` is accepted for ``name``; default
  ``densenet121``), ``teacher.ckpt`` (a user checkpoint, which replaces
  every weight; without it the teacher keeps its ``pretrained`` init:
  random by default), ``teacher.trust_pickle``.
* Losses: classification terms go in ``loss.extra`` (the composer's
  alpha/ratio sections are ``det``/``seg``), e.g. ``extra: [{name: ce,
  weight: 0.3}, {name: st, weight: 0.7, T: 4}]`` is Hinton's
  ``(1 - alpha) CE + alpha KD`` with alpha 0.7; set ``det``/``seg`` to ``{}``.

Metrics: ``top1``, ``top5`` (top-k with k = min(5, classes)) in percent,
and the mean cross-entropy ``loss``; the best-checkpoint ``fitness`` is top1.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from mtkd.engine.tasks import register_task
from mtkd.errors import ConfigError, writing
from mtkd.pretrained import check_pretrained
from mtkd.tasks.classify.data import (ImageFolderDataset, build_transform, collate, compute_mean_std,
                                      find_classes)
from mtkd.tasks.classify.evaluation import eval_attack, evaluate
from mtkd.tasks.classify.models import STUDENT, build_classifier, load_weights
from mtkd.tasks.classify.plots import draw_val
from mtkd.tasks.classify.predict import predict_folder

#: Multi-task ``model:`` keys that mean nothing to a classifier (must stay null).
_DENSE_MODEL_KEYS = ("neck_channels", "neck_depth", "head_channels", "reg_max", "seg_channels", "seg_c2",
                     "det", "seg")


def _split_folder(data: Dict[str, Any], split: str) -> Path:
    if split not in ("train", "val", "test"):
        raise ConfigError(f"data: unknown split {split!r}")
    root = Path(data["root"])
    folder = root / str(data[split])
    if split == "test" and not folder.is_dir():
        folder = root / str(data["val"])
    return folder


@register_task("classify")
class ClassifyTask:
    """ImageFolder classification for the generic trainer (see the module doc)."""

    name = "classify"

    # -- data ----------------------------------------------------------------------
    @staticmethod
    def classes(cfg: Dict[str, Any]) -> List[str]:
        data = cfg["data"]
        if data.get("classes"):
            return list(data["classes"])
        return find_classes(_split_folder(data, "train"))

    @staticmethod
    def normalisation(cfg: Dict[str, Any]) -> tuple:
        """``(mean, std)``; computed from the training images when null, and
        stored back into ``cfg["data"]``."""
        data = cfg["data"]
        if data.get("mean") is None or data.get("std") is None:
            mean, std = compute_mean_std(_split_folder(data, "train"), int(data["imgsz"]))
            data["mean"] = data["mean"] if data.get("mean") is not None else mean
            data["std"] = data["std"] if data.get("std") is not None else std
        return data["mean"], data["std"]

    def build_dataset(self, cfg: Dict[str, Any], split: str, train: bool) -> ImageFolderDataset:
        data = cfg["data"]
        if data.get("format") != "imagefolder":
            raise ConfigError(f"data.format: the classify task reads 'imagefolder', got {data.get('format')!r}")
        mean, std = self.normalisation(cfg)
        transform = build_transform(int(data["imgsz"]), mean, std, data.get("augment", {}) if train else None)
        return ImageFolderDataset(_split_folder(data, split), self.classes(cfg), transform,
                                  skip_bad=bool(data.get("skip_bad", False)))

    def collate(self, items: List[Any]) -> Dict[str, Any]:
        return collate(items)

    # -- models ----------------------------------------------------------------------
    def build_model(self, cfg: Dict[str, Any], num_classes: int) -> nn.Module:
        eval_attack(cfg["eval"])  # a bad eval.attack fails before training, not at the first validation
        m = cfg["model"]
        for key in _DENSE_MODEL_KEYS:
            if m.get(key) is not None:
                raise ConfigError(f"model.{key}: not used by the classify task; leave it null")
        pretrained = False if m.get("pretrained") is None else m["pretrained"]
        if m.get("backbone"):
            return build_classifier(str(m["backbone"]), num_classes, pretrained=pretrained)
        if m.get("preset") == "student":
            return build_classifier(STUDENT, num_classes, pretrained=pretrained)
        raise ConfigError(f"model.preset: the classify task knows 'student' ({STUDENT}); "
                          "give model.backbone for any torchvision/timm classifier")

    def build_teacher(self, cfg: Dict[str, Any], num_classes: int,
                      student: Optional[nn.Module] = None) -> Optional[nn.Module]:
        """The teacher classifier, built for ``num_classes`` outputs like the
        student (a checkpoint trained for another class count fails to load,
        naming the file); ``student`` is not needed beyond that."""
        t = cfg["teacher"]
        if t.get("composite") is not None:
            raise ConfigError("teacher.composite: not used by the classify task")
        spec = dict(t.get("model") or {})
        if t.get("ckpt") is None and not spec:
            return None
        name = spec.pop("name", None) or spec.pop("backbone", None) or "densenet121"
        pretrained = spec.pop("pretrained", None)
        pretrained = check_pretrained(False if pretrained is None else pretrained, "teacher.model.pretrained")
        if t.get("ckpt") is not None:
            pretrained = False  # the checkpoint replaces every weight: nothing to fetch or read first
        try:
            model = build_classifier(str(name), num_classes, pretrained=pretrained,
                                     pretrained_key="teacher.model.pretrained", **spec)
        except ConfigError as exc:
            msg = str(exc)
            raise ConfigError(msg if msg.startswith("teacher.") else f"teacher.model: {msg}") from None
        if t.get("ckpt") is not None:
            load_weights(model, t["ckpt"], trust_pickle=bool(t.get("trust_pickle", False)))
        return model

    # -- evaluation --------------------------------------------------------------------
    def evaluate(self, model: nn.Module, loader: Any, dataset: Any, cfg: Dict[str, Any],
                 device: torch.device, amp: bool) -> Dict[str, float]:
        attack = eval_attack(cfg["eval"])
        mean, std = self.normalisation(cfg) if attack is not None else (None, None)
        return evaluate(model, loader, dataset, device, cfg["eval"].get("max_batches"), attack, mean, std,
                        int(cfg.get("seed") or 0))

    def fitness(self, metrics: Dict[str, float]) -> float:
        return metrics["top1"]

    def model_info(self, model: nn.Module, cfg: Dict[str, Any]) -> Dict[str, float]:
        from mtkd.models.info import model_info

        return model_info(model, int(cfg["data"]["imgsz"]))

    def draw_val(self, model: nn.Module, dataset: Any, path: Path, cfg: Dict[str, Any],
                 device: torch.device, n: int = 8) -> None:
        mean, std = self.normalisation(cfg)
        draw_val(model, dataset, path, mean, std, int(cfg["data"]["imgsz"]), device, n)

    def predict(self, model: nn.Module, source: Path, out: Path, classes: List[str],
                cfg: Dict[str, Any], device: torch.device) -> List[str]:
        """Write ``out/predictions.txt`` (``file class prob`` per line) and return the lines."""
        data = cfg["data"]
        if data.get("mean") is None or data.get("std") is None:
            raise ConfigError("data.mean/data.std: needed for predict (the training run's config.yaml has them)")
        lines = predict_folder(model, source, classes, int(data["imgsz"]), data["mean"], data["std"], device,
                               skip_bad=bool(data.get("skip_bad", False)))
        out = Path(out)
        with writing(out / "predictions.txt"):
            out.mkdir(parents=True, exist_ok=True)
            (out / "predictions.txt").write_text("".join(line + "\n" for line in lines))
        return lines
