"""ONNX export of mtkd multi-task models, checked against PyTorch in onnxruntime.

The exported graph (one ``.onnx`` file, no external data) takes ``images``
(B, 3, S, S) float32, normalised and letterboxed as the evaluator feeds the
model (``data.imgsz`` = S, ``data.mean`` / ``data.std``); the batch is
dynamic, the side is fixed (the anchor grid is a constant of the graph). Its
outputs, by name:

* ``boxes`` (B, A, 4): xyxy in input pixels, before NMS
  (:meth:`mtkd.structures.DetOutput.boxes_xyxy`);
* ``scores`` (B, A, nc): ``sigmoid(cls) * sigmoid(obj)``, what
  :func:`mtkd.heads.decode.decode` ranks (:meth:`DetOutput.scores`);
* ``seg`` (B, nc + 1, S, S): segmentation logits (channel 0 background).

A model without one head lacks its outputs. NMS is left to the runtime:
:func:`mtkd.heads.decode.nms` on ``boxes`` / ``scores`` is what mtkd's own
evaluation does. The model metadata (``metadata_props``) records
``mtkd_format``, ``classes``, ``imgsz``, ``mean``, ``std`` and ``outputs`` as
JSON strings: :class:`mtkd.export.runtime.OnnxModel` (``mtkd predict --onnx``)
runs the file from them alone, and ``mtkd export --int8`` quantises it
(:mod:`mtkd.export.quantize`).

Choices, as Ultralytics 8.4 exports: the TorchScript exporter
(``dynamo=False``; torch 2.14's default dynamo exporter writes external
data), opset 18 by default (onnxruntime's CUDA provider lacks some newer
kernels), then ``onnxslim`` unless ``simplify=False``.

**Parity check.** Before anything is written, the final graph runs in
onnxruntime (CPU) on a few images (the config's val split for ``mtkd
export``) beside the PyTorch model: ``seg`` logits and ``scores`` must agree
to :data:`TOL` (max abs difference), and after the same NMS
(:func:`~mtkd.heads.decode.nms` at ``eval.conf`` / ``eval.iou``, no
``max_det`` cut) every box scoring at least ``conf + 1e-3`` (and that much
above the pre-NMS top-k cut) on either side must meet a box of the same
class on the other side at IoU >= :data:`MIN_IOU`. Both NMS runs rank the
candidates by PyTorch's scores, so the box check tests the box geometry and
exact score ties cannot be broken two ways; the scores have their own check.
A mismatch is an MtkdError and no file is written.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from mtkd.errors import MtkdError, write_error

#: Max abs difference allowed between onnxruntime and PyTorch (seg logits, scores).
TOL = 1e-4
#: IoU a box must reach with its counterpart after NMS.
MIN_IOU = 0.99
#: Margin above the score threshold (and the pre-NMS top-k cut) of boxes that must match.
SCORE_MARGIN = 1e-3
#: Images of the val split the parity check runs on (``mtkd export``).
CHECK_IMAGES = 4
#: Version tag in the exported model's metadata.
ONNX_FORMAT = "mtkd-onnx-1"
DEFAULT_OPSET = 18
_HINT = 'install the export extras: pip install "mtkd[export]"'


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MtkdError(f"{module} is not installed; {_HINT}") from None


class OnnxWrapper(nn.Module):
    """The exported computation: ``images -> (boxes, scores, seg)`` (the heads present)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.output_names: List[str] = []
        if getattr(model, "det_head", None) is not None:
            self.output_names += ["boxes", "scores"]
        if getattr(model, "seg_head", None) is not None:
            self.output_names.append("seg")

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        out = self.model(images)
        res: List[torch.Tensor] = []
        if out.get("det") is not None:
            res += [out["det"].boxes_xyxy(), out["det"].scores()]
        if out.get("seg") is not None:
            res.append(out["seg"])
        return tuple(res)


def _box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import box_iou

    if a.numel() == 0 or b.numel() == 0:
        return torch.zeros(len(a), len(b))
    return box_iou(a, b)


def _cut(scores: torch.Tensor, conf: float, topk: int) -> float:
    """The score from which boxes must match: ``conf`` or the pre-NMS top-k cut, plus the margin."""
    flat = scores.flatten()
    n = int((flat > conf).sum())
    floor = float(flat.topk(topk).values[-1]) if n > topk else conf
    return max(conf, floor) + SCORE_MARGIN


