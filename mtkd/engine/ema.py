"""Exponential moving average of model weights (as YOLOv5/v8 keep it).

``ema = d * ema + (1 - d) * model`` after every optimizer step, with the decay
ramped up as ``d = decay * (1 - exp(-updates / tau))`` so that early, random
weights are forgotten quickly. Floating-point buffers (BatchNorm statistics)
are averaged too; integer buffers (``num_batches_tracked``) are copied.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Dict

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

    def current_decay(self) -> float:
        return self.decay * (1.0 - math.exp(-self.updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.current_decay()
        src = model.state_dict()
        ema_f, src_f = [], []
        for name, value in self.module.state_dict().items():
            if value.dtype.is_floating_point:
                ema_f.append(value)
                src_f.append(src[name].detach())
            else:
                value.copy_(src[name])
        if ema_f:  # one batched lerp: ema + (1 - d) * (model - ema)
            torch._foreach_lerp_(ema_f, src_f, 1.0 - d)

    def state_dict(self) -> Dict[str, Any]:
        return self.module.state_dict()

    def load_state_dict(self, state: Dict[str, Any], updates: int) -> None:
        self.module.load_state_dict(state)
        self.updates = updates
