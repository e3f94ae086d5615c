"""``mtkd yolo prune``: structured channel pruning of an Ultralytics YOLO detection model.

``mtkd yolo prune model=best.pt ratio=R [out=PATH] [importance=magnitude|taylor|lamp] [round_to=8] [imgsz=N]
[data=DATA.yaml]`` removes the share ``R`` of the channels of every prunable
layer with Torch-Pruning (the pruner and importances of
:mod:`mtkd.export.prune`) and writes a stock Ultralytics checkpoint:
``YOLO(out)`` loads, predicts, validates and exports it where mtkd is not
installed. Choices:

* **C2f and C3k2 blocks** are split first (:func:`mtkd.models.surgery.split_c2f`),
  since Torch-Pruning cannot follow the ``chunk`` of their ``cv1``; every
  layer loses the same share, so both halves of a split keep the same width
  (where one half cannot be pruned, the other is kept whole too), and each
  block is merged back into its Ultralytics class (:func:`~mtkd.models.surgery.merge_c2f`).
* **Detect outputs are kept**: the last conv of every box (DFL) and class
  branch, the DFL conv, and the attention layers (whose heads are reshaped
  from their channels) are never pruned; the output shapes are checked.
* **taylor** importance back-propagates Ultralytics' detection loss over the
  first :data:`~mtkd.export.prune.TAYLOR_BATCHES` batches of ``data``'s
  train split, so it needs ``data=``.
* GFLOPs are counted at ``imgsz`` (default: the checkpoint's training
  ``imgsz``) and printed with the parameter counts before and after.

**Fine-tuning a pruned model.** Ultralytics' own ``YOLO("pruned.pt").train()``
rebuilds the model from its ``yaml`` at the original widths and copies in only
the weights whose shapes match: it silently trains an unpruned model. Use
``mtkd yolo train model=pruned.pt teacher=... data=...``
(:class:`mtkd.yolo.trainer.KDDetectionTrainer`), which trains the pruned
model at its pruned widths.
"""
from __future__ import annotations

import copy
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from mtkd.errors import ConfigError, MtkdError, writing

USAGE = ("usage: mtkd yolo prune model=MODEL.pt ratio=R [out=PATH] [importance=magnitude|taylor|lamp] "
         "[round_to=8] [imgsz=N] [data=DATA.yaml (taylor)]\n"
         "Writes a plain Ultralytics checkpoint. Fine-tune it with `mtkd yolo train model=PATH ...`: "
         "Ultralytics' own .train() rebuilds the model at its original widths from the yaml.")

#: The keys of ``mtkd yolo prune``.
KEYS = ("model", "ratio", "out", "importance", "round_to", "imgsz", "data")


def protected_layers(model: nn.Module) -> List[nn.Module]:
    """Layers whose output channels are never pruned: Detect's output convs, its DFL, the attention layers."""
    from ultralytics.nn.modules import block

    head = model.model[-1]
    layers: List[nn.Module] = []
    for attr in ("cv2", "cv3", "one2one_cv2", "one2one_cv3"):
        branches = getattr(head, attr, None)
        if branches is not None:
            layers += [branch[-1] for branch in branches]
    if isinstance(getattr(getattr(head, "dfl", None), "conv", None), nn.Conv2d):
        layers.append(head.dfl.conv)
    attention = tuple(getattr(block, name) for name in ("Attention", "AAttn") if hasattr(block, name))
    layers += [m for m in model.modules() if isinstance(m, attention)]
    return layers


def trace_output(out: Any) -> torch.Tensor:
    """One scalar over the raw box and class outputs of an eval-mode ``DetectionModel`` (for tracing)."""
    tensors: List[torch.Tensor] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            for key, value in x.items():
                if key in ("boxes", "scores"):
                    tensors.append(value)
                elif isinstance(value, dict):
                    walk(value)
        elif isinstance(x, (list, tuple)):
            for value in x:
                walk(value)

    walk(out)
    return sum(t.sum() for t in tensors)