def compare_detections(ref: Sequence[Dict[str, torch.Tensor]], got: Sequence[Dict[str, torch.Tensor]],
                       cuts: Sequence[float], min_iou: float = MIN_IOU) -> Optional[str]:
    """``None`` when every box at or above ``cuts[i]`` on either side has a same-class box at IoU >= ``min_iou``
    on the other; else a short description of the first one that does not."""
    for i, (a, b, cut) in enumerate(zip(ref, got, cuts)):
        for side, x, y in (("PyTorch", a, b), ("onnxruntime", b, a)):
            strong = x["scores"] >= cut
            iou = _box_iou(x["boxes"][strong], y["boxes"])
            same = x["labels"][strong][:, None] == y["labels"][None, :]
            best = (iou * same).amax(1) if iou.numel() else torch.zeros(int(strong.sum()))
            bad = (best < min_iou).nonzero().flatten()
            if len(bad):
                k = int(bad[0])
                box = [round(float(v), 1) for v in x["boxes"][strong][k]]
                return (f"image {i}: {side} box {box} of class {int(x['labels'][strong][k])} "
                        f"(score {float(x['scores'][strong][k]):.3f}) has no counterpart (best IoU {float(best[k]):.3f})")
    return None


def check_parity(model: nn.Module, onnx_bytes: bytes, images: torch.Tensor, conf: float = 0.001,
                 iou: float = 0.6, pre_nms_topk: int = 1000) -> Dict[str, Any]:
    """Run ``onnx_bytes`` in onnxruntime beside ``model`` on ``images``; MtkdError on a mismatch.

    Returns ``{"images", "max_abs_diff": {output: value}, "boxes_checked"}``.
    """
    from mtkd.heads.decode import nms

    ort = _require("onnxruntime")
    wrapper = OnnxWrapper(model).eval()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    if names != wrapper.output_names:
        raise MtkdError(f"ONNX parity: the graph's outputs are {names}, expected {wrapper.output_names}")
    with torch.no_grad():
        ref = dict(zip(names, wrapper(images)))
    got = {k: torch.from_numpy(v) for k, v in zip(names, session.run(None, {"images": images.numpy()}))}
    diffs: Dict[str, float] = {}
    for k in names:
        if ref[k].shape != got[k].shape:
            raise MtkdError(f"ONNX parity: {k} has shape {tuple(got[k].shape)} in onnxruntime, "
                            f"{tuple(ref[k].shape)} in PyTorch")
        diffs[k] = float((ref[k] - got[k]).abs().max()) if ref[k].numel() else 0.0
    for k in ("seg", "scores"):
        if k in diffs and not diffs[k] <= TOL:
            raise MtkdError(f"ONNX parity: {k} differs from PyTorch by {diffs[k]:.3g} (max abs; allowed {TOL:g})")
    checked = 0
    if "boxes" in names:
        # Both NMS runs rank by PyTorch's scores (checked above on their own): onnxruntime's
        # float noise would otherwise break exact ties (common in untrained or symmetric
        # models) the other way and keep a different box of an equivalent set.
        kw = dict(conf=conf, iou=iou, max_det=pre_nms_topk, pre_nms_topk=pre_nms_topk)
        a, b = nms(ref["boxes"], ref["scores"], **kw), nms(got["boxes"], ref["scores"], **kw)
        cuts = [_cut(s, conf, pre_nms_topk) for s in ref["scores"]]
        problem = compare_detections(a, b, cuts)
        if problem is not None:
            raise MtkdError(f"ONNX parity: after NMS, {problem}")
        checked = sum(int((d["scores"] >= c).sum()) for d, c in zip(a, cuts))
    return {"images": int(images.shape[0]), "max_abs_diff": diffs, "boxes_checked": checked}


def to_onnx(model: nn.Module, imgsz: int, opset: int = DEFAULT_OPSET, simplify: bool = True,
            metadata: Optional[Dict[str, Any]] = None) -> Tuple[bytes, Dict[str, Any]]:
    """Export ``model`` (CPU, eval) to ONNX bytes; returns ``(bytes, info)`` (``nodes``, ``simplified``)."""
    onnx = _require("onnx")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 11:
        raise MtkdError(f"--opset: expected an int >= 11, got {opset!r}")
    wrapper = OnnxWrapper(model).eval()
    x = torch.zeros(1, 3, int(imgsz), int(imgsz))
    dynamic = {name: {0: "batch"} for name in ["images"] + wrapper.output_names}
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(wrapper, (x,), buf, dynamo=False, opset_version=int(opset), input_names=["images"],
                              output_names=wrapper.output_names, dynamic_axes=dynamic, do_constant_folding=True)
    except Exception as exc:  # unsupported operators at this opset, ...
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise MtkdError(f"ONNX export (opset {opset}) failed: {reason}") from None
    proto = onnx.load_from_string(buf.getvalue())
    info = {"nodes_exported": len(proto.graph.node), "simplified": False}
    if simplify:
        onnxslim = _require("onnxslim")
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                proto = onnxslim.slim(proto)
            info["simplified"] = True
        except Exception as exc:  # keep the exported graph; parity is checked on whatever is written
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            warnings.warn(f"onnxslim failed ({reason}); writing the graph unsimplified", stacklevel=2)
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), value if isinstance(value, str) else json.dumps(value)
    info["nodes"] = len(proto.graph.node)
    data = proto.SerializeToString()
    onnx.checker.check_model(onnx.load_from_string(data))
    return data, info


