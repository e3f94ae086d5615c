"""The ``classify`` task through the generic trainer: a tiny distillation run and predict."""
import json

import pytest

import mtkd.tasks.classify.task  # noqa: F401  (registers the "classify" task)
from mtkd.engine.config import build_config
from mtkd.engine.trainer import predict_checkpoint, train
from mtkd.tasks.classify import make_synthetic_imagefolder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clsrun")
    root = make_synthetic_imagefolder(tmp / "data", n_classes=3, n_per_class=4, imgsz=24, seed=1)
    cfg = build_config({
        "task": "classify", "out": str(tmp / "run"),
        "data": {"format": "imagefolder", "root": str(root), "imgsz": 24, "mean": None, "std": None},
        "teacher": {"model": {"name": "cnn4", "widths": [8, 16, 16, 32], "hidden": 16}},
        "loss": {"extra": [{"name": "ce", "weight": 0.3}, {"name": "st", "weight": 0.7, "T": 4.0},
                           {"name": "fitnet", "weight": 0.1, "feats": ["f3", "f4"]},
                           {"name": "ft", "feats": ["f4"], "para_steps": 1}]},
        "train": {"epochs": 1, "batch": 6, "workers": 0, "ema": False, "tensorboard": False, "plots": True,
                  "device": "cpu"},
    })
    report = train(cfg)
    return tmp, root, cfg, report


def test_distillation_run_reports_top1_and_logs_terms(run):
    tmp, _, cfg, report = run
    out = tmp / "run"
    assert report["split"] == "test" and 0.0 <= report["top1"] <= 100.0 and report["steps"] == 2
    saved = json.loads((out / "test_metrics.json").read_text())
    assert saved["top1"] == report["top1"]
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    for col in ("train/extra/ce", "train/extra/st", "train/extra/fitnet", "train/extra/ft",
                "train/extra/ft/para_loss", "val/top1"):
        assert col in header
    assert (out / "val_pred.png").is_file()
    assert "mean: null" not in (out / "config.yaml").read_text()  # computed stats recorded for predict


def test_predict_checkpoint_writes_lines(run):
    tmp, root, cfg, _ = run
    from mtkd.engine.config import load_config

    saved = load_config(tmp / "run" / "config.yaml")
    lines = predict_checkpoint(saved, tmp / "run" / "best.pt", root / "val", tmp / "pred")
    assert len(lines) == 3
    assert (tmp / "pred" / "predictions.txt").read_text().splitlines() == lines
    assert all(len(line.split(" ")) == 3 for line in lines)
