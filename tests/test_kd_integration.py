"""Distillation end to end through the generic trainer, on tiny synthetic data.

The teacher is a randomly initialised student-preset model saved as a
checkpoint (:func:`benchmarks.common.random_checkpoint`): the tests check
the mechanics (losses fall as the student fits the teacher, a killed GAN run
resumes exactly, older checkpoints load, partial labels, class checks), not
the teacher's quality.
"""
from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest
import torch

from mtkd import checkpoint as ckpt_io
from mtkd.datasets import SYNTHETIC_CLASSES, make_synthetic
from mtkd.engine.config import load_config
from mtkd.engine.tasks import get_task
from mtkd.engine.trainer import Trainer, evaluate_checkpoint, predict_checkpoint, train
from mtkd.errors import ConfigError, MtkdError
from mtkd.losses.composer import LossComposer
from mtkd.structures import VOID

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import random_checkpoint  # noqa: E402

KD_CONFIG = ROOT / "mtkd" / "configs" / "synthetic_kd.yaml"


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


def test_yolo_kd_losses_train_from_a_multitask_config(tiny: dict) -> None:
    """The terms of `mtkd yolo train` (kd_cls, kd_dfl, kd_obj; kd_feat = cwd with adapt: all) as loss.extra entries."""
    out = tiny["root"] / "yolo_terms"
    extra = ("loss.extra=[{name: kd_cls, weight: 0.5}, {name: kd_dfl, weight: 0.25}, {name: kd_obj, weight: 0.1},"
             " {name: cwd, adapt: all, tau: 1.0}]")
    report = train(load_config(KD_CONFIG, _overrides(tiny, out, "train.epochs=1", extra)))
    assert report["epochs_run"] == 1
    row = _csv(out / "results.csv")[0]
    for term in ("kd_cls", "kd_dfl/dfl", "kd_obj", "cwd"):
        assert math.isfinite(float(row[f"train/extra/{term}"])) and float(row[f"train/extra/{term}"]) > 0, term


class _Killed(Exception):
    pass


def test_killed_feat_gan_run_resumes_exactly_and_old_format_checkpoint_loads(tiny: dict) -> None:
    gan = "loss.extra=[{name: feat_gan, weight: 1.0, d_channels: 8}]"
    straight = tiny["root"] / "gan_straight"
    train(load_config(KD_CONFIG, _overrides(tiny, straight, "train.epochs=2", gan)))  # 2 x 2 steps

    # the same run killed in epoch 2 (after last.pt of epoch 1), then resumed
    part = tiny["root"] / "gan_part"
    cfg = load_config(KD_CONFIG, _overrides(tiny, part, "train.epochs=2", gan))
    killed = Trainer(cfg)
    step = killed.train_step

    def dies_at_step_3(batch):
        if killed.step == 2:
            raise _Killed
        return step(batch)

    killed.train_step = dies_at_step_3
    with pytest.raises(_Killed):
        killed.fit()
    st1 = ckpt_io.load_checkpoint(part / "last.pt")["train_state"]
    assert int(st1["aux_optimizers"]["extra/feat_gan/disc"]["state"][0]["step"]) == 2
    resumed = Trainer(load_config(KD_CONFIG, _overrides(tiny, part, "train.epochs=2", gan, "train.resume=true")))
    assert resumed.fit()["epochs_run"] == 2 and resumed.start_epoch == 1

    a, b = (ckpt_io.load_checkpoint(d / "last.pt") for d in (straight, part))
    assert a["step"] == b["step"] == 4
    sa, sb = a["train_state"], b["train_state"]
    assert any(".disc." in k for k in sa["composer"])
    for part_name in ("model", "composer"):
        for k, t in sa[part_name].items():
            assert torch.equal(t, sb[part_name][k]), (part_name, k)
    (key,) = sa["aux_optimizers"]
    assert key == "extra/feat_gan/disc"
    da, db = sa["aux_optimizers"][key], sb["aux_optimizers"][key]
    assert int(da["state"][0]["step"]) == 4 and da["state"].keys() == db["state"].keys()
    for i, s in da["state"].items():
        for name, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(db["state"][i][name])), (i, name)

    # the previous format (D's Adam state in the loss's extra_state): eval, predict, teacher; resume refused
    old = dict(a, format="mtkd-ckpt-2")
    old_state = dict(sa, composer_extra={"extra/feat_gan": {"d_optim": sa["aux_optimizers"][key]}})
    del old_state["aux_optimizers"]
    old["train_state"] = old_state
    ckpt_io.save_atomic(old, tiny["root"] / "old.pt")
    old_path = tiny["root"] / "old.pt"
    ev_cfg = load_config(KD_CONFIG, _overrides(tiny, tiny["root"] / "old_eval", gan))
    assert "map50" in evaluate_checkpoint(ev_cfg, old_path, "val")
    image = next(Path(tiny["voc"]).rglob("*.jpg"))
    predict_checkpoint(ev_cfg, old_path, image, tiny["root"] / "old_pred")
    assert any((tiny["root"] / "old_pred").iterdir())
    as_teacher = load_config(KD_CONFIG, _overrides(tiny, tiny["root"] / "old_teacher", f"teacher.ckpt={old_path}"))
    student = get_task("multitask").build_model(as_teacher, len(SYNTHETIC_CLASSES))
    teacher = get_task("multitask").build_teacher(as_teacher, len(SYNTHETIC_CLASSES), student)
    assert teacher is not None
    with pytest.raises(MtkdError, match="start the run fresh") as err:
        Trainer(load_config(KD_CONFIG, _overrides(tiny, tiny["root"] / "old_resume", gan,
                                                  f"train.resume={old_path}"))).fit()
    assert "\n" not in str(err.value) and "mtkd-ckpt-2" in str(err.value) and str(old_path) in str(err.value)


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


