"""Exponential moving average of model weights (as YOLOv5/v8 keep it).

``ema = d * ema + (1 - d) * model`` after every optimizer step, with the decay
ramped up as ``d = decay * (1 - exp(-updates / tau))`` so that early, random
weights are forgotten quickly. Floating-point buffers (BatchNorm statistics)
are averaged too; integer buffers (``num_batches_tracked``) are copied.

The pairs of tensors (EMA copy, model) are looked up once per model object and
then updated in place, so an update costs one batched ``lerp`` rather than two
``state_dict()`` walks (on a 0.3 M-parameter model on a CPU that walk cost
more than the average itself). Loading a state dict into either model keeps
the pairs valid, since ``load_state_dict`` copies into the same tensors; a
model whose parameters were replaced (e.g. by pruning surgery) needs a new
``ModelEMA``.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn


class ModelEMA:
    """EMA copy of ``model`` (pass the unwrapped model, not the DDP wrapper)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.tau = tau
        self.updates = updates
        self._pairs: Optional[Tuple[nn.Module, List[torch.Tensor], List[torch.Tensor],
                                    List[torch.Tensor], List[torch.Tensor]]] = None

    def _pairs_for(self, model: nn.Module) -> Tuple[List[torch.Tensor], ...]:
        if self._pairs is None or self._pairs[0] is not model:
            src = model.state_dict(keep_vars=True)
            ema_f, src_f, ema_i, src_i = [], [], [], []
            for name, value in self.module.state_dict(keep_vars=True).items():
                if name not in src:
                    raise KeyError(f"EMA: the model has no tensor {name!r} (was it rebuilt after the EMA was made?)")
                floating = value.dtype.is_floating_point
                (ema_f if floating else ema_i).append(value.data)
                (src_f if floating else src_i).append(src[name].data)
            self._pairs = (model, ema_f, src_f, ema_i, src_i)
        return self._pairs[1:]

    def current_decay(self) -> float:
        return self.decay * (1.0 - math.exp(-self.updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.current_decay()
        ema_f, src_f, ema_i, src_i = self._pairs_for(model)
        for e, s in zip(ema_i, src_i):
            e.copy_(s)
        if ema_f:  # one batched lerp: ema + (1 - d) * (model - ema)
            torch._foreach_lerp_(ema_f, src_f, 1.0 - d)

    def state_dict(self) -> Dict[str, Any]:
        return self.module.state_dict()

    def load_state_dict(self, state: Dict[str, Any], updates: int) -> None:
        self.module.load_state_dict(state)
        self.updates = updates
