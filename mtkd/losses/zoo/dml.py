"""DML: deep mutual learning (two networks).

Zhang et al., "Deep Mutual Learning", CVPR 2018,
https://zpascal.net/cvpr2018/Zhang_Deep_Mutual_Learning_CVPR_2018_paper.pdf

Reference (AberHu/Knowledge-Distillation-Zoo ``kd_losses/dml.py`` and
``train_dml.py``): ``DML()(out1, out2) = KL(softmax(out2) || softmax(out1))``
with reduction 'batchmean' (no temperature). Both networks see the same
images; each is trained with ``CE + lambda * DML(own, other.detach())`` by its
own SGD optimiser (lr 0.1, momentum 0.9, weight decay 1e-4, Nesterov), both
using the other's output from the same (pre-step) forward.

Here the student is net1: this loss is its DML term (its weight is the
composer's weight) and it owns net2, the *peer*:

* ``bind`` makes the peer as a deep copy of the student with every
  submodule's ``reset_parameters()`` re-run (``reinit=True``; identical
  copies would receive identical updates), kept out of this module's
  parameters and ``state_dict``;
* ``forward`` runs the peer on ``batch["images"]`` (keeping its graph) and
  returns ``DML(student, peer.detach())``;
* the peer is the auxiliary group ``peer`` (:meth:`DMLLoss.aux_groups`,
  SGD with ``lr``, ``momentum``, ``weight_decay``, ``nesterov``): after the
  student's step the trainer trains it on that cached output with
  ``hard + peer_kd_weight * DML(peer, student.detach())`` (on several
  processes DDP averages the peer's gradients);
  ``hard`` is the weighted sum of the registered losses in ``peer_hard``
  (names or ``{name, weight, ...}`` mappings, called as
  ``loss(peer_out, None, batch)``), by default ``ce`` on classifiers and
  ``seg_ce`` on dense models (the peer then learns segmentation only; add
  the detection loss to ``peer_hard`` to train its head too);
* ``extra_state`` holds the peer's weights (tensors only, so checkpoints
  load with ``weights_only=True``); the trainer checkpoints its optimiser.

Logits: ``out["logits"]`` (B, C) for classifiers; on dense models the
segmentation logits per pixel ((B,K,H,W) -> (B*H*W, K), so 'batchmean' is
the mean over pixels), with ``ignore_void=True`` dropping VOID pixels. The
peer trains at the constant ``lr`` unless ``train.aux_schedule`` applies the
run's learning-rate schedule to it (as the reference schedules both nets).
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from mtkd.errors import ConfigError
from mtkd.losses._functional import soft_kl
from mtkd.losses.base import AuxGroup, Loss, build_loss, register
from mtkd.losses.zoo._adapt import get_output, logit_pair, zero_like_graph


class DML(nn.Module):
    """Tensor core: batchmean ``KL(softmax(out2) || softmax(out1))``; ``out1``
    learns from ``out2``."""

    def forward(self, out1: torch.Tensor, out2: torch.Tensor) -> torch.Tensor:
        return soft_kl(out1, out2, reduction="batchmean")


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _reset(model: nn.Module) -> None:
    for m in model.modules():
        fn = getattr(m, "reset_parameters", None)
        if callable(fn):
            fn()


@register("dml")
class DMLLoss(Loss):
    """Adapter: the student's DML term plus the peer it trains (module doc)."""

    requires = frozenset()

    def __init__(self, key: Optional[str] = None, ignore_void: bool = False, lr: float = 0.1,
                 momentum: float = 0.9, weight_decay: float = 1e-4, nesterov: bool = True,
                 peer_kd_weight: float = 1.0, reinit: bool = True,
                 peer_hard: Optional[Sequence[Any]] = None):
        super().__init__()
        if key not in (None, "logits", "seg"):
            raise ConfigError(f"loss 'dml': key: expected 'logits' or 'seg', got {key!r}")
        self.key = key
        self.ignore_void = ignore_void
        self.opt_args = dict(lr=float(lr), momentum=float(momentum), weight_decay=float(weight_decay),
                             nesterov=bool(nesterov))
        self.peer_kd_weight = float(peer_kd_weight)
        self.reinit = reinit
        self.core = DML()
        self.peer_hard = nn.ModuleList()
        self.peer_hard_weights: List[float] = []
        for i, entry in enumerate(peer_hard or []):
            key_i = f"loss 'dml': peer_hard[{i}]"
            if isinstance(entry, str):
                entry = {"name": entry}
            if not isinstance(entry, dict) or "name" not in entry:
                raise ConfigError(f"{key_i}: expected a loss name or a mapping with 'name'")
            kwargs = dict(entry)
            name = kwargs.pop("name")
            self.peer_hard_weights.append(float(kwargs.pop("weight", 1.0)))
            self.peer_hard.append(build_loss(name, key_i, **kwargs))
        self._peer: List[nn.Module] = []
        self._pending: Optional[Dict[str, Any]] = None
        self._cache: Optional[Dict[str, Any]] = None

    def student_parameters(self) -> Iterable[nn.Parameter]:
        return iter(())  # nothing here is trained by the student's optimiser

    @property
    def peer(self) -> nn.Module:
        if not self._peer:
            raise ConfigError("loss 'dml': not bound to a student (the trainer calls bind)")
        return self._peer[0]

    def bind(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        peer = copy.deepcopy(_unwrap(student))
        if self.reinit:
            _reset(peer)
        self._peer = [peer]
        if self._pending is not None:
            state, self._pending = self._pending, None
            self.load_extra_state(state)

    def _key(self, out: Dict[str, Any]) -> str:
        return self.key or ("logits" if "logits" in out else "seg")

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> torch.Tensor:
        peer = self.peer
        peer.train(self.training)
        peer_out = peer(batch["images"])
        self._cache = peer_out
        key = self._key(student_out)
        ls, lp = logit_pair(student_out, peer_out, batch, key, self.ignore_void, "dml")
        if ls.shape[0] == 0:
            return zero_like_graph(get_output(student_out, key, "dml"))
        return self.core(ls, lp)

    def _hard(self, peer_out: Dict[str, Any], batch: Dict[str, Any], key: str) -> torch.Tensor:
        """The peer's own task loss: the ``peer_hard`` losses, by default ``ce``
        (classifiers) or ``seg_ce`` (dense), summed."""
        if not len(self.peer_hard):
            self.peer_hard.append(build_loss("ce" if key == "logits" else "seg_ce", "loss 'dml': peer_hard"))
            self.peer_hard_weights.append(1.0)
        total = None
        for weight, hard in zip(self.peer_hard_weights, self.peer_hard):
            value = hard(peer_out, None, batch)
            value = sum(value.values()) if isinstance(value, dict) else value
            total = weight * value if total is None else total + weight * value
        return total

    def aux_groups(self) -> List[AuxGroup]:
        return [AuxGroup("peer", self.peer, self.peer_step, optimizer="sgd", **self.opt_args)]

    def peer_step(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                  batch: Dict[str, Any]) -> Tuple[torch.Tensor, Dict[str, float]]:
        """The peer's objective on this step's (cached) peer output and the student's detached one."""
        peer = self.peer
        peer_out, self._cache = self._cache, None
        key = self._key(student_out)
        if peer_out is None or not get_output(peer_out, key, "dml").requires_grad:
            peer.train()
            peer_out = peer(batch["images"])
        lp, ls = logit_pair(peer_out, student_out, batch, key, self.ignore_void, "dml")
        kd = self.core(lp, ls) if lp.shape[0] else zero_like_graph(lp)
        hard = self._hard(peer_out, batch, key)
        loss = hard + self.peer_kd_weight * kd
        return loss, {"peer_loss": float(loss.detach()), "peer_kd": float(kd.detach())}

    def extra_state(self) -> Dict[str, Any]:
        if not self._peer:
            return {}
        return {"peer": self._peer[0].state_dict()}

    def load_extra_state(self, state: Dict[str, Any]) -> None:
        if not state:
            return
        if not self._peer:
            self._pending = state
            return
        self._peer[0].load_state_dict(state["peer"])
