"""Static INT8 quantisation of an exported mtkd ONNX file, with its metric drop as the parity report.

:func:`quantize_int8` (``mtkd export ... --int8``) writes ``<stem>.int8.onnx``
beside the fp32 file:

1. ``onnxruntime.quantization.quant_pre_process``: ONNX shape inference and
   onnxruntime's graph optimisation, which the quantizer asks for (it warns
   without them). Symbolic shape inference is skipped: it is meant for
   transformers and cannot complete on these graphs.
2. ``quantize_static``: QDQ format, signed INT8 weights (per channel) and
   activations, MinMax ranges calibrated on the first ``calib`` training
   images through the evaluation transform (the letterbox and normalisation
   of ``mtkd predict`` and the fp32 parity check).

The mtkd metadata of the fp32 file is kept (so ``mtkd predict --onnx`` runs
the INT8 file alike), plus ``quantization``. Quantised outputs are not equal
to the fp32 ones, so parity here is the metric drop: the fp32 and INT8 files
are both scored in onnxruntime by :func:`mtkd.tasks.multitask.evaluation.evaluate` on
the first ``parity_images`` images of the val split (``parity_split`` names
another), and ``<stem>.int8.json`` records both and ``drop`` = fp32 - int8
per metric.
"""
from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch

from mtkd.errors import ConfigError, MtkdError, writing

#: Training images the calibration sees by default (``--calib``).
DEFAULT_CALIB = 64
#: Val images the metric drop is measured on by default (``--parity-images``).
DEFAULT_PARITY_IMAGES = 100
#: Metrics whose fp32 - int8 drop the report gives (those the model's heads produce).
DROP_KEYS = ("map50_95", "map50", "miou")
_CALIB_BATCH = 8