def output_shapes(model: nn.Module, imgsz: int) -> Dict[str, tuple]:
    """Shapes of the decoded output and of every raw box/class output on one zero image."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, 3, imgsz, imgsz, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
    y, raw = out if isinstance(out, tuple) else (out, {})
    shapes = {"output": tuple(y.shape)}

    def walk(x: Any, prefix: str) -> None:
        for key, value in x.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif key in ("boxes", "scores"):
                shapes[prefix + key] = tuple(value.shape)

    walk(raw, "")
    return shapes


def is_detection_model(model: Any) -> bool:
    from ultralytics.nn.modules import Detect
    from ultralytics.nn.tasks import DetectionModel

    return type(model) is DetectionModel and isinstance(model.model[-1], Detect)


def is_pruned(model: nn.Module, built: nn.Module) -> bool:
    """Whether ``model`` has the layers of ``built`` (its yaml, built afresh) at other widths.

    The Detect head's class convs are left out (their widths follow the
    class count); models with other layers are not pruned ones.
    """
    if not (is_detection_model(model) and is_detection_model(built)) or len(model.model) != len(built.model):
        return False
    a = nn.ModuleList([*model.model[:-1], model.model[-1].cv2]).state_dict()
    b = nn.ModuleList([*built.model[:-1], built.model[-1].cv2]).state_dict()
    return a.keys() == b.keys() and any(a[k].shape != b[k].shape for k in a)


def load_detection(path: str | Path) -> tuple:
    """``(model, ckpt)`` of an Ultralytics detection checkpoint (FP32, eval, on the CPU); ConfigError otherwise."""
    from ultralytics.nn.tasks import load_checkpoint

    path = Path(str(path))
    if not path.is_file():
        raise ConfigError(f"model: {path} not found")
    try:
        model, ckpt = load_checkpoint(path, device="cpu")
    except Exception as exc:  # a foreign pickle, a zip that is no checkpoint, ...
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model: {path} is not an Ultralytics YOLO detection checkpoint ({first})") from None
    if not is_detection_model(model):
        raise ConfigError(f"model: {path} holds a {type(model).__name__}; only YOLO detection models "
                          "(DetectionModel with a Detect head) are pruned")
    return model, ckpt


def _balance_halves(pruner: Any, splits: List[nn.Module]) -> None:
    """Where one half of a split C2f cannot be pruned, keep the other half whole as well."""
    dg, ignored = pruner.DG, pruner.ignored_layers

    def prunable(conv: nn.Module) -> bool:
        if conv in ignored:
            return False
        group = dg.get_pruning_group(conv, dg.get_pruner_of_module(conv).prune_out_channels,
                                     list(range(conv.out_channels)))
        return not any(dep.target.module in ignored and dg.is_out_channel_pruning_fn(dep.handler)
                       for dep, _ in group)

    for split in splits:
        a, b = split.cv0.conv, split.cv1.conv
        if prunable(a) != prunable(b):
            ignored.append(a if prunable(a) else b)


def prune_detection(model: nn.Module, imgsz: int, ratio: float, *, importance: str = "magnitude",
                    round_to: Optional[int] = 8,
                    grad_fn: Optional[Callable[[nn.Module], None]] = None) -> Dict[str, Any]:
    """Prune an Ultralytics ``DetectionModel`` in place (see the module doc) and return a report.

    ``ratio`` is the share of each prunable layer's channels to remove, in
    (0, 1); ``round_to`` (``None`` or 1: no rounding) the channel multiple;
    ``grad_fn(model)`` back-propagates a loss (``taylor`` needs it). The
    parameters are left with ``requires_grad`` off, as in Ultralytics' saved
    models. The report: ``params_before/after``, ``gflops_before/after`` (at
    ``imgsz``), ``ratio``, ``importance``, ``round_to``, ``imgsz``.
    """
    from mtkd.export.prune import build_pruner, check_importance, check_ratio, check_round_to, gflops, taylor_grads
    from mtkd.models.restore import import_torch_pruning
    from mtkd.models.surgery import C2fSplit, merge_c2f, split_c2f

    ratio = check_ratio(ratio, "ratio")
    check_importance(importance, "importance")
    check_round_to(round_to, "round_to")
    if importance == "taylor" and grad_fn is None:
        raise ConfigError("importance=taylor: needs gradients of the loss on real images (give data=)")
    if not is_detection_model(model):
        raise ConfigError(f"model: a {type(model).__name__}; only YOLO detection models are pruned")
    import_torch_pruning()
    imgsz = int(imgsz)
    params_before = sum(p.numel() for p in model.parameters())
    gflops_before = gflops(model, imgsz)
    shapes = output_shapes(model, imgsz)

    was_training = model.training
    model.eval()
    split_c2f(model, subclasses=True)
    splits = [m for m in model.modules() if isinstance(m, C2fSplit)]
    for p in model.parameters():  # the dependency graph is traced through autograd
        p.requires_grad_(True)
    device = next(model.parameters()).device
    pruner = build_pruner(model, torch.zeros(1, 3, imgsz, imgsz, device=device), importance, ratio=ratio,
                          round_to=round_to, ignored_layers=protected_layers(model), output_transform=trace_output)
    _balance_halves(pruner, splits)
    try:
        if importance == "taylor":
            taylor_grads(model, grad_fn)
        pruner.step()
    finally:
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)
        model.train(was_training)
    merge_c2f(model)
    for layer in model.model:  # Ultralytics' per-layer parameter counts
        layer.np = sum(p.numel() for p in layer.parameters())
    after = output_shapes(model, imgsz)
    if after != shapes:  # the protected layers failed to protect: a bug, not bad input
        raise RuntimeError(f"prune: output shapes changed from {shapes} to {after}")
    return {"params_before": int(params_before), "params_after": int(sum(p.numel() for p in model.parameters())),
            "gflops_before": gflops_before, "gflops_after": gflops(model, imgsz), "ratio": ratio,
            "importance": importance, "round_to": None if round_to in (None, 1) else int(round_to), "imgsz": imgsz}


def _taylor_grad_fn(model: nn.Module, data: str, imgsz: int) -> Callable[[nn.Module], None]:
    """Back-propagates Ultralytics' detection loss over the first batches of ``data``'s train split."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.utils import DEFAULT_CFG

    from mtkd.export.prune import TAYLOR_BATCHES
    from mtkd.yolo.trainer import load_data

    cfg = get_cfg(DEFAULT_CFG, {"data": data, "imgsz": imgsz, "batch": 4})
    info = load_data(data)
    if int(info["nc"]) != int(model.model[-1].nc):
        raise ConfigError(f"data: {data} has {info['nc']} classes; the model has {model.model[-1].nc}")
    dataset = build_yolo_dataset(cfg, info["train"], cfg.batch, info, mode="val", stride=int(model.stride.max()))
    n = min(len(dataset), TAYLOR_BATCHES * cfg.batch)
    if n == 0:
        raise ConfigError(f"data: {data}: the train split is empty")
    chunks = [list(range(i, min(i + cfg.batch, n))) for i in range(0, n, cfg.batch)]

    def grad_fn(net: nn.Module) -> None:
        saved_args, saved_criterion = getattr(net, "args", None), getattr(net, "criterion", None)
        net.args, net.criterion = cfg, None  # the loss reads its gains from the args namespace
        try:
            for idx in chunks:
                batch = dataset.collate_fn([dataset[i] for i in idx])
                batch["img"] = batch["img"].float() / 255
                loss, _ = net.loss(batch)
                (loss.sum() * len(idx) / n).backward()
        finally:
            net.args, net.criterion = saved_args, saved_criterion

    return grad_fn


