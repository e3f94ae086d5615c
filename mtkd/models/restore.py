"""The model a checkpoint holds, pruned or not: one place for every loader.

Evaluation and prediction (:func:`mtkd.engine.trainer.load_model`), the
teacher loader (:func:`mtkd.teachers.load_teacher`) and ``model.init``
(a run starting from a checkpoint's weights) all build their model through
:func:`model_from_checkpoint`:

* a checkpoint **without** a ``"pruning"`` entry holds the weights of the
  architecture its caller describes (a run config's ``model:`` section, a
  teacher's ``teacher.model``): the caller's ``build`` makes it, the weights
  are loaded strictly;
* a **pruned** checkpoint (written by ``mtkd prune``, or by a run that
  started from one) describes its own architecture, without any pickled
  module: ``"pruning"`` holds the base model's resolved ``model:`` config,
  the structural rewrites applied before pruning (``c2f_split``, see
  :mod:`mtkd.models.surgery`) and Torch-Pruning's pruning history, one list
  per pruning run (``stages``). Loading rebuilds the base model, applies the
  rewrites, replays each stage on a fresh ``DependencyGraph``
  (``load_pruning_history``) and loads the weights, all from a
  ``torch.load(weights_only=True)`` file. Replaying needs torch-pruning
  (``pip install "mtkd[export]"``); a caller's own model config cannot
  describe pruned widths, so it is not used for such a checkpoint.

A pruning record (``checkpoint["pruning"]``, plain types only)::

    {"version": 1, "model": {...resolved model: config...}, "num_classes": 3,
     "imgsz": 128, "rewrites": ["c2f_split"],
     "stages": [[["neck.lat3.conv", True, [0, 5, 7]], ...], ...]}

A model restored (or pruned) this way carries the record as
``model.pruning``; :func:`checkpoint_entries` puts it into every checkpoint
the trainer writes of it, so a recovery run's ``best.pt`` loads the same way.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
from torch import nn

from mtkd.errors import MtkdError

#: Version of the pruning record layout (see the module doc).
RECORD_VERSION = 1

#: The one line printed when torch-pruning is missing.
INSTALL_HINT = 'torch-pruning is not installed; install the export extras: pip install "mtkd[export]"'


def import_torch_pruning() -> Any:
    """``torch_pruning``, or a one-line MtkdError saying how to install it."""
    try:
        import torch_pruning
    except ImportError:
        raise MtkdError(INSTALL_HINT) from None
    return torch_pruning


def trace_output(out: Dict[str, Any]) -> torch.Tensor:
    """One scalar over every output of a multi-task model, for Torch-Pruning's graph tracing.

    Pruning and replay must trace the same graph, so both use this.
    """
    total = out["feats"]["p3"].new_zeros(())
    det = out.get("det")
    if det is not None:
        total = total + det.cls.sum() + det.obj.sum() + det.box.sum()
        if det.box_dist is not None:
            total = total + det.box_dist.sum()
    if out.get("seg") is not None:
        total = total + out["seg"].sum()
    return total


def example_input(imgsz: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The tracing input of pruning and replay: one zero image of side ``imgsz``."""
    return torch.zeros(1, 3, int(imgsz), int(imgsz), device=device)


def dependency_graph(model: nn.Module, imgsz: int) -> Any:
    """A Torch-Pruning ``DependencyGraph`` of ``model`` (in eval mode, grad on), as pruning and replay build it."""
    tp = import_torch_pruning()
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            device = next(model.parameters()).device
            return tp.DependencyGraph().build_dependency(model, example_input(imgsz, device),
                                                         output_transform=trace_output, verbose=False)
    finally:
        model.train(was_training)


