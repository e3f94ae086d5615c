"""Structured channel pruning of mtkd multi-task models with Torch-Pruning.

:func:`prune_model` removes whole channels (conv filters with their BatchNorm
entries and every input slice they feed) with Torch-Pruning's
``DependencyGraph`` / ``BasePruner``, so the result is a smaller dense
network, not a masked one. Choices:

* **Outputs are never pruned.** The class, box (DFL), objectness and seg
  logit convs are ignored layers (Torch-Pruning protects nothing by itself),
  so every output keeps its shape; :func:`prune_model` checks that.
* **GroupNorm layers are left alone.** The seg head's smp blocks use
  GroupNorm(32): their widths must stay multiples of 32, and Torch-Pruning
  1.6's ``round_to`` and its GroupNorm grouping do not combine safely (a
  32-channel block would lose every channel), so those convs keep their
  outputs; their inputs (the neck maps) are pruned.
* **C2f blocks are rewritten first** (:func:`mtkd.models.surgery.split_c2f`),
  since ``chunk`` breaks the dependency graph; the outputs are unchanged.
* **Rounding.** ``round_to`` rounds each layer's kept channels to the
  *nearest* multiple (at least one multiple, at most what it has), where
  Torch-Pruning rounds down: its floor would take a 12-channel layer asked
  for 6 channels to 0, and a 24-channel one to 8.
* **Importance.** ``magnitude`` (L2 of each channel's weights over the whole
  group), ``taylor`` (|weight x gradient|; needs ``grad_fn``, which
  back-propagates a loss on real batches) or ``lamp``. ``global_pruning``
  ranks channels over the whole network instead of per layer.
* **Target GFLOPs.** With ``target_gflops`` the pruner runs in
  :data:`TARGET_STEPS` equal steps up to :data:`MAX_RATIO` of the channels
  and stops at the first step at or below the target (GFLOPs as
  :func:`mtkd.models.model_info` counts them, at ``imgsz``).

The model keeps a pruning record (``model.pruning``): the base config, the
C2f rewrite and Torch-Pruning's pruning history, which is what a pruned
checkpoint stores instead of a pickled module (:mod:`mtkd.models.restore`).
Pruning an already pruned model adds a stage to its record.

:func:`prune_checkpoint` is ``mtkd prune``: a checkpoint in, ``<out>/best.pt``
(a pruned checkpoint; recover with ``mtkd train ... model.init=<out>/best.pt``)
and ``<out>/prune.json`` (params and GFLOPs before and after) out.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mtkd.errors import MtkdError, writing
from mtkd.models.restore import (build_pruned, example_input, import_torch_pruning, new_record, plain_history,
                                 trace_output)

IMPORTANCES = ("magnitude", "taylor", "lamp")

#: ``target_gflops``: the channel ratio is raised in this many equal steps up to :data:`MAX_RATIO`.
TARGET_STEPS = 18
MAX_RATIO = 0.9

#: Batches of the training split whose loss gradients feed ``taylor`` importance (``mtkd prune``).
TAYLOR_BATCHES = 4


def protected_layers(model: nn.Module) -> List[nn.Module]:
    """Layers whose output channels are never pruned: every output conv and the GroupNorm convs."""
    layers: List[nn.Module] = []
    det, seg = getattr(model, "det_head", None), getattr(model, "seg_head", None)
    if det is not None:
        layers += list(det.box_pred) + list(det.obj_pred) + [branch[-1] for branch in det.cls_branch]
        if isinstance(getattr(det.dfl, "conv", None), nn.Conv2d):
            layers.append(det.dfl.conv)
    if seg is not None:
        layers.append(seg.classifier)
        layers += [m for m in seg.blocks.modules() if isinstance(m, nn.Conv2d)]
    return layers


def gflops(model: nn.Module, imgsz: int) -> float:
    """GFLOPs of one forward of ``model`` (eval mode, no grad) on a zero image of side ``imgsz``."""
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(example_input(imgsz, next(model.parameters()).device))
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 1e9


def _output_shapes(model: nn.Module, imgsz: int) -> Dict[str, tuple]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(example_input(imgsz, next(model.parameters()).device))
    finally:
        model.train(was_training)
    shapes = {}
    if out.get("det") is not None:
        d = out["det"]
        shapes.update(cls=tuple(d.cls.shape), obj=tuple(d.obj.shape), box=tuple(d.box.shape))
        if d.box_dist is not None:
            shapes["box_dist"] = tuple(d.box_dist.shape)
    if out.get("seg") is not None:
        shapes["seg"] = tuple(out["seg"].shape)
    return shapes


def _importance(name: str) -> Any:
    tp = import_torch_pruning()
    if name == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    if name == "lamp":
        return tp.importance.LAMPImportance(p=2)
    raise MtkdError(f"--importance: expected one of {', '.join(IMPORTANCES)}, got {name!r}")


def _pruner_class() -> type:
    tp = import_torch_pruning()

    class Pruner(tp.pruner.BasePruner):
        """``BasePruner`` rounding each layer's kept channels to the nearest multiple (see the module doc)."""

        def _round_to(self, n_pruned: int, current_channels: int, round_to: int) -> int:
            keep = current_channels - n_pruned
            keep = min(max(round_to * math.floor(keep / round_to + 0.5), round_to), current_channels)
            return max(current_channels - keep, 0)

    return Pruner


