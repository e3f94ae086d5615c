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


class Killed(Exception):
    """Stands in for the process being killed right after ``last.pt`` was written."""


def _augmenting_cfg(roots, out, epochs, **train):
    t = {"epochs": epochs, "batch": 4, "workers": 0, "device": "cpu", "tensorboard": False, "plots": False,
         "warmup_epochs": 0.5}
    t.update(train)
    return build_config({
        "out": str(out),
        "data": {"root": str(roots["voc"]), "imgsz": 64,
                 "augment": {"hflip": 0.5, "scale": [0.7, 1.3], "translate": 0.1, "color": 0.3}},
        "train": t,
        "eval": {"max_det": 20},
    })


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_replays_the_augmentations_of_the_uninterrupted_run(tmp_path, monkeypatch, workers):
    roots = make_synthetic(tmp_path / "syn", n_train=8, n_val=2, n_test=2, imgsz=(64, 80), seed=0,
                           formats=("voc",))
    Trainer(_augmenting_cfg(roots, tmp_path / "full", epochs=2, workers=workers)).fit()

    end_of_epoch = Trainer._end_of_epoch

    def killed_after_epoch_1(self, means, validate):
        end_of_epoch(self, means, validate)
        raise Killed()

    monkeypatch.setattr(Trainer, "_end_of_epoch", killed_after_epoch_1)
    with pytest.raises(Killed):
        Trainer(_augmenting_cfg(roots, tmp_path / "part", epochs=2, workers=workers)).fit()
    monkeypatch.setattr(Trainer, "_end_of_epoch", end_of_epoch)
    assert torch.load(tmp_path / "part" / "last.pt", weights_only=True)["epoch"] == 1
    resumed = Trainer(_augmenting_cfg(roots, tmp_path / "part", epochs=2, workers=workers, resume=True))
    resumed.fit()
    assert resumed.start_epoch == 1

    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for key in ("model",):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), name
    for name, t in a["train_state"]["model"].items():
        assert torch.equal(t, b["train_state"]["model"][name]), name
    volatile = {"checkpoint", "train_wall_s", "latency_ms"}
    full = json.loads((tmp_path / "full" / "test_metrics.json").read_text())
    part = json.loads((tmp_path / "part" / "test_metrics.json").read_text())
    assert {k: v for k, v in full.items() if k not in volatile} == {k: v for k, v in part.items() if k not in volatile}


def test_imgsz_too_small_for_the_seg_head_is_a_config_error() -> None:
    from mtkd.engine.config import build_config
    from mtkd.tasks.multitask.task import MultiTaskTask
    from mtkd.errors import ConfigError

    task = MultiTaskTask()
    cfg = build_config({"model": {"preset": "student_small"}, "data": {"imgsz": 32}})
    with pytest.raises(ConfigError, match="data.imgsz: 32 is too small"):
        task.build_model(cfg, 3)
    # twice the GroupNorm group size, or a 2x2 stride-32 map, is enough
    assert task.build_model(build_config({"model": {"preset": "teacher_small"}, "data": {"imgsz": 32}}), 3)
    assert task.build_model(build_config({"model": {"preset": "student_small"}, "data": {"imgsz": 64}}), 3)
