"""Run an exported ``.onnx`` file in onnxruntime as mtkd runs its own models.

:class:`OnnxModel` wraps an onnxruntime session in a module whose output dict
is the exported form of a model's (``"boxes"``, ``"scores"``, ``"seg"``, see
:mod:`mtkd.export.onnx`), so :func:`mtkd.tasks.multitask.predict.predict_folder` and
:func:`mtkd.tasks.multitask.evaluation.evaluate` decode, un-letterbox and score it with
the same code as a PyTorch model. Everything it needs (class names, input
size, normalisation, outputs) comes from the file's ``metadata_props``, which
``mtkd export`` writes; no config or checkpoint is read.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from mtkd.errors import MtkdError

#: Metadata keys an mtkd export carries, and the JSON type each must decode to.
METADATA = {"classes": list, "imgsz": int, "mean": list, "std": list, "outputs": list}


def read_metadata(proto_props: Any, path: str | Path) -> Dict[str, Any]:
    """The mtkd metadata of an ONNX model (its ``metadata_props``, or a ``{key: value}`` mapping);
    MtkdError naming ``path`` when it is not an mtkd export or a value is malformed."""
    from mtkd.export.onnx import ONNX_FORMAT

    props = dict(proto_props) if isinstance(proto_props, dict) else {p.key: p.value for p in proto_props}
    if props.get("mtkd_format") != ONNX_FORMAT:
        raise MtkdError(f"{path}: not an mtkd ONNX export (metadata mtkd_format is "
                        f"{props.get('mtkd_format')!r}, expected {ONNX_FORMAT!r}); write it with mtkd export")
    meta: Dict[str, Any] = {}
    for key, kind in METADATA.items():
        try:
            value = json.loads(props[key])
        except (KeyError, ValueError):
            raise MtkdError(f"{path}: metadata {key!r} is missing or not JSON") from None
        if not isinstance(value, kind) or isinstance(value, bool):
            raise MtkdError(f"{path}: metadata {key!r} should be a JSON {kind.__name__}, got {value!r}")
        meta[key] = value
    if len(meta["mean"]) != 3 or len(meta["std"]) != 3:
        raise MtkdError(f"{path}: metadata mean/std should have 3 values each")
    meta["quantization"] = props.get("quantization")
    return meta


class OnnxModel(nn.Module):
    """An exported mtkd model in onnxruntime (CPU): ``images (B, 3, S, S) -> {"boxes", "scores", "seg"}``.

    ``classes``, ``imgsz``, ``mean``, ``std`` and ``outputs`` are the file's
    metadata (:func:`read_metadata`). A missing file, a file onnxruntime
    cannot load or one without mtkd metadata is an MtkdError naming it.
    ``threads`` sets onnxruntime's intra-op threads (0: its default).
    """

    def __init__(self, path: str | Path, threads: int = 0):
        super().__init__()
        from mtkd.export.onnx import _require

        ort = _require("onnxruntime")
        path = Path(path)
        if not path.is_file():
            raise MtkdError(f"{path}: ONNX file not found")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable or invalid graphs
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise MtkdError(f"{path}: not a valid ONNX model ({reason})") from None
        meta = read_metadata(self.session.get_modelmeta().custom_metadata_map, path)
        names = [o.name for o in self.session.get_outputs()]
        if names != meta["outputs"]:
            raise MtkdError(f"{path}: the graph's outputs are {names}, its metadata says {meta['outputs']}")
        self.path = path
        self.classes: List[str] = [str(c) for c in meta["classes"]]
        self.imgsz: int = meta["imgsz"]
        self.mean: List[float] = [float(v) for v in meta["mean"]]
        self.std: List[float] = [float(v) for v in meta["std"]]
        self.output_names: List[str] = names
        self.quantization: Optional[str] = meta["quantization"]

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = np.ascontiguousarray(images.detach().float().cpu().numpy())
        return {k: torch.from_numpy(v) for k, v in zip(self.output_names, self.session.run(None, {"images": x}))}


def predict_onnx(path: str | Path, source: str | Path, out: str | Path, conf: float = 0.25, iou: float = 0.6,
                 max_det: int = 300) -> List[Dict[str, Any]]:
    """``mtkd predict --onnx``: :func:`mtkd.tasks.multitask.predict.predict_folder` with the file in onnxruntime."""
    from mtkd.tasks.multitask.predict import predict_folder

    model = OnnxModel(path)
    return predict_folder(model, source, out, model.classes, model.imgsz, model.mean, model.std, conf=conf,
                          iou=iou, max_det=max_det)


__all__ = ["OnnxModel", "predict_onnx", "read_metadata"]