def architecture_keys(model_cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """A ``model:`` config without ``init`` (which names starting weights, not architecture)."""
    return {k: v for k, v in model_cfg.items() if k != "init"}


def _bad(path: Any, what: str) -> MtkdError:
    return MtkdError(f"{path}: malformed pruning record: {what}")


def check_record(record: Any, path: Any = "checkpoint") -> Dict[str, Any]:
    """``record`` if it has the layout of the module doc, else a one-line MtkdError naming ``path``."""
    if not isinstance(record, Mapping):
        raise _bad(path, f"expected a mapping, got {type(record).__name__}")
    version = record.get("version")
    if not isinstance(version, int) or version > RECORD_VERSION:
        raise _bad(path, f"version {version!r} (this mtkd reads up to {RECORD_VERSION}; a newer mtkd wrote it?)")
    if not isinstance(record.get("model"), Mapping):
        raise _bad(path, "'model' is not a model config")
    for key in ("num_classes", "imgsz"):
        if not isinstance(record.get(key), int) or isinstance(record.get(key), bool) or record[key] < 1:
            raise _bad(path, f"{key!r} is not a positive int")
    rewrites = record.get("rewrites")
    if not isinstance(rewrites, (list, tuple)) or not all(isinstance(r, str) for r in rewrites):
        raise _bad(path, "'rewrites' is not a list of names")
    stages = record.get("stages")
    if not isinstance(stages, (list, tuple)):
        raise _bad(path, "'stages' is not a list")
    for i, stage in enumerate(stages):
        for entry in stage if isinstance(stage, (list, tuple)) else [None]:
            if not (isinstance(entry, (list, tuple)) and len(entry) == 3 and isinstance(entry[0], str)
                    and isinstance(entry[1], bool) and isinstance(entry[2], (list, tuple))
                    and all(isinstance(k, int) for k in entry[2])):
                raise _bad(path, f"stage {i} holds an entry that is not [layer name, bool, [channel, ...]]")
    return dict(record)


def new_record(model: nn.Module, imgsz: int, rewrites: List[str]) -> Dict[str, Any]:
    """The record of a model about to be pruned for the first time (no stages yet)."""
    arch = getattr(model, "arch", None)
    if not isinstance(arch, Mapping):
        raise MtkdError("prune: the model does not record the config it was built from "
                        "(build it with mtkd.models.build_model)")
    return {"version": RECORD_VERSION, "model": dict(arch), "num_classes": int(model.num_classes),
            "imgsz": int(imgsz), "rewrites": list(rewrites), "stages": []}


def plain_history(history: List[Any]) -> List[List[Any]]:
    """Torch-Pruning's pruning history as plain ``[name, bool, [int, ...]]`` lists."""
    return [[str(name), bool(out), [int(i) for i in idxs]] for name, out, idxs in history]


def replay(model: nn.Module, record: Mapping[str, Any], path: Any = "checkpoint") -> nn.Module:
    """Apply a record's rewrites and pruning stages to ``model``, freshly built from ``record["model"]``."""
    from mtkd.models.surgery import C2F_SPLIT, refresh_widths, split_c2f

    import_torch_pruning()
    for rewrite in record["rewrites"]:
        if rewrite != C2F_SPLIT:
            raise _bad(path, f"unknown rewrite {rewrite!r}")
        split_c2f(model)
    for i, stage in enumerate(record["stages"]):
        graph = dependency_graph(model, record["imgsz"])
        try:
            with torch.no_grad():
                graph.load_pruning_history([[n, o, list(k)] for n, o, k in stage])
        except Exception as exc:  # a name that is not a layer, an index out of range, ...
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise MtkdError(f"{path}: cannot replay pruning stage {i} on the model it records: {reason}") from None
    refresh_widths(model)
    model.pruning = dict(record)
    return model


def build_pruned(record: Mapping[str, Any], path: Any = "checkpoint") -> nn.Module:
    """The pruned architecture a record describes (weights as built: load a state dict next)."""
    from mtkd.models import build_model

    record = check_record(record, path)
    model = build_model({**record["model"], "pretrained": False}, record["num_classes"])
    return replay(model, record, path)


def checkpoint_entries(model: nn.Module) -> Dict[str, Any]:
    """What a checkpoint of ``model`` needs beside its weights: ``{"pruning": record}`` when pruned, else ``{}``."""
    record = getattr(model, "pruning", None)
    return {"pruning": record} if record else {}


def state_dict_mismatch(own: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str:
    """How state dict ``given`` misses a model's ``own`` (``""`` when it fits a strict load).

    Counts of missing keys, unexpected keys and shape mismatches, each with
    its first key, e.g. ``"12 missing keys (first neck.lat3.conv.weight), 3
    unexpected keys (first ...)"``.
    """
    missing = [k for k in own if k not in given]
    unexpected = [k for k in given if k not in own]
    shapes = [k for k in own if k in given and tuple(own[k].shape) != tuple(given[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (first {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (first {unexpected[0]})")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} shape mismatches (first {k}: {list(given[k].shape)} in the checkpoint, "
                     f"{list(own[k].shape)} in the model)")
    return ", ".join(parts)


def architecture_difference(recorded: Any, expected: Any) -> str:
    """``recorded`` (a checkpoint's ``config.model``) against ``expected`` (the caller's), in words.

    Names ``preset`` and ``backbone`` always and any other architecture key
    whose value differs (``init`` and ``pretrained`` left out, they name
    starting weights); ``""`` when ``expected`` is unknown.
    """
    if not isinstance(expected, Mapping):
        return ""
    if not isinstance(recorded, Mapping):
        return "the checkpoint records no model config"
    recorded, expected = architecture_keys(recorded), architecture_keys(expected)
    recorded.pop("pretrained", None)
    expected.pop("pretrained", None)
    keys = [k for k in ("preset", "backbone") if k in recorded or k in expected]
    keys += [k for k in sorted(set(recorded) | set(expected), key=str)
             if k not in keys and recorded.get(k) != expected.get(k)]

    def words(cfg: Mapping[str, Any]) -> str:
        return " ".join(f"{k}={'null' if cfg.get(k) is None else cfg.get(k)}" for k in keys)

    return f"the checkpoint's model has {words(recorded)}, the config's {words(expected)}"


def load_weights(model: nn.Module, state: Any, path: Any,
                 mismatch: Optional[Callable[[str], Exception]] = None, context: str = "") -> nn.Module:
    """``model.load_state_dict(state)`` (strict); a one-line error naming ``path`` when it does not fit.

    The error says ``context`` (e.g. :func:`architecture_difference`), then
    :func:`state_dict_mismatch`. ``mismatch(detail)`` makes the exception
    (default: an MtkdError naming ``path``).
    """
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MtkdError(f"{path}: its 'model' entry is not a state dict of tensors")

    def fail(detail: str) -> Exception:
        detail = "; ".join(part for part in (context, detail) if part)
        return (mismatch(detail) if mismatch is not None
                else MtkdError(f"{path}: weights do not fit the model: {detail}"))

    problem = state_dict_mismatch(model.state_dict(), state)
    if problem:
        raise fail(problem)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # what the key and shape comparison cannot see (custom _load_from_state_dict)
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        raise fail((lines[1] if len(lines) > 1 else lines[0] if lines else type(exc).__name__)[:200]) from None
    return model


def model_from_checkpoint(ckpt: Mapping[str, Any], path: Any, build: Callable[[], nn.Module],
                          mismatch: Optional[Callable[[str], Exception]] = None,
                          num_classes: Optional[int] = None,
                          model_cfg: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """The model of a loaded checkpoint dict with its ``"model"`` weights (train mode, CPU).

    ``build()`` makes the architecture of an unpruned checkpoint (random
    init; the weights replace it). A pruned one (``ckpt["pruning"]``) is
    rebuilt from its record instead, see the module doc; ``num_classes``,
    when given, must then match the record's. ``mismatch(detail)`` makes the
    exception for weights that do not fit (default: an MtkdError naming
    ``path``); ``detail`` compares the checkpoint's ``config.model`` with
    ``model_cfg`` (the ``model:`` config ``build`` uses), then names the first
    missing, unexpected and mis-shaped keys.
    """
    record = ckpt.get("pruning")
    if record:
        task = ckpt.get("task", "multitask")
        if task != "multitask":
            raise MtkdError(f"{path}: a pruned {task!r} checkpoint; only multitask models are pruned")
        model = build_pruned(record, path)
        if num_classes is not None and model.num_classes != num_classes:
            raise MtkdError(f"{path}: a pruned model of {model.num_classes} classes, expected {num_classes}")
        return load_weights(model, ckpt.get("model"), path,
                            lambda d: MtkdError(f"{path}: weights do not fit the pruned architecture it "
                                                f"records: {d}"))
    recorded = (ckpt.get("config") or {}).get("model") if isinstance(ckpt.get("config"), Mapping) else None
    return load_weights(build(), ckpt.get("model"), path, mismatch,
                        architecture_difference(recorded, model_cfg))