def write_bytes_atomic(data: bytes, path: str | Path) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync, rename; a failure is a one-line MtkdError."""
    path = Path(path)
    if path.is_dir():
        raise MtkdError(f"{path}: cannot write: is a directory")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide a deployable file from other users
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise write_error(path, exc) from None


def export_onnx(model: nn.Module, path: str | Path, imgsz: int, images: torch.Tensor, *,
                opset: int = DEFAULT_OPSET, simplify: bool = True, conf: float = 0.001, iou: float = 0.6,
                metadata: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Export, check parity on ``images`` (N, 3, imgsz, imgsz), then write ``path``; returns a report."""
    model = model.float().cpu().eval()
    data, info = to_onnx(model, imgsz, opset, simplify, {"mtkd_format": ONNX_FORMAT, **(metadata or {})})
    parity = check_parity(model, data, images.float().cpu(), conf=conf, iou=iou)
    write_bytes_atomic(data, path)
    return {"path": str(path), "bytes": len(data), "opset": int(opset), **info, "parity": parity,
            "outputs": OnnxWrapper(model).output_names}


def val_images(cfg: Dict[str, Any], task: Any, n: int = CHECK_IMAGES) -> torch.Tensor:
    """The first ``n`` images of the config's val split through the evaluation transform, as one batch."""
    ds = task.build_dataset(cfg, "val", False)
    if len(ds) == 0:
        raise MtkdError("data.val: the val split is empty; the ONNX parity check needs images")
    return torch.stack([ds[i]["image"] for i in range(min(n, len(ds)))])


def export_checkpoint(cfg: Dict[str, Any], ckpt: str | Path, out: str | Path, *, fmt: str = "onnx",
                      opset: int = DEFAULT_OPSET, simplify: bool = True, int8: bool = False,
                      calib: Optional[int] = None, parity_images: Optional[int] = None,
                      parity_split: str = "val") -> Dict[str, Any]:
    """``mtkd export``: the checkpoint's model (pruned or not) as one ONNX file at ``out``, parity-checked.

    With ``int8`` the file is then quantised (:func:`mtkd.export.quantize.quantize_int8`, calibrated on
    ``calib`` train images, its metric drop measured on the first ``parity_images`` images of
    ``parity_split``); its report is the result's ``"int8"``.
    """
    from mtkd.engine.trainer import load_model
    from mtkd.export import quantize

    if fmt != "onnx":
        raise MtkdError(f"--format: only onnx is supported, got {fmt!r}")
    calib = quantize.DEFAULT_CALIB if calib is None else calib
    parity_images = quantize.DEFAULT_PARITY_IMAGES if parity_images is None else parity_images
    if int8:  # before the slow part
        quantize.check_count(calib, "--calib")
        quantize.check_count(parity_images, "--parity-images")
    for module in ("onnx", "onnxruntime") + (("onnxslim",) if simplify else ()):
        _require(module)
    if Path(out).is_dir():
        raise MtkdError(f"{out}: cannot write: is a directory")
    task, model, classes, _ = load_model(cfg, ckpt)
    if task.name != "multitask":
        raise MtkdError(f"{ckpt}: a {task.name!r} model; mtkd export handles multitask models")
    d = cfg["data"]
    imgsz = int(d["imgsz"])
    images = val_images(cfg, task)
    if tuple(images.shape[-2:]) != (imgsz, imgsz):
        raise MtkdError(f"data.imgsz: val images come out {tuple(images.shape[-2:])}, expected {imgsz}")
    meta = {"classes": list(classes), "imgsz": imgsz, "mean": list(d["mean"]), "std": list(d["std"])}
    meta["outputs"] = OnnxWrapper(model).output_names
    report = export_onnx(model, out, imgsz, images, opset=opset, simplify=simplify, conf=float(cfg["eval"]["conf"]),
                         iou=float(cfg["eval"]["iou"]), metadata=meta)
    if int8:
        report["int8"] = quantize.quantize_int8(cfg, task, out, calib=calib, parity_images=parity_images,
                                                parity_split=parity_split)
    return report


__all__ = ["OnnxWrapper", "check_parity", "compare_detections", "export_checkpoint", "export_onnx", "to_onnx",
           "write_bytes_atomic"]