def int8_paths(out: str | Path) -> tuple[Path, Path]:
    """``(<stem>.int8.onnx, <stem>.int8.json)`` beside the fp32 file ``out``."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix == ".onnx" else out
    return stem.with_name(stem.name + ".int8.onnx"), stem.with_name(stem.name + ".int8.json")


def check_count(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}: expected a whole number >= 1, got {value!r}")
    return value


def _images(dataset: Any, n: int) -> Iterator[np.ndarray]:
    """The first ``n`` images of ``dataset`` (its transform applied) in float32 batches."""
    for start in range(0, n, _CALIB_BATCH):
        batch = [dataset[i]["image"] for i in range(start, min(start + _CALIB_BATCH, n))]
        yield torch.stack(batch).float().numpy()


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """onnxruntime's quantizer logs per-tensor notes on the root logger (e.g. per-channel axes of GroupNorm
    scales it leaves per-tensor); keep warnings and above of mtkd's own callers only."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _calibration_reader(quantization: Any, dataset: Any, n: int) -> Any:
    class Calibration(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = _images(dataset, n)

        def get_next(self) -> Optional[Dict[str, np.ndarray]]:
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    return Calibration()


def metric_drop(cfg: Dict[str, Any], task: Any, fp32: str | Path, int8: str | Path, n: int,
                split: str = "val") -> Dict[str, Any]:
    """Both files scored in onnxruntime on the first ``n`` images of ``split``; ``drop`` = fp32 - int8."""
    from torch.utils.data import DataLoader, Subset

    from mtkd.export.runtime import OnnxModel

    ds = task.build_dataset(cfg, split, False)
    if len(ds) == 0:
        raise MtkdError(f"data.{split}: the {split} split is empty; the INT8 parity report needs images")
    n = min(n, len(ds))
    t = cfg["train"]
    report: Dict[str, Any] = {"split": split, "images": n}
    for name, path in (("fp32", fp32), ("int8", int8)):
        model = OnnxModel(path)
        if list(ds.classes) != model.classes:
            raise MtkdError(f"{path}: exported with classes {model.classes} but data.{split} has {list(ds.classes)}")
        loader = DataLoader(Subset(ds, range(n)), batch_size=t["batch"], num_workers=t["workers"],
                            collate_fn=task.collate)
        metrics = task.evaluate(model, loader, ds, cfg, torch.device("cpu"), False)
        report[name] = {k: float(metrics[k]) for k in DROP_KEYS if k in metrics}
    report["drop"] = {k: report["fp32"][k] - report["int8"][k] for k in report["fp32"]}
    return report


def quantize_int8(cfg: Dict[str, Any], task: Any, fp32: str | Path, *, calib: int = DEFAULT_CALIB,
                  parity_images: int = DEFAULT_PARITY_IMAGES, parity_split: str = "val") -> Dict[str, Any]:
    """Quantise the exported file ``fp32`` to ``<stem>.int8.onnx``, write ``<stem>.int8.json``; returns the report
    (its ``parity``: :func:`metric_drop` on ``parity_split``)."""
    from mtkd.export.onnx import _require, write_bytes_atomic

    calib = check_count(calib, "--calib")
    parity_images = check_count(parity_images, "--parity-images")
    onnx = _require("onnx")
    _require("onnxruntime")
    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process

    train = task.build_dataset(cfg, "train", False)  # evaluation transform: the inputs predict feeds
    if len(train) == 0:
        raise MtkdError("data.train: the train split is empty; INT8 calibration needs images")
    n_calib = min(calib, len(train))
    int8_path, report_path = int8_paths(fp32)
    with tempfile.TemporaryDirectory(prefix="mtkd-int8-") as tmp, _quiet_quantizer():
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        try:
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
            q.quantize_static(str(pre), str(out), _calibration_reader(q, train, n_calib),
                              quant_format=q.QuantFormat.QDQ, per_channel=True, activation_type=q.QuantType.QInt8,
                              weight_type=q.QuantType.QInt8, calibrate_method=q.CalibrationMethod.MinMax)
        except Exception as exc:  # the quantizer's own errors: unsupported graphs, shape inference
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise MtkdError(f"{fp32}: INT8 quantisation failed: {reason}") from None
        proto = onnx.load(str(out))
    props = {p.key: p.value for p in proto.metadata_props}
    for p in onnx.load(str(fp32)).metadata_props:  # the quantizer keeps them; make sure
        if p.key not in props:
            proto.metadata_props.add(key=p.key, value=p.value)
    setting = {"method": "static", "format": "QDQ", "per_channel": True, "weights": "int8", "activations": "int8",
               "calibration": "minmax", "calib_images": n_calib}
    proto.metadata_props.add(key="quantization", value=json.dumps(setting))
    data = proto.SerializeToString()
    write_bytes_atomic(data, int8_path)
    report = {"path": str(int8_path), "bytes": len(data), "fp32_path": str(fp32),
              "fp32_bytes": Path(fp32).stat().st_size, "quantization": setting}
    report["parity"] = metric_drop(cfg, task, fp32, int8_path, parity_images, parity_split)
    with writing(report_path):
        report_path.write_text(json.dumps(report, indent=2))
    report["report_path"] = str(report_path)
    return report


def summary(report: Dict[str, Any]) -> str:
    """Two lines for the command line: the file and the metric drop."""
    par = report["parity"]
    drops = ", ".join(f"{k} {par['fp32'][k]:.4f} -> {par['int8'][k]:.4f} (drop {par['drop'][k]:+.4f})"
                      for k in par["drop"])
    return (f"wrote {report['path']} ({report['bytes'] / 1e6:.2f} MB, {report['bytes'] / report['fp32_bytes']:.2f}x "
            f"the fp32 file; calibrated on {report['quantization']['calib_images']} train images)\n"
            f"INT8 parity on {par['images']} {par['split']} images (fp32 -> int8): {drops}; "
            f"report {report['report_path']}")


__all__ = ["DEFAULT_CALIB", "DEFAULT_PARITY_IMAGES", "int8_paths", "metric_drop", "quantize_int8", "summary"]