def check_ratio(ratio: Any, key: str = "--ratio") -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
        raise MtkdError(f"{key}: the share of channels to remove must be in (0, 1), got {ratio!r}")
    return float(ratio)


def check_importance(name: Any, key: str = "--importance") -> str:
    if name not in IMPORTANCES:
        raise MtkdError(f"{key}: expected one of {', '.join(IMPORTANCES)}, got {name!r}")
    return name


def check_round_to(round_to: Any, key: str = "--round-to") -> Optional[int]:
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise MtkdError(f"{key}: expected a positive int, got {round_to!r}")
    return round_to


def taylor_grads(model: nn.Module, grad_fn: Callable[[nn.Module], Any]) -> None:
    """Fill ``.grad`` for Taylor importance: ``grad_fn(model)`` back-propagates a loss;
    parameters the loss does not reach get zero gradients (they rank as unimportant)."""
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        grad_fn(model)
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def build_pruner(model: nn.Module, example: torch.Tensor, importance: str, *, ratio: float,
                 ignored_layers: List[nn.Module], output_transform: Callable[[Any], torch.Tensor],
                 round_to: Optional[int] = 8, steps: int = 1, global_pruning: bool = False) -> Any:
    """The Torch-Pruning pruner of :func:`prune_model` (see the module doc), tracing ``model`` on ``example``.

    ``ratio`` is the share of channels removed after ``steps`` calls of
    ``step()``; ``output_transform`` reduces the model's output to the
    scalar the dependency graph is traced from.
    """
    with torch.enable_grad():  # the dependency graph is traced through autograd
        return _pruner_class()(
            model, example, _importance(importance), global_pruning=bool(global_pruning), pruning_ratio=ratio,
            # a global ranking may want all of a layer: keep at least 5 % of each
            max_pruning_ratio=0.95, iterative_steps=steps,
            round_to=None if round_to in (None, 1) else int(round_to),
            ignored_layers=ignored_layers, output_transform=output_transform)