def save_pruned(model: nn.Module, ckpt: Dict[str, Any], path: str | Path, report: Dict[str, Any]) -> Path:
    """Write ``model`` as an Ultralytics checkpoint (FP16 ``model``, the source's ``train_args``) at ``path``.

    Beside Ultralytics' entries it holds a top-level ``mtkd`` entry of plain
    types: ``{"pruned": report}``.
    """
    from ultralytics import __version__

    path = Path(path)
    saved = copy.deepcopy(model).half().to(memory_format=torch.contiguous_format)
    saved.requires_grad_(False)
    saved.__dict__.pop("pt_path", None)
    saved.criterion = None
    state = {
        "date": datetime.now().astimezone().isoformat(), "version": __version__,
        "license": "AGPL-3.0 License (https://ultralytics.com/license)", "docs": "https://docs.ultralytics.com",
        "epoch": -1, "best_fitness": None, "model": saved, "ema": None, "updates": None, "optimizer": None,
        "train_args": dict(ckpt.get("train_args") or {}), "train_metrics": None, "train_results": None,
        "mtkd": {"pruned": dict(report)},
    }
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp)
        os.replace(tmp, path)
    return path


def prune_yolo(args: Dict[str, Any]) -> Dict[str, Any]:
    """``mtkd yolo prune`` from parsed ``key=value`` args; writes the checkpoint, returns the report (+ ``out``)."""
    unknown = sorted(set(args) - set(KEYS))
    if unknown:
        raise ConfigError(f"{unknown[0]}: not an argument of mtkd yolo prune (known: {', '.join(KEYS)})")
    if not args.get("model"):
        raise ConfigError("model: required (an Ultralytics YOLO detection .pt)")
    if "ratio" not in args:
        raise ConfigError("ratio: required (the share of channels to remove, in (0, 1))")
    from mtkd.export.prune import check_importance, check_ratio, check_round_to
    from mtkd.models.restore import import_torch_pruning

    ratio = check_ratio(args["ratio"], "ratio")
    importance = check_importance(args.get("importance", "magnitude"), "importance")
    round_to = check_round_to(args.get("round_to", 8), "round_to")
    if importance == "taylor" and not args.get("data"):
        raise ConfigError("data: required with importance=taylor (its loss gradients come from the train split)")
    import_torch_pruning()  # before loading anything: a missing install is the first thing to say
    src = Path(str(args["model"]))
    model, ckpt = load_detection(src)
    imgsz = args.get("imgsz", (ckpt.get("train_args") or {}).get("imgsz") or 640)
    if isinstance(imgsz, bool) or not isinstance(imgsz, int) or imgsz < 32 or imgsz % 32:
        raise ConfigError(f"imgsz: expected a positive multiple of 32, got {imgsz!r}")
    out = Path(str(args.get("out") or src.with_name(f"{src.stem}_pruned.pt")))
    if out.resolve() == src.resolve():
        raise ConfigError(f"out: {out} is the model being pruned; give another path")
    grad_fn = _taylor_grad_fn(model, str(args["data"]), imgsz) if importance == "taylor" else None
    report = prune_detection(model, imgsz, ratio, importance=importance, round_to=round_to, grad_fn=grad_fn)
    report["source"] = str(src)
    save_pruned(model, ckpt, out, report)
    return {**report, "out": str(out)}


def main(argv: List[str]) -> int:
    """``mtkd yolo prune key=value ...`` (``argv`` without ``prune``)."""
    from mtkd.export.prune import summary
    from mtkd.yolo.cli import parse_args

    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    try:
        report = prune_yolo(parse_args(argv))
    except MtkdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary(report))
    print(f"pruned model written to {report['out']}; fine-tune it with: mtkd yolo train model={report['out']} "
          "teacher=... data=... (Ultralytics' own .train() would rebuild it at the original widths)")
    return 0


__all__ = ["is_pruned", "load_detection", "main", "protected_layers", "prune_detection", "prune_yolo", "save_pruned"]
