"""Distillation end to end through the generic trainer, on tiny synthetic data.

The teacher is a randomly initialised student-preset model saved as a
checkpoint (:func:`benchmarks.common.random_checkpoint`): the tests check
the mechanics (losses fall as the student fits the teacher, resume restores
the discriminator, partial labels, class checks), not the teacher's quality.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

import mtkd  # noqa: F401  (offline switches first)
from mtkd.datasets import SYNTHETIC_CLASSES, make_synthetic
from mtkd.engine import checkpoint as ckpt_io
from mtkd.engine.config import load_config
from mtkd.engine.logger import RunLogger
from mtkd.engine.trainer import Trainer, train
from mtkd.errors import ConfigError
from mtkd.losses.composer import LossComposer
from mtkd.structures import VOID

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import random_checkpoint  # noqa: E402

KD_CONFIG = ROOT / "configs" / "synthetic_kd.yaml"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("kd")
    roots = make_synthetic(root / "data", n_train=8, n_val=2, n_test=2, imgsz=(48, 64), seed=3,
                           seg_missing=0.25, formats=("voc",))
    teacher = random_checkpoint(root / "teacher.pt", {"preset": "student"}, SYNTHETIC_CLASSES, seed=1)
    return {"root": root, "voc": roots["voc"], "teacher": teacher}


def _overrides(tiny: dict, out: Path, *extra: str) -> list:
    return [f"data.root={tiny['voc']}", "data.imgsz=64", f"teacher.ckpt={tiny['teacher']}", f"out={out}",
            "train.batch=4", "train.workers=0", "train.warmup_epochs=0", "train.lr=0.003", "train.ema=false",
            "train.plots=false", "train.tensorboard=false", "eval.max_batches=1", "data.augment={hflip: 0.0}",
            *extra]


def _csv(path: Path) -> list:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_short_distillation_run_kd_losses_fall(tiny: dict) -> None:
    out = tiny["root"] / "fall"
    # distillation alone (alpha = 1: the hard terms would pull the student elsewhere on 2 steps an
    # epoch), logit terms only (the GAN's generator term is adversarial and need not fall); det_mse
    # ungated, since a random teacher has no anchor above the gate and its obj term alone is ~1e-3
    cfg = load_config(KD_CONFIG, _overrides(tiny, out, "train.epochs=3", "loss.extra=[]",
                                            "loss.det.alpha=1.0", "loss.seg.alpha=1.0",
                                            "loss.det.soft=[{name: det_mse, gate: false, w_box: 0.01}]"))
    report = train(cfg)
    assert report["epochs_run"] == 3
    rows = _csv(out / "results.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for term in ("train/seg/soft/seg_kl", "train/det/soft/det_mse"):
        first, last = float(rows[0][term]), float(rows[-1][term])
        assert last < 0.9 * first, f"{term} did not fall: {first} -> {last}"


def test_resume_restores_discriminator_and_its_optimizer(tiny: dict) -> None:
    out = tiny["root"] / "gan"
    loss = ("loss.extra=[{name: feat_gan, weight: 1.0, d_channels: 8}]")
    train(load_config(KD_CONFIG, _overrides(tiny, out, "train.epochs=1", loss)))
    saved = ckpt_io.load_checkpoint(out / "last.pt")
    st = saved["train_state"]
    d_keys = [k for k in st["composer"] if ".disc." in k]
    assert d_keys, "no discriminator weights in the checkpoint"
    d_optim = st["composer_extra"]["extra/feat_gan"]["d_optim"]
    steps_epoch1 = saved["step"]
    assert all(int(s["step"]) == steps_epoch1 for s in d_optim["state"].values())

    # restored state, before any further training
    cfg = load_config(KD_CONFIG, _overrides(tiny, out, "train.epochs=2", loss, "train.resume=true"))
    tr = Trainer(cfg)
    tr.build()
    tr.logger = RunLogger(out, enabled=False, tensorboard=False)
    assert tr._resume() == 1
    now = tr.composer.state_dict()
    for k in d_keys:
        assert torch.equal(now[k], st["composer"][k]), k
    restored = tr.composer.extra_state()["extra/feat_gan"]["d_optim"]
    for idx, s in d_optim["state"].items():
        for name, v in s.items():
            assert torch.equal(torch.as_tensor(restored["state"][idx][name]), torch.as_tensor(v)), (idx, name)

    # the resumed run continues the same D optimizer and ends at epoch 2
    report = train(cfg)
    assert report["epochs_run"] == 2
    assert [int(r["epoch"]) for r in _csv(out / "results.csv")] == [1, 2]
    final = ckpt_io.load_checkpoint(out / "last.pt")
    steps = final["step"]
    assert steps > steps_epoch1
    d_final = final["train_state"]["composer_extra"]["extra/feat_gan"]["d_optim"]
    assert all(int(s["step"]) == steps for s in d_final["state"].values())
    assert any(not torch.equal(final["train_state"]["composer"][k], st["composer"][k]) for k in d_keys)


def test_partial_labels_hard_seg_masked_but_seg_kl_supervises() -> None:
    torch.manual_seed(0)
    b, k, h, w = 2, 4, 8, 8
    composer = LossComposer({"seg": {"alpha": 0.5, "hard": {"name": "seg_ce"},
                                     "soft": [{"name": "seg_kl", "T": 2.0}]}}, with_teacher=True)
    masks = torch.randint(0, k, (b, h, w))
    masks[1] = VOID  # the collate's mask of a sample without seg labels
    batch = {"masks": masks, "has_seg": torch.tensor([True, False]),
             "letterbox": torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]),
             "orig_sizes": torch.tensor([[h, w], [h, w]])}
    teacher = {"seg": torch.randn(b, k, h, w)}
    student = torch.randn(b, k, h, w, requires_grad=True)
    _, logs = composer({"seg": student}, teacher, batch)

    # hard seg loss: sample 1 contributes nothing (value and gradient)
    hard = composer.hard["seg"]({"seg": student}, teacher, batch)["ce"]
    (g_hard,) = torch.autograd.grad(hard, student)
    assert g_hard[1].abs().sum() == 0 and g_hard[0].abs().sum() > 0
    only0 = composer.hard["seg"]({"seg": student[:1]}, None,
                                 {"masks": masks[:1], "has_seg": torch.tensor([True])})["ce"]
    assert torch.allclose(hard, only0)
    assert torch.allclose(logs["seg/hard"], only0.detach())

    # seg_kl: the teacher supervises sample 1
    kl = composer.soft["seg"]["seg_kl"]({"seg": student}, teacher, batch)
    (g_kl,) = torch.autograd.grad(kl, student)
    assert g_kl[1].abs().sum() > 0
    assert logs["seg/soft/seg_kl"] > 0
    # the composed total: (1 - a) * hard + a * soft
    assert torch.allclose(logs["seg"], 0.5 * logs["seg/hard"] + 0.5 * logs["seg/soft/seg_kl"])


def test_teacher_class_count_mismatch_is_one_line_config_error(tiny: dict) -> None:
    bad = random_checkpoint(tiny["root"] / "teacher3.pt", {"preset": "student"}, ["a", "b", "c"])
    cfg = load_config(KD_CONFIG, _overrides(tiny, tiny["root"] / "bad", f"teacher.ckpt={bad}"))
    with pytest.raises(ConfigError) as info:
        Trainer(cfg).build()
    msg = str(info.value)
    assert "\n" not in msg and "teacher.ckpt" in msg and str(bad) in msg
    assert "3 classes" in msg and f"student has {len(SYNTHETIC_CLASSES)}" in msg