def prune_model(model: nn.Module, imgsz: int, *, ratio: Optional[float] = None,
                target_gflops: Optional[float] = None, importance: str = "magnitude",
                global_pruning: bool = False, round_to: Optional[int] = 8,
                grad_fn: Optional[Callable[[nn.Module], None]] = None) -> Dict[str, Any]:
    """Prune ``model`` (a :class:`~mtkd.models.MultiTaskModel`, in place) and return a report.

    Exactly one of ``ratio`` (share of each layer's channels to remove, in
    (0, 1); with ``global_pruning`` the share over the network) and
    ``target_gflops`` is given; a target that cannot be reached is an
    MtkdError, after which ``model`` is pruned as far as it got (and its
    record says so). ``grad_fn(model)`` back-propagates a loss (it
    is called after the gradients are zeroed); ``taylor`` importance needs it.
    ``round_to`` (``None`` or 1: no rounding) is the channel multiple of
    every pruned layer. The report: ``gflops_before/after``,
    ``params_before/after``, ``channel_ratio`` (the per-layer share the
    pruner aimed at), ``importance``, ``global``, ``round_to``, ``imgsz``.
    """
    from mtkd.models.multitask import MultiTaskModel
    from mtkd.models.surgery import C2F_SPLIT, refresh_widths, split_c2f

    if not isinstance(model, MultiTaskModel):
        raise MtkdError(f"prune: only mtkd multi-task models can be pruned, got {type(model).__name__}")
    if (ratio is None) == (target_gflops is None):
        raise MtkdError("prune: give exactly one of --ratio and --target-gflops")
    if ratio is not None:
        ratio = check_ratio(ratio)
    if target_gflops is not None and (isinstance(target_gflops, bool) or not isinstance(target_gflops, (int, float))
                                      or not target_gflops > 0):
        raise MtkdError(f"--target-gflops: expected a positive number, got {target_gflops!r}")
    check_importance(importance)
    if importance == "taylor" and grad_fn is None:
        raise MtkdError("--importance taylor: needs gradients of a loss on real images (grad_fn)")
    check_round_to(round_to)
    imgsz = int(imgsz)
    import_torch_pruning()

    params_before = sum(p.numel() for p in model.parameters())
    gflops_before = gflops(model, imgsz)
    if target_gflops is not None and gflops_before <= target_gflops:
        raise MtkdError(f"--target-gflops {target_gflops}: the model has {gflops_before:.4g} GFLOPs at "
                        f"{imgsz} px already; nothing to prune")
    shapes = _output_shapes(model, imgsz)

    record = getattr(model, "pruning", None)
    if record:  # a further stage, traced at the size of the first (replay traces every stage at one size)
        record = {**record, "stages": list(record["stages"])}
        split_c2f(model)  # a no-op: a pruned model was rewritten before its first stage
    else:
        record = new_record(model, imgsz, [C2F_SPLIT] if split_c2f(model) else [])
    trace_size = int(record["imgsz"])

    was_training = model.training
    model.eval()
    steps = 1 if ratio is not None else TARGET_STEPS
    pruner = build_pruner(model, example_input(trace_size, next(model.parameters()).device), importance,
                          ratio=ratio if ratio is not None else MAX_RATIO, steps=steps, round_to=round_to,
                          ignored_layers=protected_layers(model), output_transform=trace_output,
                          global_pruning=bool(global_pruning))
    reached, cost = 0.0, gflops_before
    try:
        for step in range(1, steps + 1):
            if grad_fn is not None and importance == "taylor":
                taylor_grads(model, grad_fn)
            pruner.step()
            reached = round((ratio if ratio is not None else MAX_RATIO) * step / steps, 6)
            cost = gflops(model, imgsz)
            if target_gflops is not None and cost <= target_gflops:
                break
    finally:  # whatever happened, the record describes the model as it now is (pruned as far as it got)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        record["stages"].append(plain_history(pruner.pruning_history()))
        refresh_widths(model)
        model.pruning = record
    if target_gflops is not None and cost > target_gflops:
        raise MtkdError(f"--target-gflops {target_gflops}: removing {MAX_RATIO:.0%} of the channels only reaches "
                        f"{cost:.4g} GFLOPs (from {gflops_before:.4g}); the protected output and GroupNorm "
                        "layers cost more")
    after = _output_shapes(model, imgsz)
    if after != shapes:  # the protected layers failed to protect: a bug, not bad input
        raise RuntimeError(f"prune: output shapes changed from {shapes} to {after}")
    return {"params_before": int(params_before), "params_after": int(sum(p.numel() for p in model.parameters())),
            "gflops_before": gflops_before, "gflops_after": cost, "channel_ratio": reached,
            "importance": importance, "global": bool(global_pruning),
            "round_to": None if round_to in (None, 1) else int(round_to), "imgsz": imgsz}


def check_replay(model: nn.Module, imgsz: int) -> float:
    """Max abs output difference between ``model`` and its rebuild from ``model.pruning`` plus its weights.

    Raises RuntimeError unless the rebuild has the same state-dict shapes; the
    caller decides what difference is acceptable (replay is exact on the CPU).
    """
    rebuilt = build_pruned(model.pruning, "pruned model")
    rebuilt.load_state_dict(model.state_dict())
    device = next(model.parameters()).device
    rebuilt.to(device).eval()
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, imgsz, imgsz, generator=gen).to(device)
    try:
        with torch.no_grad():
            a, b = model(x), rebuilt(x)
    finally:
        model.train(was_training)
    diffs = [(a["seg"] - b["seg"]).abs().max()] if a.get("seg") is not None else []
    if a.get("det") is not None:
        diffs += [(a["det"].cls - b["det"].cls).abs().max(), (a["det"].box - b["det"].box).abs().max(),
                  (a["det"].obj - b["det"].obj).abs().max()]
    return float(max(diffs))


