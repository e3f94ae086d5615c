"""The loss interface and its registration.

A loss is a small ``nn.Module`` whose ``forward(student_out, teacher_out,
batch)`` returns a scalar tensor, or a dict of named scalar tensors whose sum
is the loss (each logged on its own). ``teacher_out`` is ``None`` when no
teacher is used.

Trainable parts (adapters, VID's variances, AFD's attention) are submodules, so
their parameters reach the student's optimizer through ``composer.parameters()``.

A loss registers itself with ``@register("name")`` (:data:`mtkd.registry.LOSSES`).

Everything else a loss needs it declares; the trainer reads these declarations
and never names a loss:

* ``requires``: a set of capability strings
    - ``"teacher"``: needs ``teacher_out`` (a KD loss);
    - ``"teacher_grad"``: the teacher's forward must keep its graph (no
      ``no_grad``), e.g. losses that differentiate through the teacher;
    - ``"input_grad"``: ``batch["images"]`` must have ``requires_grad`` before
      the student's forward (Sobolev, LwM);
    - ``"adv_split"``: the loss crafts ``batch["adv_images"]`` in ``pre_step``;
      the trainer then runs one student forward on ``cat([images,
      adv_images])`` and splits it: ``student_out`` is the clean half and
      ``student_out["adv"]`` the adversarial one (at most one such loss per run);
    - ``"adv_teacher"``: with ``"adv_split"``, the teacher's forward is split
      the same way (``teacher_out["adv"]``);
  and any batch key (e.g. ``"index"`` for CRD) the loss reads.
* ``pre_step(batch, student, teacher) -> batch``: called before the forward
  of every step (and of the trainer's dry forward), with the unwrapped student
  (not DDP's wrapper) and the teacher; returns the batch, possibly with keys
  added (adversarial losses add ``"adv_images"``). Default: the batch as it is.
* ``bind_input(mean, std)``: called once by the trainer with the input
  normalisation (``x_norm = (x - mean) / std`` for ``x`` in 0..1 pixels;
  ``None`` when the task has none), for losses that perturb images in pixel
  space.
* ``aux_groups() -> list of AuxGroup``: parameters the loss trains apart
  from the student (a GAN discriminator, FT's paraphraser, DML's peer), each
  with its optimizer settings and its own objective (:class:`AuxGroup`). The
  trainer builds their optimizers (:class:`mtkd.engine.aux.AuxOptimizers`),
  steps them after the student's step, checkpoints their state and, under
  DDP, wraps each group's module in its own ``DistributedDataParallel``.
  Called after the trainer's dry forward, so lazily built modules exist.
* ``aux_step(student_out, teacher_out, batch) -> dict``: called once after the
  main step and the auxiliary groups' steps, with detached outputs; returns
  values to log (e.g. the cost of an adversarial attack).
* ``extra_state() / load_extra_state(state)``: state outside ``state_dict``
  (DML's peer), checkpointed with the run. Must hold only tensors/plain types
  so checkpoints load with ``weights_only=True``.
* ``student_parameters()``: the parameters that join the student's
  optimizer (default: this module's parameters outside its auxiliary
  groups).
* ``bind(student, teacher)``: called once by the trainer after the models are
  built, for losses that must run a model themselves (BSS's attack on the
  teacher, DML's peer fed the same images). Keep references out of
  ``state_dict`` (store them in a plain list or with ``object.__setattr__``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

from mtkd.errors import ConfigError
from mtkd.registry import LOSSES

LossValue = Union[torch.Tensor, Dict[str, torch.Tensor]]

#: ``compute(student_out, teacher_out, batch) -> (loss, logs)`` of an auxiliary group.
AuxObjective = Callable[[Dict[str, Any], Optional[Dict[str, Any]], Dict[str, Any]],
                        Tuple[torch.Tensor, Dict[str, float]]]

AUX_OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass
class AuxGroup:
    """A parameter group a loss trains apart from the student (:meth:`Loss.aux_groups`).

    * ``module`` holds the parameters (all of them, frozen ones included,
      join the group's optimizer; under DDP it is wrapped on its own).
    * ``compute(student_out, teacher_out, batch)`` returns the group's loss
      and values to log; it is called with detached outputs after the
      student's step, outside autocast, and may switch the module's
      ``requires_grad`` on for its step (``after`` then switches it off).
    * ``optimizer``: ``adam`` / ``adamw`` (``betas``) or ``sgd``
      (``momentum``, ``nesterov``), at learning rate ``lr`` with
      ``weight_decay`` on every parameter of the group.
    * The group steps at main steps ``every``, ``2 * every``, ... while
      ``active()`` holds; ``after()`` runs once each such step is over (also
      when it raised).
    """

    name: str
    module: nn.Module
    compute: AuxObjective
    optimizer: str = "adam"
    lr: float = 1e-3
    betas: Tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    every: int = 1
    active: Callable[[], bool] = lambda: True
    after: Callable[[], None] = lambda: None

    def __post_init__(self) -> None:
        if self.optimizer not in AUX_OPTIMIZERS:
            raise ConfigError(f"aux group {self.name!r}: optimizer: expected one of {list(AUX_OPTIMIZERS)}, "
                              f"got {self.optimizer!r}")
        if int(self.every) < 1:
            raise ConfigError(f"aux group {self.name!r}: every: must be >= 1, got {self.every}")


class Loss(nn.Module):
    """Base class: declarations with safe defaults. Subclasses set ``requires``
    and implement ``forward``."""

    requires: frozenset = frozenset()

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> LossValue:  # pragma: no cover - abstract
        raise NotImplementedError

    def student_parameters(self) -> Iterable[nn.Parameter]:
        aux = {id(p) for group in self.aux_groups() for p in group.module.parameters()}
        return (p for p in self.parameters() if id(p) not in aux)

    def bind(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        return None

    def bind_input(self, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]) -> None:
        return None

    def pre_step(self, batch: Dict[str, Any], student: nn.Module, teacher: Optional[nn.Module]) -> Dict[str, Any]:
        return batch

    def aux_groups(self) -> List[AuxGroup]:
        return []

    def aux_step(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                 batch: Dict[str, Any]) -> Dict[str, float]:
        return {}

    def extra_state(self) -> Dict[str, Any]:
        return {}

    def load_extra_state(self, state: Dict[str, Any]) -> None:
        return None


def register(name: str) -> Callable[[Type[nn.Module]], Type[nn.Module]]:
    """Class decorator: ``@register("seg_kl")`` adds the loss to :data:`mtkd.registry.LOSSES`
    (and sets its ``registry_name``)."""

    def deco(cls: Type[nn.Module]) -> Type[nn.Module]:
        LOSSES.register(name)(cls)
        cls.registry_name = name
        return cls

    return deco


def available() -> List[str]:
    return LOSSES.names()


def build_loss(name: str, key: str = "loss", /, **kwargs: Any) -> nn.Module:
    """Build a registered loss; ``key`` names the config entry for errors."""
    cls = LOSSES.get(name, key)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{key}: bad arguments for loss {name!r}: {exc}") from None
