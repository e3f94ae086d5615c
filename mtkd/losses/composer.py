"""Weighted composition of hard, soft and extra loss terms.

As users of multi-task KD know it::

    det   = (1 - alpha_det) * hard_det + alpha_det * soft_det
    seg   = (1 - alpha_seg) * hard_seg + alpha_seg * soft_seg
    total = ratio_det * det + ratio_seg * seg + sum_i weight_i * extra_i

``soft_task`` is the weighted sum of that task's soft (distillation) terms.
Without a teacher, soft and extra terms that require one are dropped and
alpha is treated as 0, so the same config trains a plain student.

Config shape (``loss:`` section)::

    det:   {ratio: 1.0, alpha: 0.5, hard: {name: yolo_det}, soft: [{name: det_mse, weight: 1.0}]}
    seg:   {ratio: 1.0, alpha: 0.5, hard: {name: seg_ce},   soft: [{name: seg_kl, weight: 1.0, T: 2}]}
    extra: [{name: cwd, weight: 1.0}, ...]

Every term is logged on its own under ``<task>/hard``, ``<task>/soft/<label>``,
``extra/<label>`` (and ``.../<sub>`` for losses returning dicts). A term's
label is its loss name unless the entry gives ``as: <label>``, which lets one
loss appear twice in a section (e.g. ``extra: [{name: cwd, layers: [p3]},
{name: cwd, as: cwd_p5, layers: [p5]}]``); two entries of one section with
the same label are a ConfigError naming the second (its module and
checkpoint keys are the label too).
"""
from __future__ import annotations

import itertools
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from mtkd.errors import ConfigError
from mtkd.losses.base import LossValue, build_loss

TASKS = ("det", "seg")


def _sum_value(value: LossValue, prefix: str, logs: Dict[str, torch.Tensor]) -> torch.Tensor:
    if isinstance(value, dict):
        total = None
        for k, v in value.items():
            logs[f"{prefix}/{k}"] = v.detach()
            total = v if total is None else total + v
        if total is None:
            raise ValueError(f"{prefix}: loss returned an empty dict")
        logs[prefix] = total.detach()
        return total
    logs[prefix] = value.detach()
    return value


def _spec(entry: Any, key: str) -> Tuple[str, str, float, Dict[str, Any]]:
    """``(name, label, weight, kwargs)`` of one loss entry; ``label`` is ``as`` or the name."""
    if isinstance(entry, str):
        return entry, entry, 1.0, {}
    if not isinstance(entry, dict) or "name" not in entry:
        raise ConfigError(f"{key}: expected a loss name or a mapping with 'name'")
    kwargs = dict(entry)
    name = kwargs.pop("name")
    weight = float(kwargs.pop("weight", 1.0))
    label = kwargs.pop("as", name)
    if not isinstance(label, str) or not label or "." in label or "/" in label:
        raise ConfigError(f"{key}.as: expected a non-empty label without '.' or '/', got {label!r}")
    return name, label, weight, kwargs


def _check_unique(labels: List[str], label: str, key: str, section: str) -> None:
    """A ConfigError for ``key`` if an earlier entry of ``section`` has the label ``label``."""
    if label in labels:
        first = f"{section}[{labels.index(label)}]"
        raise ConfigError(f"{key}: duplicate loss label {label!r} (also {first}); "
                          f"give one of them 'as: <label>'")
    labels.append(label)


