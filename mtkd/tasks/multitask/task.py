"""The ``multitask`` task: detection + segmentation on VOC/COCO/YOLO/synthetic data."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from mtkd.engine.tasks import register_task
from mtkd.errors import ConfigError


def model_kwargs(model_cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The ``model:`` section without its null entries (null = the preset's value) and without
    ``init`` (starting weights, which the trainer loads; see :func:`mtkd.engine.trainer.init_model`)."""
    return {k: v for k, v in model_cfg.items() if v is not None and k != "init"}


@register_task("multitask")
class MultiTaskTask:
    """Detection + segmentation on VOC/COCO/YOLO/synthetic data (mtkd.datasets, mtkd.models).

    The default best-checkpoint score is the mean of the ``map50`` and
    ``miou`` metrics that are present (a detection-only or segmentation-only
    model is scored on its one metric).
    """

    name = "multitask"

    def build_dataset(self, cfg: Dict[str, Any], split: str, train: bool) -> Any:
        from mtkd.datasets import build_dataset

        data = {k: v for k, v in cfg["data"].items() if v is not None}
        return build_dataset(data, split, train, seed=cfg["seed"] if train else None)

    def build_unlabeled(self, cfg: Dict[str, Any], labeled: Any) -> Optional[Any]:
        from mtkd.datasets import build_unlabeled

        data = {k: v for k, v in cfg["data"].items() if v is not None}
        return build_unlabeled(data, labeled.classes, seed=cfg["seed"])

    def collate(self, items: List[Any]) -> Dict[str, Any]:
        from mtkd.datasets import collate

        return collate(items)

    def normalisation(self, cfg: Dict[str, Any]) -> tuple:
        """``(mean, std)``: ``data.mean``/``data.std``, ImageNet's where null (as the transforms do)."""
        from mtkd.datasets.transforms import IMAGENET_MEAN, IMAGENET_STD

        data = cfg["data"]
        mean = data.get("mean") if data.get("mean") is not None else IMAGENET_MEAN
        std = data.get("std") if data.get("std") is not None else IMAGENET_STD
        return [float(v) for v in mean], [float(v) for v in std]

    def build_model(self, cfg: Dict[str, Any], num_classes: int) -> nn.Module:
        from mtkd.models import build_model

        if cfg["eval"].get("attack") is not None:
            raise ConfigError("eval.attack: robust validation scores classifiers (task: classify); "
                              "score a multi-task model's robustness with mtkd attack")
        model = build_model(model_kwargs(cfg["model"]), num_classes)
        seg, size = getattr(model, "seg_head", None), cfg["data"]["imgsz"]
        if seg is not None and isinstance(size, int) and (seg.classifier.in_channels // 32) * (size // 32) ** 2 < 2:
            # GroupNorm(32) of the seg head on the stride-32 map: one value per group normalises to 0
            raise ConfigError(f"data.imgsz: {size} is too small for a segmentation head of "
                              f"{seg.classifier.in_channels} channels (its stride-32 map is 1x1, one value per "
                              "GroupNorm group); use data.imgsz >= 64 or model.seg_channels >= 64")
        return model

    def build_teacher(self, cfg: Dict[str, Any], num_classes: int, student: nn.Module) -> Optional[nn.Module]:
        tcfg = cfg["teacher"]
        if tcfg.get("ckpt") is None and tcfg.get("composite") is None:
            return None
        from mtkd.teachers import load_teacher

        return load_teacher(tcfg, num_classes, student=student)

    def evaluate(self, model: nn.Module, loader: Any, dataset: Any, cfg: Dict[str, Any],
                 device: torch.device, amp: bool) -> Dict[str, float]:
        from mtkd.tasks.multitask.evaluation import evaluate

        e = cfg["eval"]
        return evaluate(model, loader, dataset, conf=e["conf"], iou=e["iou"], max_det=e["max_det"],
                        device=device, amp=amp, max_batches=e["max_batches"])

    def fitness(self, metrics: Dict[str, float]) -> float:
        parts = [metrics[k] for k in ("map50", "miou") if k in metrics]
        if not parts:
            raise ConfigError("train.save_best_on: fitness needs map50 or miou in the val metrics")
        return sum(parts) / len(parts)

    def model_info(self, model: nn.Module, cfg: Dict[str, Any]) -> Dict[str, float]:
        from mtkd.models.info import model_info

        return model_info(model, cfg["data"]["imgsz"])

    def draw_val(self, model: nn.Module, dataset: Any, path: Path, cfg: Dict[str, Any],
                 device: torch.device, n: int = 4) -> None:
        from mtkd.tasks.multitask.plots import draw_val

        draw_val(model, dataset, path, cfg, device, n)

    def predict(self, model: nn.Module, source: Path, out: Path, classes: List[str],
                cfg: Dict[str, Any], device: torch.device) -> Any:
        from mtkd.tasks.multitask.predict import predict_folder

        d = cfg["data"]
        return predict_folder(model, source, out, classes, imgsz=d["imgsz"], mean=d["mean"], std=d["std"],
                              conf=cfg["eval"]["predict_conf"], iou=cfg["eval"]["iou"], device=device,
                              skip_bad=bool(d.get("skip_bad", False)))