# -- mtkd prune -------------------------------------------------------------------------------
def _taylor_grad_fn(cfg: Dict[str, Any], task: Any, batches: int = TAYLOR_BATCHES) -> Callable[[nn.Module], None]:
    """Back-propagates the config's hard losses (no teacher) over the first batches of the train split."""
    from mtkd.engine.trainer import to_device
    from mtkd.losses.composer import LossComposer

    ds = task.build_dataset(cfg, "train", False)  # the eval transform: the same images every time
    n = min(len(ds), batches * int(cfg["train"]["batch"]))
    if n == 0:
        raise MtkdError("--importance taylor: the training split is empty")
    composer = LossComposer(cfg["loss"], with_teacher=False)
    size = int(cfg["train"]["batch"])
    chunks = [list(range(i, min(i + size, n))) for i in range(0, n, size)]

    def grad_fn(model: nn.Module) -> None:
        device = next(model.parameters()).device
        composer.to(device)
        composer.bind(model, None)
        for idx in chunks:
            batch = to_device(task.collate([ds[i] for i in idx]), device)
            total, _ = composer(model(batch["images"]), None, batch)
            (total * len(idx) / n).backward()

    return grad_fn


def summary(report: Dict[str, Any]) -> str:
    """Params and GFLOPs before and after, as a small text table."""
    rows = [("params", f"{report['params_before']:,}", f"{report['params_after']:,}",
             report["params_after"] / report["params_before"]),
            ("GFLOPs", f"{report['gflops_before']:.4f}", f"{report['gflops_after']:.4f}",
             report["gflops_after"] / report["gflops_before"])]
    lines = [f"{'':8}{'before':>14}{'after':>14}{'after/before':>14}"]
    lines += [f"{name:8}{b:>14}{a:>14}{r:>14.3f}" for name, b, a, r in rows]
    return "\n".join(lines)


def prune_checkpoint(cfg: Dict[str, Any], ckpt: str | Path, out: str | Path, *, ratio: Optional[float] = None,
                     target_gflops: Optional[float] = None, importance: str = "magnitude",
                     global_pruning: bool = False, round_to: Optional[int] = 8) -> Dict[str, Any]:
    """``mtkd prune``: prune checkpoint ``ckpt`` (model of ``cfg``) into ``<out>/best.pt`` + ``<out>/prune.json``.

    GFLOPs are counted at ``data.imgsz``. Returns the report (also printed
    as a table by the CLI).
    """
    from mtkd import checkpoint as ckpt_io
    from mtkd.engine.trainer import load_model

    if ratio is not None:
        check_ratio(ratio)
    import_torch_pruning()  # before loading anything: a missing install is the first thing to say
    task, model, classes, _ = load_model(cfg, ckpt)
    if task.name != "multitask":
        raise MtkdError(f"{ckpt}: a {task.name!r} model; only multitask models are pruned")
    model = model.cpu()
    grad_fn = _taylor_grad_fn(cfg, task) if importance == "taylor" else None
    imgsz = int(cfg["data"]["imgsz"])
    report = prune_model(model, imgsz, ratio=ratio, target_gflops=target_gflops, importance=importance,
                         global_pruning=global_pruning, round_to=round_to, grad_fn=grad_fn)
    diff = check_replay(model, model.pruning["imgsz"])
    if diff > 1e-5:  # the saved record would not rebuild this model: a bug, not bad input
        raise RuntimeError(f"prune: replaying the pruning history differs from the pruned model by {diff:.3g}")
    report["source"] = str(ckpt)
    out = Path(out)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ckpt_io.save_atomic({"format": ckpt_io.FORMAT, "task": task.name, "classes": list(classes), "config": cfg,
                         "epoch": 0, "step": 0, "metrics": {}, "best_score": float("-inf"), "model": state,
                         "pruning": model.pruning, "prune_report": dict(report)}, out / "best.pt")
    with writing(out / "prune.json"):
        (out / "prune.json").write_text(json.dumps(report, indent=2))
    return report


__all__ = ["IMPORTANCES", "build_pruner", "check_importance", "check_ratio", "check_replay", "check_round_to", "gflops",
           "prune_checkpoint", "prune_model", "protected_layers", "summary"]
