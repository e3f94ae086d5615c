"""Tasks: the task-specific parts of a run, behind one small interface.

The :class:`~mtkd.engine.trainer.Trainer` is generic; whatever depends on
*what* is learnt (which dataset reader, which model, how to score it, how to
draw a prediction) comes from a task object, looked up by the config's
``task`` name. A task implements :class:`Task`; it registers itself with
``@register_task("name")`` in :data:`mtkd.registry.TASKS`, whose
``locations`` name the modules that define tasks (the packages under
:mod:`mtkd.tasks`, imported on the first lookup); adding a task needs no
change to the trainer.

Every task's batches are dicts with at least ``"images"`` (the model input);
its models take that tensor and return a dict the task's losses understand.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Protocol, Type

import torch
from torch import nn

from mtkd.registry import TASKS


class Task(Protocol):
    """What the trainer, the evaluator CLI and the predictor need from a task."""

    name: str

    def build_dataset(self, cfg: Dict[str, Any], split: str, train: bool) -> Any:
        """The dataset of ``split`` (``train``/``val``/``test``); it has ``.classes``."""

    def collate(self, items: List[Any]) -> Dict[str, Any]:
        """Items of the dataset -> a batch dict with ``"images"``."""

    # Optional: without it, ``data.mean``/``data.std`` are read as they are.
    def normalisation(self, cfg: Dict[str, Any]) -> tuple:
        """``(mean, std)`` of the model input: ``x_norm = (x - mean) / std`` for ``x`` in 0..1 pixels
        (what attacks and adversarial losses need to work in pixel space)."""

    # Optional: tasks without it reject ``data.unlabeled``.
    def build_unlabeled(self, cfg: Dict[str, Any], labeled: Any) -> Optional[Any]:
        """Images of ``data.unlabeled`` as training items without labels, or ``None`` when unset."""

    def build_model(self, cfg: Dict[str, Any], num_classes: int) -> nn.Module:
        """The (student) model of ``cfg["model"]``, randomly initialised."""

    def build_teacher(self, cfg: Dict[str, Any], num_classes: int, student: nn.Module) -> Optional[nn.Module]:
        """The teacher of ``cfg["teacher"]`` (checked against ``student``), or ``None`` for plain training."""

    def evaluate(self, model: nn.Module, loader: Any, dataset: Any, cfg: Dict[str, Any],
                 device: torch.device, amp: bool) -> Dict[str, float]:
        """Metrics of ``model`` on ``dataset`` (higher is better for the best-checkpoint metric)."""

    def fitness(self, metrics: Dict[str, float]) -> float:
        """The default best-checkpoint score (``train.save_best_on: fitness``)."""

    def model_info(self, model: nn.Module, cfg: Dict[str, Any]) -> Dict[str, float]:
        """``{"params", "gflops", "latency_ms"}``."""

    def draw_val(self, model: nn.Module, dataset: Any, path: Path, cfg: Dict[str, Any],
                 device: torch.device) -> None:
        """Write a picture of predictions on a few images of ``dataset`` to ``path``."""

    def predict(self, model: nn.Module, source: Path, out: Path, classes: List[str],
                cfg: Dict[str, Any], device: torch.device) -> Any:
        """Predict image file ``source``, or every image of folder ``source``, into folder ``out``
        (with ``data.skip_bad`` a bad image is skipped with a warning naming it)."""


def register_task(name: str) -> Callable[[Type], Type]:
    """Class decorator: ``@register_task("multitask")`` adds the task to :data:`mtkd.registry.TASKS`
    (and sets its ``name``)."""

    def deco(cls: Type) -> Type:
        TASKS.register(name)(cls)
        cls.name = name
        return cls

    return deco


def available_tasks() -> List[str]:
    return TASKS.names()


def get_task(name: str) -> Task:
    """A new task object for the config's ``task`` name."""
    return TASKS.get(name, "task")()
