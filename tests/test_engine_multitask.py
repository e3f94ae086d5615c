"""The real stack through the trainer: synthetic VOC data, the student preset,
yolo_det + seg_ce, evaluation, val_pred.png and the test report (~20 s on a CPU)."""
from __future__ import annotations

import json

import pytest
import torch

from mtkd.datasets import SYNTHETIC_CLASSES, make_synthetic
from mtkd.engine.config import build_config
from mtkd.engine.trainer import Trainer


@pytest.mark.slow
def test_multitask_student_one_epoch_on_synthetic(tmp_path):
    roots = make_synthetic(tmp_path / "syn", n_train=8, n_val=2, n_test=2, imgsz=(64, 80), seed=0,
                           formats=("voc",))
    out = tmp_path / "run"
    cfg = build_config({
        "out": str(out),
        "data": {"root": str(roots["voc"]), "imgsz": 64, "augment": {"hflip": 0.5, "scale": None, "color": 0.0}},
        "train": {"epochs": 1, "batch": 4, "workers": 0, "device": "cpu", "tensorboard": False,
                  "plots": True},
        "eval": {"max_det": 20},
    })
    report = Trainer(cfg).fit()
    assert report["steps"] == 2
    saved = json.loads((out / "test_metrics.json").read_text())
    for key in ("map50_95", "map50", "miou", "params", "gflops", "latency_ms"):
        assert key in saved
    assert 0.0 <= saved["miou"] <= 1.0 and saved["params"] > 0 and saved["gflops"] > 0
    assert (out / "val_pred.png").stat().st_size > 0 and (out / "curves.png").is_file()
    ck = torch.load(out / "best.pt", weights_only=True)
    assert ck["task"] == "multitask" and ck["classes"] == SYNTHETIC_CLASSES
    assert "train_state" in torch.load(out / "last.pt", weights_only=True)