def _unlabeled_folder(tiny: dict) -> Path:
    """Six images without labels: the synthetic val/test images, one of them in a subfolder."""
    import shutil

    folder = tiny["root"] / "unlabeled"
    if not folder.is_dir():
        jpgs = sorted((tiny["voc"] / "JPEGImages").glob("*.jpg"))[-6:]
        for k, jpg in enumerate(jpgs):
            dst = folder / ("sub" if k == 0 else "") / f"u{k}.jpg"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(jpg, dst)
    return folder


def test_unlabeled_folder_kd_run_mixes_batches_with_finite_hard_losses(tiny: dict) -> None:
    out = tiny["root"] / "unlabeled_run"
    folder = _unlabeled_folder(tiny)
    cfg = load_config(KD_CONFIG, _overrides(tiny, out, "train.epochs=1", "train.max_steps=2", "loss.extra=[]",
                                            f"data.unlabeled={folder}", "data.unlabeled_ratio=0.5"))
    tr = Trainer(cfg)
    seen = []
    step = tr.train_step

    def recording_step(batch):
        logs = step(batch)
        seen.append((batch["index"].tolist(), batch["has_det"].tolist(), batch["has_seg"].tolist(), logs))
        return logs

    tr.train_step = recording_step
    report = tr.fit()
    assert report["steps"] == 2 and len(seen) == 2
    n_labeled = len(tr.train_ds)
    assert n_labeled == 8 and len(tr.unlabeled_ds) == 6
    assert len(tr.train_loader) == 4  # 8 labelled images, 2 a batch
    for index, has_det, has_seg, logs in seen:
        assert len(index) == 4
        assert all(i < n_labeled for i in index[:2]) and all(has_det[:2])
        assert all(n_labeled <= i < n_labeled + 6 for i in index[2:])
        assert not any(has_det[2:]) and not any(has_seg[2:])
        for term in ("det/hard", "seg/hard", "det/soft/det_mse", "seg/soft/seg_kl", "total"):
            assert math.isfinite(logs[term]), (term, logs[term])
        assert logs["seg/soft/seg_kl"] > 0


def test_unlabeled_without_teacher_is_one_line_config_error(tiny: dict) -> None:
    cfg = load_config(KD_CONFIG, _overrides(tiny, tiny["root"] / "noteacher", "teacher.ckpt=null",
                                            f"data.unlabeled={_unlabeled_folder(tiny)}"))
    with pytest.raises(ConfigError) as info:
        Trainer(cfg).build()
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("data.unlabeled:") and "teacher" in msg


def test_unlabeled_missing_folder_is_one_line_error_naming_key_and_path(tiny: dict) -> None:
    missing = tiny["root"] / "no_such_folder"
    cfg = load_config(KD_CONFIG, _overrides(tiny, tiny["root"] / "missing", f"data.unlabeled={missing}"))
    with pytest.raises(MtkdError) as info:
        Trainer(cfg).build()
    msg = str(info.value)
    assert "\n" not in msg and "data.unlabeled" in msg and str(missing) in msg
    # a ratio leaving no labelled image in a batch is refused by name
    cfg = load_config(KD_CONFIG, _overrides(tiny, tiny["root"] / "ratio", f"data.unlabeled={_unlabeled_folder(tiny)}",
                                            "data.unlabeled_ratio=0.9"))
    with pytest.raises(ConfigError, match=r"^data\.unlabeled_ratio: "):
        Trainer(cfg).build()
