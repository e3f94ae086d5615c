"""The optimizers of the auxiliary parameter groups that losses declare.

A loss declares what it trains apart from the student with
:meth:`mtkd.losses.base.Loss.aux_groups` (:class:`~mtkd.losses.base.AuxGroup`:
module, objective, optimizer settings, how often it steps);
:class:`AuxOptimizers` builds one optimizer per group and steps it. The
trainer owns one, created after its dry forward (lazy modules exist by then),
and steps it after the student's step with its grad scaler, optionally its
gradient clipping and LR schedule (``train.aux_grad_clip``,
``train.aux_schedule``); used alone (``AuxOptimizers([("", loss)])``) it
trains a loss's groups outside a run.

Under DDP each group's module is wrapped in its own
``DistributedDataParallel`` (rank 0's parameters broadcast at the start,
gradients averaged in the backward, unused parameters allowed), and the
objective runs as that wrapper's forward.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from mtkd.engine.distributed import DistInfo
from mtkd.errors import MtkdError
from mtkd.losses.base import AuxGroup


class _Objective(nn.Module):
    """A group's objective as a module over the group's module, so DDP can wrap it."""

    def __init__(self, group: AuxGroup):
        super().__init__()
        self.module = group.module
        object.__setattr__(self, "_compute", group.compute)

    def forward(self, student_out: Any, teacher_out: Any, batch: Any) -> Tuple[torch.Tensor, Dict[str, float]]:
        return self._compute(student_out, teacher_out, batch)


@contextlib.contextmanager
def _trainable(params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Every parameter requires grad inside (DDP registers only those at construction)."""
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def build_aux_optimizer(group: AuxGroup, params: List[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer ``group`` declares, over ``params``."""
    if group.optimizer == "sgd":
        return torch.optim.SGD(params, lr=group.lr, momentum=group.momentum, weight_decay=group.weight_decay,
                               nesterov=group.nesterov)
    cls = torch.optim.Adam if group.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=group.lr, betas=tuple(group.betas), weight_decay=group.weight_decay)


@dataclass
class _Entry:
    key: str
    prefix: str
    group: AuxGroup
    params: List[nn.Parameter]
    optimizer: torch.optim.Optimizer
    net: Optional[nn.Module]


class AuxOptimizers:
    """One optimizer per auxiliary group of ``losses`` (``(prefix, loss)`` pairs, e.g. the composer's
    ``modules_flat()``); a group's key is ``<prefix>/<name>`` (``<name>`` for an empty prefix)."""

    def __init__(self, losses: Sequence[Tuple[str, nn.Module]], dist: Optional[DistInfo] = None):
        self.entries: List[_Entry] = []
        for prefix, loss in losses:
            fn = getattr(loss, "aux_groups", None)
            for group in (fn() if fn is not None else []):
                params = list(group.module.parameters())
                key = f"{prefix}/{group.name}" if prefix else group.name
                net = None
                if dist is not None and dist.enabled:
                    ids = [dist.device.index] if dist.device.type == "cuda" else None
                    with _trainable(params):
                        net = nn.parallel.DistributedDataParallel(_Objective(group), device_ids=ids,
                                                                  find_unused_parameters=True)
                self.entries.append(_Entry(key, prefix, group, params, build_aux_optimizer(group, params), net))

    def __len__(self) -> int:
        return len(self.entries)

    def step(self, step: int, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
             batch: Dict[str, Any], scaler: Optional[torch.amp.GradScaler] = None, grad_clip: float = 0.0,
             lr_factor: float = 1.0) -> Dict[str, float]:
        """Step every group due at main step ``step`` (1-based) that is active, in declaration order.

        Each runs its objective (through its DDP wrapper when distributed),
        backward through ``scaler``, clips its gradient norm to ``grad_clip``
        when > 0, and steps at ``lr * lr_factor``. The caller calls
        ``scaler.update()`` afterwards. Returns the logged values, keyed
        ``<prefix>/<name>`` like the groups.
        """
        logs: Dict[str, float] = {}
        for e in self.entries:
            g, opt = e.group, e.optimizer
            if step % int(g.every) or not g.active():
                continue
            for pg in opt.param_groups:
                pg["lr"] = g.lr * lr_factor
            try:
                with torch.enable_grad():
                    loss, values = (e.net or g.compute)(student_out, teacher_out, batch)
                if len(list(g.module.parameters())) != len(e.params):
                    raise MtkdError(f"auxiliary group {e.key!r}: its module gained parameters after its "
                                    "optimizer was built (build AuxOptimizers after a forward of the losses)")
                opt.zero_grad(set_to_none=True)
                (scaler.scale(loss) if scaler is not None else loss).backward()
                if grad_clip > 0:
                    if scaler is not None:
                        scaler.unscale_(opt)
                    nn.utils.clip_grad_norm_(e.params, grad_clip)
                if scaler is not None:
                    scaler.step(opt)
                else:
                    opt.step()
            finally:
                opt.zero_grad(set_to_none=True)
                g.after()
            for k, v in values.items():
                logs[f"{e.prefix}/{k}" if e.prefix else k] = float(v)
        return logs

    def state_dict(self) -> Dict[str, Any]:
        """Each group's optimizer state, by key (tensors and plain types)."""
        return {e.key: e.optimizer.state_dict() for e in self.entries}

    def load_state_dict(self, state: Dict[str, Any], path: Any = "checkpoint") -> None:
        """Restore the groups' optimizers; each keeps its declared learning rate.
        A missing group is a one-line MtkdError naming ``path``."""
        missing = [e.key for e in self.entries if e.key not in state]
        if missing:
            raise MtkdError(f"{path}: has no optimizer state for the auxiliary group(s) {missing} "
                            "of this run's losses")
        for e in self.entries:
            try:
                e.optimizer.load_state_dict(state[e.key])
            except (ValueError, KeyError) as exc:
                raise MtkdError(f"{path}: optimizer state of auxiliary group {e.key!r} does not fit: "
                                f"{str(exc).strip().splitlines()[0]}") from None
            for pg in e.optimizer.param_groups:
                pg["lr"] = e.group.lr
