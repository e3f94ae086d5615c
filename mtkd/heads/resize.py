"""Bilinear resize of small maps as two matrix products.

``F.interpolate(x, size, mode="bilinear", align_corners=False)`` is linear
and separable: the output is ``Ah @ x @ Aw.T`` with ``Ah`` (H_out, H_in) and
``Aw`` (W_out, W_in) the 1-D linear-interpolation matrices, obtained by
resizing the identity. On a CPU the two products (and their backward) are
cheaper than the interpolation kernel when the maps are small, such as the
seg head's stride-4 logits of the small testbed resized to 64x64
(benchmarks/README.md, "step_time"). Larger inputs or outputs, other
devices, and tracing/export (where the matrices would become constants of one
input size) use ``F.interpolate``. The two agree to float rounding.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch
import torch.nn.functional as F

MAX_MATMUL_SIDE = 32   # input sides up to this use the matrix form on a CPU ...
MAX_MATMUL_OUT = 256   # ... when the output sides are at most this (the products grow with both)


@lru_cache(maxsize=64)
def _matrix(n_in: int, n_out: int, dtype: torch.dtype) -> torch.Tensor:
    # a normal tensor even when first asked for under inference_mode (evaluation), since the
    # cached matrix is later used in training graphs, which cannot save inference tensors
    with torch.inference_mode(False), torch.no_grad():
        eye = torch.eye(n_in, dtype=torch.float64).reshape(1, n_in, n_in)
        return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].T.to(dtype).contiguous()


def _exporting() -> bool:
    return bool(torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()
                or torch.compiler.is_compiling())


def resize_bilinear(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` of a (B, C, H, W) map."""
    h, w = (int(s) for s in size)
    hi, wi = x.shape[-2:]
    if (hi, wi) == (h, w):
        return x
    if (x.device.type != "cpu" or not x.dtype.is_floating_point or max(hi, wi) > MAX_MATMUL_SIDE
            or max(h, w) > MAX_MATMUL_OUT or _exporting()):
        return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    ah = _matrix(int(hi), h, x.dtype)
    aw = _matrix(int(wi), w, x.dtype)
    return torch.matmul(torch.matmul(ah, x), aw.T)
