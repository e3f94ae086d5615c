"""Model cost: parameters, GFLOPs and CPU latency.

* ``gflops``: ``torch.utils.flop_counter.FlopCounterMode`` total for one
  forward at batch 1, divided by 1e9. FlopCounterMode counts a multiply-add
  as 2 FLOPs (the same convention as Ultralytics' reported GFLOPs) and
  counts matmul/conv ops only (no BN, activation or interpolation).
* ``latency_ms``: median wall time of ``runs`` eval-mode forwards at batch 1
  on the CPU, after one warm-up, with the current torch thread setting.

The model is moved to the CPU and put in eval mode for the measurement, then
moved back to its device with its train/eval mode restored.
"""
from __future__ import annotations

import statistics
import time
from typing import Dict, Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def model_info(model: nn.Module, imgsz: Union[int, tuple] = 128, runs: int = 5) -> Dict[str, float]:
    """``{"params": int, "gflops": float, "latency_ms": float}`` for a square/(h, w) input."""
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    device = next(model.parameters()).device
    was_training = model.training
    model.eval().cpu()
    x = torch.zeros(1, 3, h, w)
    try:
        with torch.no_grad():
            counter = FlopCounterMode(display=False)
            with counter:
                model(x)
            times = []
            for _ in range(runs + 1):
                t0 = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t0)
    finally:
        model.to(device).train(was_training)
    return {
        "params": int(sum(p.numel() for p in model.parameters())),
        "gflops": counter.get_total_flops() / 1e9,
        "latency_ms": 1000.0 * statistics.median(times[1:]),
    }