class LossComposer(nn.Module):
    """Holds every loss of a run and combines them; knows no loss by name."""

    def __init__(self, cfg: Dict[str, Any], with_teacher: bool):
        super().__init__()
        self.with_teacher = with_teacher
        self.ratio: Dict[str, float] = {}
        self.alpha: Dict[str, float] = {}
        self.hard = nn.ModuleDict()
        self.soft = nn.ModuleDict()
        self.soft_weights: Dict[str, Dict[str, float]] = {}
        self.extra = nn.ModuleDict()
        self.extra_weights: Dict[str, float] = {}
        known = set(TASKS) | {"extra"}
        for k in cfg:
            if k not in known:
                raise ConfigError(f"loss.{k}: unknown key; expected one of {sorted(known)}")
        for task in TASKS:
            tcfg = dict(cfg.get(task) or {})
            for k in tcfg:
                if k not in ("ratio", "alpha", "hard", "soft"):
                    raise ConfigError(f"loss.{task}.{k}: unknown key")
            self.ratio[task] = float(tcfg.get("ratio", 1.0))
            alpha = float(tcfg.get("alpha", 0.0))
            if not 0.0 <= alpha <= 1.0:
                raise ConfigError(f"loss.{task}.alpha: must be in [0, 1], got {alpha}")
            if tcfg.get("hard"):
                name, _, _, kw = _spec(tcfg["hard"], f"loss.{task}.hard")
                self.hard[task] = build_loss(name, f"loss.{task}.hard", **kw)
            soft = nn.ModuleDict()
            weights: Dict[str, float] = {}
            labels: List[str] = []
            for i, entry in enumerate(tcfg.get("soft") or []):
                key = f"loss.{task}.soft[{i}]"
                name, label, w, kw = _spec(entry, key)
                _check_unique(labels, label, key, f"loss.{task}.soft")
                mod = build_loss(name, key, **kw)
                if self._usable(mod):
                    soft[label] = mod
                    weights[label] = w
            self.soft[task] = soft
            self.soft_weights[task] = weights
            self.alpha[task] = alpha if len(soft) else 0.0
        labels = []
        for i, entry in enumerate(cfg.get("extra") or []):
            key = f"loss.extra[{i}]"
            name, label, w, kw = _spec(entry, key)
            _check_unique(labels, label, key, "loss.extra")
            mod = build_loss(name, key, **kw)
            if self._usable(mod):
                self.extra[label] = mod
                self.extra_weights[label] = w
        crafting = [prefix for prefix, m in self.modules_flat() if "adv_split" in getattr(m, "requires", ())]
        if len(crafting) > 1:
            raise ConfigError(f"loss: {crafting[0]} and {crafting[1]} both craft adversarial images "
                              "(batch['adv_images']); keep one adversarial loss per run")

    def _usable(self, mod: nn.Module) -> bool:
        return self.with_teacher or "teacher" not in getattr(mod, "requires", ())

    # -- declarations, aggregated ------------------------------------------------
    def modules_flat(self) -> List[Tuple[str, nn.Module]]:
        out = [(f"{t}/hard", m) for t, m in self.hard.items()]
        out += [(f"{t}/soft/{n}", m) for t, d in self.soft.items() for n, m in d.items()]
        out += [(f"extra/{n}", m) for n, m in self.extra.items()]
        return out

    @property
    def requires(self) -> frozenset:
        req: set = set()
        for _, m in self.modules_flat():
            req |= set(getattr(m, "requires", ()))
        return frozenset(req)

    def student_parameters(self) -> Iterable[nn.Parameter]:
        gens = []
        for _, m in self.modules_flat():
            fn = getattr(m, "student_parameters", None)
            gens.append(fn() if fn is not None else m.parameters())
        return itertools.chain(*gens)

    def bind(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        for _, m in self.modules_flat():
            fn = getattr(m, "bind", None)
            if fn is not None:
                fn(student, teacher)

    def bind_input(self, mean: Optional[Any], std: Optional[Any]) -> None:
        for _, m in self.modules_flat():
            fn = getattr(m, "bind_input", None)
            if fn is not None:
                fn(mean, std)

    @property
    def adv_split(self) -> bool:
        """Whether a loss crafts ``batch["adv_images"]`` and wants the student's forward split."""
        return "adv_split" in self.requires

    def pre_step(self, batch: Dict[str, Any], student: nn.Module, teacher: Optional[nn.Module]) -> Dict[str, Any]:
        """Every loss's ``pre_step`` in turn (before the forward); returns the batch they leave."""
        for _, m in self.modules_flat():
            fn = getattr(m, "pre_step", None)
            if fn is not None:
                batch = fn(batch, student, teacher)
        return batch

    # -- the step ------------------------------------------------------------------
    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        logs: Dict[str, torch.Tensor] = {}
        total: Optional[torch.Tensor] = None
        for task in TASKS:
            if task not in self.hard and not len(self.soft[task]):
                continue
            alpha = self.alpha[task]
            parts = []
            if task in self.hard and alpha < 1.0:
                hard = _sum_value(self.hard[task](student_out, teacher_out, batch), f"{task}/hard", logs)
                parts.append((1.0 - alpha) * hard)
            if len(self.soft[task]) and alpha > 0.0:
                soft = None
                for name, mod in self.soft[task].items():
                    v = _sum_value(mod(student_out, teacher_out, batch), f"{task}/soft/{name}", logs)
                    v = self.soft_weights[task][name] * v
                    soft = v if soft is None else soft + v
                logs[f"{task}/soft"] = soft.detach()
                parts.append(alpha * soft)
            if not parts:
                continue
            task_loss = sum(parts)
            logs[task] = task_loss.detach()
            term = self.ratio[task] * task_loss
            total = term if total is None else total + term
        for name, mod in self.extra.items():
            v = _sum_value(mod(student_out, teacher_out, batch), f"extra/{name}", logs)
            term = self.extra_weights[name] * v
            total = term if total is None else total + term
        if total is None:
            raise ConfigError("loss: no loss term is active; configure loss.det/loss.seg")
        logs["total"] = total.detach()
        return total, logs

    def aux_step(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                 batch: Dict[str, Any]) -> Dict[str, float]:
        logs: Dict[str, float] = {}
        for prefix, m in self.modules_flat():
            fn = getattr(m, "aux_step", None)
            if fn is not None:
                for k, v in (fn(student_out, teacher_out, batch) or {}).items():
                    logs[f"{prefix}/{k}"] = float(v)
        return logs

    def extra_state(self) -> Dict[str, Any]:
        state = {}
        for prefix, m in self.modules_flat():
            fn = getattr(m, "extra_state", None)
            s = fn() if fn is not None else {}
            if s:
                state[prefix] = s
        return state

    def load_extra_state(self, state: Dict[str, Any]) -> None:
        for prefix, m in self.modules_flat():
            if prefix in state and hasattr(m, "load_extra_state"):
                m.load_extra_state(state[prefix])
