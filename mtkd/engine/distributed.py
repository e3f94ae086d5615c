"""DDP through ``torchrun`` only.

A process is distributed when ``torchrun`` set ``WORLD_SIZE > 1`` in its
environment; then :func:`setup` initialises the default process group from
the environment (``gloo`` on the CPU, ``nccl`` on CUDA, one GPU per local
rank). Rank 0 alone logs, evaluates, plots and writes checkpoints; the other
ranks train. :func:`shutdown` is the tear-down measured to exit cleanly with
gloo (``del`` the model and optimizer, ``gc.collect()``, barrier, destroy).
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any, Dict, List

import torch
import torch.distributed as dist
from torch import nn

from mtkd.errors import ConfigError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA when available else CPU; ``cuda`` under DDP -> ``cuda:<local_rank>``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device: {name!r} requested but CUDA is not available")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    elif name != "cpu":
        raise ConfigError(f"train.device: expected auto, cpu, cuda or cuda:N, got {name!r}")
    return torch.device(name)


def setup(device_name: str) -> DistInfo:
    """Initialise from torchrun's environment (no-op for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def wrap(model: nn.Module, info: DistInfo, find_unused_parameters: bool = False) -> nn.Module:
    """DDP-wrap ``model`` when distributed (it must already be on its device); ``model`` itself otherwise."""
    if not info.enabled:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


def broadcast_module(module: nn.Module, info: DistInfo) -> None:
    """Copy rank 0's parameters and buffers to every rank (modules outside DDP)."""
    if not info.enabled:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def any_true(flag: bool, info: DistInfo) -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_objects(obj: Any, info: DistInfo) -> List[Any]:
    """Every rank's ``obj`` (a picklable plain value), in rank order."""
    if not info.enabled:
        return [obj]
    out: List[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def reduce_means(sums: Dict[str, float], counts: Dict[str, int], info: DistInfo) -> Dict[str, float]:
    """Mean of each logged term over all ranks' steps."""
    total_s: Dict[str, float] = {}
    total_c: Dict[str, int] = {}
    for s, c in gather_objects((sums, counts), info):
        for k, v in s.items():
            total_s[k] = total_s.get(k, 0.0) + v
            total_c[k] = total_c.get(k, 0) + c[k]
    return {k: total_s[k] / max(total_c[k], 1) for k in total_s}


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo, barrier: bool = True) -> None:
    """Collect garbage, synchronise and destroy the process group.

    The caller drops its references to the model and optimizer first (the
    measured clean exit is ``del model, opt; gc.collect(); barrier; destroy``).
    ``barrier=False`` after an error: a rank that failed alone must not wait
    for ranks that will never arrive.
    """
    gc.collect()
    if info.enabled and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
