"""Trainer, checkpoints, EMA and budgets on a tiny stand-in task (seconds on a CPU).

The stand-in ("toy") task is a 1-class segmentation problem on 16x16 random
images whose label is a fixed function of the pixels, with a BatchNorm model
and a registered loss that carries a lazy adapter (so the trainer's lazy
forward and ``student_parameters`` are exercised) and counts optimizer steps
through ``aux_step`` (so it can emit a NaN at a chosen step). ``toy_aux``
declares an auxiliary group (a 1x1 critic on the detached seg logits) for
the trainer to step.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mtkd import checkpoint as ckpt_io
from mtkd.engine.callbacks import EarlyStopping, Plots
from mtkd.engine.config import build_config
from mtkd.engine.ema import ModelEMA
from mtkd.engine.tasks import register_task
from mtkd.engine.trainer import Trainer, WarmupDecay, evaluate_checkpoint
from mtkd.errors import ConfigError, MtkdError
from mtkd.losses.base import AuxGroup, Loss, register


class ToyData(torch.utils.data.Dataset):
    classes = ["blob"]

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, 16, 16, generator=g)
        self.masks = (self.images[:, 0] + 0.5 * self.images[:, 1] > 0).long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return {"image": self.images[i], "mask": self.masks[i], "index": i}


class ToyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> Dict[str, Any]:
        f = self.body(x)
        return {"seg": self.head(f), "feats": {"p3": f}}


@register_task("toy")
class ToyTask:
    name = "toy"

    def build_dataset(self, cfg: Dict[str, Any], split: str, train: bool) -> ToyData:
        name = cfg["data"][split]  # the split the config key names, as mtkd's datasets read it
        return ToyData({"train": 24, "val": 8, "test": 8}[name], seed={"train": 1, "val": 2, "test": 3}[name])

    def collate(self, items: List[Dict[str, Any]]) -> Dict[str, Any]:
        return {"images": torch.stack([x["image"] for x in items]),
                "masks": torch.stack([x["mask"] for x in items]),
                "index": torch.tensor([x["index"] for x in items])}

    def build_model(self, cfg: Dict[str, Any], num_classes: int) -> nn.Module:
        return ToyNet()

    def build_teacher(self, cfg: Dict[str, Any], num_classes: int, student: nn.Module) -> None:
        return None

    def evaluate(self, model, loader, dataset, cfg, device, amp) -> Dict[str, float]:
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for batch in loader:
                pred = model(batch["images"].to(device))["seg"].argmax(1)
                correct += (pred == batch["masks"].to(device)).sum().item()
                total += batch["masks"].numel()
        return {"pixel_acc": correct / total}

    def fitness(self, metrics: Dict[str, float]) -> float:
        return metrics["pixel_acc"]

    def model_info(self, model: nn.Module, cfg: Dict[str, Any]) -> Dict[str, float]:
        # the real mtkd.models.info.model_info imports timm/smp: too slow for torchrun workers here
        return {"params": sum(p.numel() for p in model.parameters()), "gflops": 0.0, "latency_ms": 0.0}

    def draw_val(self, model, dataset, path, cfg, device) -> None:
        with torch.no_grad():
            pred = model.eval()(dataset[0]["image"][None].to(device))["seg"].argmax(1)[0]
        Image.fromarray((pred.cpu().numpy() * 255).astype("uint8")).save(path)

    def predict(self, model, source, out, classes, cfg, device) -> None:
        raise NotImplementedError("the toy task has no predictor")


@register("toy_seg")
class ToySegLoss(Loss):
    """Cross-entropy plus a tiny penalty through a lazy 1x1 adapter on ``feats.p3``.

    ``nan_step``: return NaN once, for the optimizer step with that number
    (steps counted through ``aux_step``; 0 = never, -1 = at every step).
    """

    def __init__(self, nan_step: int = 0):
        super().__init__()
        self.adapter = nn.LazyConv2d(4, 1)
        self.nan_step = nan_step
        self.steps = 0
        self.fired = False

    def forward(self, student_out, teacher_out, batch):
        ce = F.cross_entropy(student_out["seg"], batch["masks"])
        reg = 1e-3 * self.adapter(student_out["feats"]["p3"]).pow(2).mean()
        if self.training and self.nan_step == -1:
            return {"ce": ce * float("nan"), "reg": reg}
        if self.training and not self.fired and self.steps + 1 == self.nan_step:
            self.fired = True
            return {"ce": ce * float("nan"), "reg": reg}
        return {"ce": ce, "reg": reg}

    def aux_step(self, student_out, teacher_out, batch) -> Dict[str, float]:
        self.steps += 1
        return {"steps": self.steps}


@register("toy_aux")
class ToyAuxLoss(Loss):
    """Zero for the student; its auxiliary group ``critic`` (SGD, ``lr``, every ``every`` steps)
    fits a 1x1 conv on the detached seg logits to 1 and counts its steps."""

    def __init__(self, lr: float = 0.5, every: int = 1):
        super().__init__()
        self.critic = nn.Conv2d(2, 1, 1)
        self.lr, self.every = lr, every
        self.stepped = 0

    def forward(self, student_out, teacher_out, batch):
        return 0.0 * student_out["seg"].sum()

    def aux_groups(self):
        return [AuxGroup("critic", self.critic, self.fit, optimizer="sgd", lr=self.lr, momentum=0.9,
                         every=self.every, after=self.count)]

    def fit(self, student_out, teacher_out, batch):
        assert not student_out["seg"].requires_grad  # detached outputs
        loss = (self.critic(student_out["seg"]) - 1).pow(2).mean()
        return loss, {"critic_loss": float(loss.detach())}

    def count(self):
        self.stepped += 1


def toy_cfg(out: Path, **train: Any) -> Dict[str, Any]:
    t = {"epochs": 2, "batch": 8, "lr": 0.02, "workers": 0, "device": "cpu", "warmup_epochs": 0.5,
         "tensorboard": False, "plots": False, "ema_tau": 3.0, "ema_decay": 0.9}
    t.update(train)
    return build_config({"task": "toy", "out": str(out), "loss": {"seg": {"hard": {"name": "toy_seg"}}},
                         "train": t})


def read_rows(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_run_writes_outputs_and_loss_falls(tmp_path):
    cfg = toy_cfg(tmp_path / "run", epochs=3, tensorboard=True, plots=True)
    trainer = Trainer(cfg)
    report = trainer.fit()
    out = tmp_path / "run"
    for name in ("results.csv", "curves.png", "val_pred.png", "last.pt", "best.pt", "test_metrics.json",
                 "config.yaml"):
        assert (out / name).is_file(), name
    assert list((out / "tb").iterdir()), "no TensorBoard events"
    rows = read_rows(out / "results.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    losses = [float(r["train/total"]) for r in rows]
    assert losses[-1] < losses[0]
    assert {"train/seg/hard/ce", "train/seg/hard/reg", "train/seg/hard/steps", "val/pixel_acc"} <= set(rows[0])
    # 24 images, batch 8 -> 3 steps per epoch
    assert int(rows[-1]["step"]) == 9 and report["steps"] == 9
    saved = json.loads((out / "test_metrics.json").read_text())
    assert saved["split"] == "test" and saved["params"] > 0 and 0.0 <= saved["pixel_acc"] <= 1.0
    assert saved["best_epoch"] in (1, 2, 3)
    # weights_only loading works on both checkpoints
    for name in ("last.pt", "best.pt"):
        ck = torch.load(out / name, weights_only=True)
        assert ck["format"] == ckpt_io.FORMAT and ck["classes"] == ["blob"]
    last = torch.load(out / "last.pt", weights_only=True)
    # the lazy adapter materialised, joined the optimizer and is checkpointed
    adapter_w = last["train_state"]["composer"]["hard.seg.adapter.weight"]
    assert adapter_w.shape == (4, 8, 1, 1)
    n_opt = sum(len(g["params"]) for g in last["train_state"]["optimizer"]["param_groups"])
    assert n_opt == len(list(ToyNet().parameters())) + 2
    # best.pt holds the EMA weights, which differ from the raw weights
    assert not torch.equal(last["model"]["head.weight"], last["train_state"]["model"]["head.weight"])


def test_run_prints_and_records_its_class_list(tmp_path, capsys):
    # An unknown class name in the annotations becomes a class when data.classes is unset:
    # the run names the list it trains on, and records it in the run folder.
    Trainer(toy_cfg(tmp_path / "run", epochs=1)).fit()
    assert "classes (1, read from the data): blob" in capsys.readouterr().out
    assert (tmp_path / "run" / "classes.txt").read_text(encoding="utf-8").splitlines() == ["blob"]


def test_resume_matches_uninterrupted_run(tmp_path):
    full = Trainer(toy_cfg(tmp_path / "full", epochs=2))
    full.fit()
    crashing = toy_cfg(tmp_path / "part", epochs=2)
    crashing["loss"]["seg"]["hard"]["nan_step"] = 4  # dies in epoch 2, after last.pt of epoch 1
    with pytest.raises(MtkdError, match="step 4"):
        Trainer(crashing).fit()
    assert torch.load(tmp_path / "part" / "last.pt", weights_only=True)["epoch"] == 1
    resumed = Trainer(toy_cfg(tmp_path / "part", epochs=2, resume=True))
    resumed.fit()
    assert resumed.start_epoch == 1  # continued at epoch 2 (0-based 1)
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"] == 6
    for key in ("model",):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), name
    for name, t in a["train_state"]["model"].items():
        assert torch.equal(t, b["train_state"]["model"][name]), name
    assert torch.equal(a["train_state"]["composer"]["hard.seg.adapter.weight"],
                       b["train_state"]["composer"]["hard.seg.adapter.weight"])
    assert [r["epoch"] for r in read_rows(tmp_path / "part" / "results.csv")] == ["1", "2"]


def _aux_cfg(out: Path, every: int = 1, **train: Any) -> Dict[str, Any]:
    cfg = toy_cfg(out, **train)
    cfg["loss"]["extra"] = [{"name": "toy_aux", "every": every}]
    return cfg


def _recorded_run(cfg: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Fit ``cfg``; per main step: the logs, the toy_aux group's step count, lr, the student's
    schedule factor of that step and the critic's weight."""
    trainer, records = Trainer(cfg), []
    train_step = trainer.train_step

    def record(batch):
        logs = train_step(batch)
        entry = trainer.aux.entries[0]
        records.append({"logs": logs, "stepped": trainer.composer.extra["toy_aux"].stepped,
                        "lr": entry.optimizer.param_groups[0]["lr"],
                        "factor": trainer.schedule(trainer.scheduler.last_epoch - 1),  # this step's
                        "critic": entry.group.module.weight.detach().clone()})
        return logs

    trainer.train_step = record
    trainer.fit()
    return records


def test_trainer_steps_and_checkpoints_declared_aux_groups(tmp_path):
    # every 2nd step, at its constant lr, not clipped to the student's (tiny) grad_clip
    rec = _recorded_run(_aux_cfg(tmp_path / "run", every=2, epochs=2, grad_clip=1e-6))
    assert [r["stepped"] for r in rec] == [0, 1, 1, 2, 2, 3]
    assert ["extra/toy_aux/critic_loss" in r["logs"] for r in rec] == [False, True] * 3
    assert all(r["lr"] == 0.5 for r in rec)
    assert (rec[1]["critic"] - rec[0]["critic"]).abs().max() > 1e-3
    assert torch.equal(rec[2]["critic"], rec[1]["critic"])
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert last["format"] == ckpt_io.FORMAT == "mtkd-ckpt-3"
    st = last["train_state"]
    assert set(st["aux_optimizers"]) == {"extra/toy_aux/critic"}
    assert st["aux_optimizers"]["extra/toy_aux/critic"]["state"][0]["momentum_buffer"].shape == (1, 2, 1, 1)
    n_main = sum(len(g["params"]) for g in st["optimizer"]["param_groups"])
    assert n_main == len(list(ToyNet().parameters())) + 2  # the critic is not in the student's optimizer


def test_aux_schedule_and_aux_grad_clip_apply_the_run_s_schedule_and_clipping(tmp_path):
    rec = _recorded_run(_aux_cfg(tmp_path / "run", epochs=2, grad_clip=1e-6, aux_schedule=True, aux_grad_clip=True))
    assert [r["lr"] for r in rec] == pytest.approx([0.5 * r["factor"] for r in rec])
    assert rec[-1]["lr"] < 0.5 * 0.02
    assert all((r["critic"] - q["critic"]).abs().max() < 1e-5 for q, r in zip(rec, rec[1:]))


def test_aux_step_goes_through_the_grad_scaler_and_clips_unscaled_gradients():
    from mtkd.engine.aux import AuxOptimizers

    out = {"seg": torch.randn(2, 2, 4, 4)}
    plain, scaled = ToyAuxLoss(lr=0.1), ToyAuxLoss(lr=0.1)
    scaled.load_state_dict(plain.state_dict())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    for grad_clip in (0.0, 0.05):
        a = AuxOptimizers([("", plain)]).step(1, out, None, {}, grad_clip=grad_clip)
        b = AuxOptimizers([("", scaled)]).step(1, out, None, {}, scaler, grad_clip)
        scaler.update()
        assert a == b
        for x, y in zip(plain.parameters(), scaled.parameters()):
            assert torch.allclose(x, y, atol=1e-7)
    inf = {"seg": torch.full((2, 2, 4, 4), float("inf"))}
    before = [p.detach().clone() for p in scaled.parameters()]
    AuxOptimizers([("", scaled)]).step(1, inf, None, {}, scaler)
    assert all(torch.equal(x, y) for x, y in zip(before, scaled.parameters()))  # skipped, as the scaler does


def test_resume_with_more_epochs_extends_the_schedule(tmp_path):
    # a finished 2-epoch run ends at lr * lrf; resumed to 6 epochs it must train at the
    # longer schedule's (higher) rate, not stay at the old run's final rate
    Trainer(toy_cfg(tmp_path / "ext", epochs=2)).fit()
    ext = Trainer(toy_cfg(tmp_path / "ext", epochs=6, resume=True))
    ext.fit()
    rows = read_rows(tmp_path / "ext" / "results.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4", "5", "6"]
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[1] == pytest.approx(0.02 * 0.01)  # end of the 2-epoch schedule
    assert lrs[2] > 10 * lrs[1]  # epoch 3 follows the 6-epoch cosine again
    assert lrs[5] == pytest.approx(0.02 * 0.01)


def test_nonfinite_loss_stops_naming_the_step(tmp_path):
    cfg = toy_cfg(tmp_path / "nan", epochs=1)
    cfg["loss"]["seg"]["hard"]["nan_step"] = 2
    with pytest.raises(MtkdError, match=r"step 2 .*seg/hard/ce"):
        Trainer(cfg).fit()


def test_nonfinite_loss_skipped_with_warning(tmp_path):
    cfg = toy_cfg(tmp_path / "skip", epochs=1, nonfinite="skip")
    cfg["loss"]["seg"]["hard"]["nan_step"] = 2
    with pytest.warns(RuntimeWarning, match=r"step 2 .*skipped \(1 skipped so far\)"):
        report = Trainer(cfg).fit()
    assert report["skipped_steps"] == 1 and report["steps"] == 2  # 3 batches, one skipped
    assert read_rows(tmp_path / "skip" / "results.csv")[0]["skipped_steps"] == "1"


def test_run_with_every_step_skipped_fails_and_warnings_count_attempts(tmp_path):
    cfg = toy_cfg(tmp_path / "allnan", epochs=2, nonfinite="skip")
    cfg["loss"]["seg"]["hard"]["nan_step"] = -1
    with pytest.warns(RuntimeWarning) as record, pytest.raises(MtkdError) as err:
        Trainer(cfg).fit()
    messages = [str(w.message) for w in record if "non-finite" in str(w.message)]
    # 2 epochs x 3 batches, each numbered by attempt
    assert [m.split(" (epoch")[0].rsplit(" ", 1)[1] for m in messages] == ["1", "2", "3", "4", "5", "6"]
    assert "step 5 (epoch 2)" in messages[4] and "(5 skipped so far)" in messages[4]
    message = str(err.value)
    assert "train.nonfinite" in message and "all 6 training steps" in message and "\n" not in message
    assert not (tmp_path / "allnan" / "test_metrics.json").exists()


def _cli(cfg: Dict[str, Any], tmp_path: Path, capsys, *extra: str, command: str = "train") -> tuple:
    """``mtkd <command>`` in-process on ``cfg`` dumped to YAML; returns (exit code, the ``error:`` lines, stderr)."""
    import yaml

    from mtkd.cli import main

    path = tmp_path / f"cli_{len(list(tmp_path.glob('cli_*.yaml')))}.yaml"  # a fresh name per call
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    code = main([command, str(path), *extra])
    err = capsys.readouterr().err  # also holds tqdm's progress bars
    return code, [line for line in err.splitlines() if line.startswith("error:")], err


def _oserror(code: int) -> OSError:
    import os

    return OSError(code, os.strerror(code))


def test_nonfinite_stop_is_a_one_line_cli_error(tmp_path, capsys):
    cfg = toy_cfg(tmp_path / "nan", epochs=1)
    cfg["loss"]["seg"]["hard"]["nan_step"] = 2
    code, errors, err = _cli(cfg, tmp_path, capsys)
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith("error: non-finite loss at step 2 (epoch 1)") and "train.nonfinite=skip" in errors[0]


def test_disk_full_while_saving_is_a_one_line_cli_error(tmp_path, monkeypatch, capsys):
    import errno
    import os

    def full(fd: int) -> None:
        raise _oserror(errno.ENOSPC)

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "full"
    code, errors, err = _cli(toy_cfg(out, epochs=1), tmp_path, capsys)
    assert code == 2 and "Traceback" not in err
    assert errors == [f"error: {out / 'best.pt'}: cannot write: No space left on device"]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_save_atomic_write_failures_name_the_file(tmp_path, monkeypatch):
    import errno

    def torch_save_disk_full(obj, fh):
        fh.write(b"partial")
        try:
            raise _oserror(errno.ENOSPC)
        except OSError:  # what torch.save to a file object raises when a write fails
            raise RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed writing file")

    monkeypatch.setattr(ckpt_io.torch, "save", torch_save_disk_full)
    with pytest.raises(MtkdError) as err:
        ckpt_io.save_atomic({"model": {}}, tmp_path / "c.pt")
    assert str(err.value) == f"{tmp_path / 'c.pt'}: cannot write: No space left on device"
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert list(tmp_path.iterdir()) == []  # the temp file is gone
    monkeypatch.undo()

    def read_only(*args, **kwargs):
        raise _oserror(errno.EROFS)

    monkeypatch.setattr(ckpt_io.tempfile, "mkstemp", read_only)
    with pytest.raises(MtkdError, match=r"c\.pt: cannot write: Read-only file system"):
        ckpt_io.save_atomic({"model": {}}, tmp_path / "c.pt")
    monkeypatch.undo()

    def not_about_disk(obj, fh):
        raise RuntimeError("cannot pickle this")

    monkeypatch.setattr(ckpt_io.torch, "save", not_about_disk)
    with pytest.raises(RuntimeError, match="cannot pickle"):  # other failures are not dressed up as disk errors
        ckpt_io.save_atomic({"model": {}}, tmp_path / "c.pt")


def test_read_only_output_folder_in_train_and_predict(tmp_path, monkeypatch, capsys):
    import errno

    Trainer(toy_cfg(tmp_path / "ok", epochs=1)).fit()
    read_only = {tmp_path / "ro_run", tmp_path / "ro_pred"}
    mkdir = Path.mkdir

    def refusing_mkdir(self, *args, **kwargs):
        if self in read_only:
            raise _oserror(errno.EROFS)
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refusing_mkdir)
    code, errors, err = _cli(toy_cfg(tmp_path / "ro_run", epochs=1), tmp_path, capsys)
    assert code == 2 and "Traceback" not in err
    assert errors == [f"error: {tmp_path / 'ro_run'}: cannot write: Read-only file system"]
    (tmp_path / "src").mkdir()
    code, errors, err = _cli(toy_cfg(tmp_path / "ok", epochs=1), tmp_path, capsys, "--ckpt",
                             str(tmp_path / "ok" / "best.pt"), "--source", str(tmp_path / "src"), "--out",
                             str(tmp_path / "ro_pred"), command="predict")
    assert code == 2 and "Traceback" not in err
    assert errors == [f"error: {tmp_path / 'ro_pred'}: cannot write: Read-only file system"]


def test_stale_checkpoint_temp_files_removed_at_start_and_resume(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = [out / ".last.pt.ab12cd_4.tmp", out / ".best.pt.zz9yx8wv.tmp"]  # save_atomic's temp names
    others = [out / "notes.tmp", out / ".last.pt.tmp", out / "x.ab12cd34.tmp"]
    for p in stale + others:
        p.write_bytes(b"partial")
    Trainer(toy_cfg(out, epochs=1)).fit()
    assert not any(p.exists() for p in stale) and all(p.exists() for p in others)
    for p in stale:
        p.write_bytes(b"partial")
    Trainer(toy_cfg(out, epochs=2, resume=True)).fit()
    assert not any(p.exists() for p in stale) and all(p.exists() for p in others)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_mid_epoch_saves_last_pt_and_resume_is_exact(tmp_path, monkeypatch, capsys, sig):
    import os
    import signal

    sig = getattr(signal, sig)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    Trainer(toy_cfg(tmp_path / "full", epochs=2)).fit()
    train_step = Trainer.train_step

    def signalled_at_step_4(self, batch):
        logs = train_step(self, batch)
        if self.step == 4:  # the 1st batch of epoch 2
            os.kill(os.getpid(), sig)
        return logs

    monkeypatch.setattr(Trainer, "train_step", signalled_at_step_4)
    part = toy_cfg(tmp_path / "part", epochs=2)
    code, _, err = _cli(part, tmp_path, capsys)
    monkeypatch.undo()
    assert {s: signal.getsignal(s) for s in before} == before  # handlers restored
    assert code == 128 + int(sig) and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1
    assert lines[0].startswith(f"interrupted by {sig.name} at step 4, epoch 2; {tmp_path / 'part' / 'last.pt'} holds")
    assert lines[0].endswith(f"resume with: mtkd train {tmp_path / 'cli_0.yaml'} --resume")
    ck = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    assert ck["epoch"] == 1 and ck["step"] == 4 and ck["train_state"]["epoch_batches"] == 1
    assert len(read_rows(tmp_path / "part" / "results.csv")) == 1  # the unfinished epoch is not logged

    part["train"]["resume"] = True
    Trainer(part).fit()
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"] == 6
    for name, t in a["train_state"]["model"].items():
        assert torch.equal(t, b["train_state"]["model"][name]), name
    for name, t in a["model"].items():
        assert torch.equal(t, b["model"][name]), name
    full_rows, part_rows = (read_rows(tmp_path / run / "results.csv") for run in ("full", "part"))
    for row in full_rows + part_rows:
        del row["train_wall_s"]
        del row["train/seg/hard/steps"]  # ToySegLoss's own step counter is not checkpointed
    assert part_rows == full_rows  # including epoch 2's loss means over all of its batches


def test_max_steps_budget_stops_mid_epoch(tmp_path):
    report = Trainer(toy_cfg(tmp_path / "budget", epochs=5, max_steps=4)).fit()
    assert report["steps"] == 4 and report["epochs_run"] == 2
    rows = read_rows(tmp_path / "budget" / "results.csv")
    assert [int(r["step"]) for r in rows] == [3, 4]
    assert float(rows[-1]["train_wall_s"]) > 0


def test_time_budget_stops_early(tmp_path):
    report = Trainer(toy_cfg(tmp_path / "time", epochs=50, time_budget_s=1e-9)).fit()
    assert report["steps"] == 1 and report["epochs_run"] == 1
    with pytest.raises(ConfigError, match="train.max_steps"):
        Trainer(toy_cfg(tmp_path / "bad", max_steps="ten"))


class FakeClock:
    """``time`` stand-in for the trainer: every ``perf_counter()`` call advances by ``tick`` seconds,
    so each training step (one call after it) takes exactly ``tick``."""

    def __init__(self, tick: float):
        self.tick, self.now = tick, 0.0

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now


class Killed(Exception):
    """Stands in for the process being killed right after ``last.pt`` was written."""


def kill_after_epoch(monkeypatch, n: int) -> Callable[[], None]:
    """Make every Trainer raise :class:`Killed` once epoch ``n`` (1-based) has ended and
    ``last.pt`` is written; returns the function that undoes it."""
    end_of_epoch = Trainer._end_of_epoch

    def killed(self, means, validate):
        end_of_epoch(self, means, validate)
        if self.epoch + 1 == n:
            raise Killed()

    monkeypatch.setattr(Trainer, "_end_of_epoch", killed)
    return lambda: monkeypatch.setattr(Trainer, "_end_of_epoch", end_of_epoch)


def test_time_budget_sizes_the_schedule_and_says_why_it_stopped(tmp_path, monkeypatch, capsys):
    from mtkd.engine import trainer as trainer_mod

    # 1/64 s per step and a 1 s budget: the schedule is re-sized to 64 of the 600 configured steps
    monkeypatch.setattr(trainer_mod, "time", FakeClock(1 / 64))
    cfg = toy_cfg(tmp_path / "budget", epochs=100, batch=4, time_budget_s=1.0, val_every=1000)
    report = Trainer(cfg).fit()
    assert report["stop_reason"] == "time_budget" and report["steps"] == 64
    assert json.loads((tmp_path / "budget" / "test_metrics.json").read_text())["stop_reason"] == "time_budget"
    rows = read_rows(tmp_path / "budget" / "results.csv")
    assert float(rows[-1]["lr"]) == pytest.approx(0.02 * 0.01)  # the decay reached its end
    out = capsys.readouterr().out
    assert "LR schedule sized to 64 steps" in out
    stop_lines = [line for line in out.splitlines() if line.startswith("stopped:")]
    assert len(stop_lines) == 1 and "train.time_budget_s=1.0" in stop_lines[0]
    state = torch.load(tmp_path / "budget" / "last.pt", weights_only=True)["train_state"]
    assert state["budget_step_time"] == 1 / 64 and state["total_steps"] == 64

    # killed after epoch 5 (30 steps, schedule already sized), resumed on a machine twice as fast:
    # the frozen step time keeps the 64-step schedule instead of re-measuring (or using 600 steps)
    revive = kill_after_epoch(monkeypatch, 5)
    monkeypatch.setattr(trainer_mod, "time", FakeClock(1 / 64))
    part = toy_cfg(tmp_path / "part", epochs=100, batch=4, time_budget_s=1.0, val_every=1000)
    with pytest.raises(Killed):
        Trainer(part).fit()
    revive()
    monkeypatch.setattr(trainer_mod, "time", FakeClock(1 / 128))
    part["train"]["resume"] = True
    resumed = Trainer(part).fit()
    assert resumed["stop_reason"] == "time_budget" and resumed["steps"] == 64
    assert [r["lr"] for r in read_rows(tmp_path / "part" / "results.csv")] == [r["lr"] for r in rows]


def test_stop_reasons_of_max_steps_epochs_and_early_stopping(tmp_path, capsys):
    assert Trainer(toy_cfg(tmp_path / "ms", epochs=5, max_steps=4)).fit()["stop_reason"] == "max_steps"
    assert "stopped: train.max_steps=4 reached" in capsys.readouterr().out
    assert Trainer(toy_cfg(tmp_path / "ep", epochs=1)).fit()["stop_reason"] == "epochs"
    assert "stopped: all train.epochs=1 done" in capsys.readouterr().out
    report = Trainer(toy_cfg(tmp_path / "es", epochs=10, lr=0.0, patience=1)).fit()
    assert report["stop_reason"] == "early_stopping"
    assert "stopped: early stopping" in capsys.readouterr().out


def test_evaluate_checkpoint_and_class_check(tmp_path):
    cfg = toy_cfg(tmp_path / "ev", epochs=1)
    Trainer(cfg).fit()
    metrics = evaluate_checkpoint(cfg, tmp_path / "ev" / "best.pt", "val")
    best = json.loads((tmp_path / "ev" / "test_metrics.json").read_text())
    assert metrics["split"] == "val" and metrics["params"] == best["params"]
    ck = torch.load(tmp_path / "ev" / "best.pt", weights_only=True)
    assert metrics["pixel_acc"] == pytest.approx(ck["metrics"]["pixel_acc"])
    ck["classes"] = ["a", "b"]
    torch.save(ck, tmp_path / "other.pt")
    with pytest.raises(MtkdError, match="other.pt"):
        evaluate_checkpoint(cfg, tmp_path / "other.pt", "val")


def test_metrics_json_records_the_split_key_and_the_split_read(tmp_path, capsys):
    cfg = toy_cfg(tmp_path / "run", epochs=1)
    cfg["data"]["test"] = "val"
    report = Trainer(cfg).fit()
    saved = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    assert saved == report and (saved["split"], saved["split_read"]) == ("test", "val")
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert saved["pixel_acc"] == pytest.approx(best["metrics"]["pixel_acc"])  # it did read val
    assert "skipped_samples" not in saved  # the toy dataset does not count bad samples
    code, errors, _ = _cli(cfg, tmp_path, capsys, "--ckpt", str(tmp_path / "run" / "best.pt"), "--split", "test",
                           "--json", str(tmp_path / "m.json"), command="eval")
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert code == 0 and not errors and (metrics["split"], metrics["split_read"]) == ("test", "val")
    assert metrics["pixel_acc"] == pytest.approx(saved["pixel_acc"])


@pytest.mark.filterwarnings("ignore:skipping bad sample")
def test_skip_bad_counts_in_results_csv_test_metrics_and_eval_json(tmp_path, capsys):
    from test_datasets_formats import write_voc

    voc = write_voc(tmp_path / "voc")  # ids a, b, c in the one split "train"
    bad = voc / "JPEGImages" / "c.jpg"
    bad.write_bytes(b"not a jpeg")
    cfg = build_config({"task": "multitask", "out": str(tmp_path / "run"), "model": {"preset": "student_small"},
                        "data": {"format": "voc", "root": str(voc), "train": "train", "val": "train",
                                 "test": "train", "imgsz": 64, "skip_bad": True},
                        "train": {"epochs": 1, "batch": 3, "workers": 1, "device": "cpu", "ema": False,
                                  "tensorboard": False, "plots": False}})
    capsys.readouterr()
    report = Trainer(cfg).fit()  # one batch of a, b, c: c is skipped in training, validation and test
    assert "data.skip_bad: skipped bad samples (the warnings name them): train 1, val 1, test 1" in \
        capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    assert saved == report and (saved["split"], saved["split_read"]) == ("test", "train")
    assert (saved["skipped_samples"], saved["train_skipped_samples"], saved["val_skipped_samples"]) == (1, 1, 1)
    rows = read_rows(tmp_path / "run" / "results.csv")
    assert (rows[-1]["skipped_samples"], rows[-1]["val/skipped_samples"]) == ("1", "1")
    metrics = evaluate_checkpoint(cfg, tmp_path / "run" / "best.pt", "test")
    assert (metrics["split"], metrics["split_read"], metrics["skipped_samples"]) == ("test", "train", 1)
    # killed after the last checkpoint, before the report: the resumed run trains nothing and reports the same count
    cfg["train"]["resume"] = True
    again = Trainer(cfg).fit()
    assert again["train_skipped_samples"] == 1 and again["map50_95"] == report["map50_95"]
    assert metrics["n_images"] == 2


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(MtkdError, match=r"missing\.pt: checkpoint not found"):
        ckpt_io.load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "torn.pt"
    bad.write_bytes(b"\x80\x04not a zip")
    with pytest.raises(MtkdError, match=r"torn\.pt: checkpoint file is corrupt or not a checkpoint") as err:
        ckpt_io.load_checkpoint(bad)
    assert "\n" not in str(err.value) and "trust_pickle" not in str(err.value)
    # pickled objects outside the allow-list are refused unless trusted, naming the object
    evil = tmp_path / "pickled.pt"
    torch.save({"model": {}, "obj": ToyData(1, 0)}, evil)
    with pytest.raises(MtkdError, match=r"pickled\.pt: holds pickled objects .*ToyData.*set trust_pickle$"):
        ckpt_io.load_checkpoint(evil)
    assert isinstance(ckpt_io.load_checkpoint(evil, trust_pickle=True)["obj"], ToyData)


def test_truncated_checkpoint_is_reported_as_truncated(tmp_path):
    run = tmp_path / "run"
    Trainer(toy_cfg(run, epochs=1)).fit()
    data = (run / "best.pt").read_bytes()
    for keep in (0, 100, len(data) // 2, len(data) - 1):
        cut = tmp_path / f"cut{keep}.pt"
        cut.write_bytes(data[:keep])
        for trust in (False, True):
            with pytest.raises(MtkdError) as err:
                ckpt_io.load_checkpoint(cut, trust_pickle=trust)
            message = str(err.value)
            assert message.startswith(f"{cut}: checkpoint file is truncated ({keep} bytes"), message
            assert "trust_pickle" not in message and "\n" not in message
    cut = tmp_path / f"cut{len(data) // 2}.pt"
    with pytest.raises(MtkdError, match="truncated"):
        evaluate_checkpoint(toy_cfg(run, epochs=1), cut, "val")


def test_state_dict_mismatch_names_presets_and_first_keys(tmp_path):
    from mtkd.engine.trainer import load_model
    from mtkd.models import build_model

    classes = ["a", "b"]
    teacher_cfg = build_config({"model": {"preset": "teacher_small"}, "train": {"device": "cpu"}})
    teacher = build_model({"preset": "teacher_small"}, len(classes))
    path = tmp_path / "teacher.pt"
    ckpt_io.save_atomic({"format": ckpt_io.FORMAT, "task": "multitask", "classes": classes,
                         "config": teacher_cfg, "model": teacher.state_dict()}, path)
    student_cfg = build_config({"model": {"preset": "student_small"}, "train": {"device": "cpu"}})
    with pytest.raises(MtkdError) as err:
        load_model(student_cfg, path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: weights do not fit the model of the config: ")
    assert ("the checkpoint's model has preset=teacher_small backbone=null, "
            "the config's preset=student_small backbone=null") in message
    # cnn_w32 and cnn_w12 share their layer names: the first mismatch is a shape
    first = next(k for k, v in build_model({"preset": "student_small"}, 2).state_dict().items()
                 if v.shape != teacher.state_dict()[k].shape)
    assert f"shape mismatches (first {first}: " in message
    # a state dict with a renamed key: the first missing and the first unexpected key are named
    state = teacher.state_dict()
    key = next(iter(state))
    state["extra." + key] = state.pop(key)
    ckpt_io.save_atomic({"format": ckpt_io.FORMAT, "task": "multitask", "classes": classes,
                         "config": teacher_cfg, "model": state}, path)
    with pytest.raises(MtkdError) as err:
        load_model(teacher_cfg, path)
    message = str(err.value)
    assert (f"preset=teacher_small backbone=null, the config's preset=teacher_small backbone=null; "
            f"1 missing keys (first {key}), 1 unexpected keys (first extra.{key})") in message


def test_atomic_save_leaves_no_temp_and_rng_roundtrip(tmp_path):
    import random

    import numpy as np

    state = ckpt_io.rng_state()
    ckpt_io.save_atomic({"model": {}, "rng": state}, tmp_path / "c.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    expected = (torch.rand(3), np.random.rand(3), random.random())
    ckpt_io.set_rng_state(torch.load(tmp_path / "c.pt", weights_only=True)["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_ema_ramp_and_average():
    model = nn.Linear(2, 1)
    ema = ModelEMA(model, decay=0.9, tau=1.0)
    with torch.no_grad():
        model.weight.fill_(1.0)
        ema.module.weight.fill_(0.0)
    ema.update(model)
    d = 0.9 * (1 - torch.exp(torch.tensor(-1.0))).item()
    assert ema.current_decay() == pytest.approx(d)
    assert torch.allclose(ema.module.weight, torch.full_like(model.weight, 1 - d))
    for _ in range(50):
        ema.update(model)
    assert ema.current_decay() == pytest.approx(0.9)



def test_ema_follows_loaded_weights_and_copies_integer_buffers():
    """The EMA pairs its tensors with the model's once; loading a state dict into the model
    (as resume does) must still reach the average, and integer buffers are copied, not averaged."""
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    ema = ModelEMA(model, decay=0.5, tau=1e-9)  # decay 0.5 from the first update
    model(torch.randn(4, 1, 3, 3))              # num_batches_tracked -> 1, running stats move
    ema.update(model)
    assert int(ema.module[1].num_batches_tracked) == 1
    target = {k: (torch.full_like(v, 2.0) if v.is_floating_point() else v + 5) for k, v in model.state_dict().items()}
    model.load_state_dict(target)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    ema.update(model)
    for k, v in ema.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, 0.5 * before[k] + 0.5 * 2.0), k
    assert int(ema.module[1].num_batches_tracked) == 6
    other = nn.Sequential(nn.Conv2d(1, 2, 1))   # another model object: pairs looked up again
    with pytest.raises(KeyError, match="1.weight"):
        ema.update(other)


def test_adamw_is_fused_on_cpu_and_matches_foreach():
    from mtkd.engine.trainer import build_optimizer
    tcfg = {"optimizer": "adamw", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.01}
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    fused = build_optimizer(list(a.parameters()), tcfg)
    assert fused.defaults["fused"] is True
    ref = torch.optim.AdamW([{"params": [b.weight], "weight_decay": 0.01}, {"params": [b.bias], "weight_decay": 0.0}],
                            lr=0.01, betas=(0.9, 0.999), foreach=True)
    for _ in range(5):
        x = torch.randn(8, 4)
        for m, opt in ((a, fused), (b, ref)):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)

def test_warmup_decay_schedule():
    f = WarmupDecay(total_steps=10, warmup_steps=2, lrf=0.1, cosine=True)
    values = [f(i) for i in range(10)]
    assert values[0] < values[1] < values[2] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[2:], values[3:]))


def test_amp_bf16_on_cpu_trains(tmp_path):
    report = Trainer(toy_cfg(tmp_path / "amp", epochs=1, amp=True)).fit()
    assert report["steps"] == 3
    last = torch.load(tmp_path / "amp" / "last.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in last["train_state"]["model"].values() if t.is_floating_point())
    assert last["train_state"]["model"]["head.weight"].dtype == torch.float32  # autocast keeps fp32 weights


def test_early_stopping_after_patience_epochs(tmp_path):
    # lr 0: the val score never improves on epoch 1, so patience 2 stops after epoch 3
    report = Trainer(toy_cfg(tmp_path / "es", epochs=10, lr=0.0, patience=2)).fit()
    assert report["epochs_run"] == 3 and report["best_epoch"] == 1
    with pytest.raises(ConfigError, match="train.patience"):
        Trainer(toy_cfg(tmp_path / "bad", patience=0))


@pytest.mark.parametrize("batch", [5, 32])
def test_unlabeled_null_keeps_the_plain_train_loader(tmp_path, batch):
    """``data.unlabeled: null`` (the default): the same batches, in the same order, as the plain loader."""
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

    cfg = toy_cfg(tmp_path / "null", batch=batch)
    assert cfg["data"]["unlabeled"] is None
    tr = Trainer(cfg)
    tr.build()
    assert tr.unlabeled_ds is None
    assert isinstance(tr.train_loader.sampler, DistributedSampler) and tr.train_loader.sampler is tr.sampler
    assert type(tr.train_loader.batch_sampler) is BatchSampler
    ds = tr.train_ds
    old_sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=cfg["seed"])
    old = DataLoader(ds, batch_size=batch, sampler=old_sampler, drop_last=len(old_sampler) >= batch,
                     collate_fn=tr.task.collate, num_workers=0)
    assert len(tr.train_loader) == len(old) == (24 // batch or 1)
    for epoch in range(3):
        tr.sampler.set_epoch(epoch)
        old_sampler.set_epoch(epoch)
        new_batches = [b["index"].tolist() for b in tr.train_loader]
        assert new_batches == [b["index"].tolist() for b in old]
        assert new_batches == list(old.batch_sampler)


def test_unlabeled_on_a_task_without_support_is_config_error(tmp_path):
    cfg = toy_cfg(tmp_path / "toy_unl")
    cfg["data"]["unlabeled"] = str(tmp_path)
    with pytest.raises(ConfigError, match=r"^data\.unlabeled: not supported by task 'toy'$"):
        Trainer(cfg).build()


def test_callbacks_follow_epochs_steps_and_validation(tmp_path):
    calls: List[tuple] = []

    class Recorder:  # any object with some of the hooks
        def on_epoch_start(self, trainer):
            calls.append(("start", trainer.epoch, trainer.step))

        def on_step_end(self, trainer, logs):
            calls.append(("step", trainer.epoch, trainer.step, logs is seen[-1]))

        def on_validation_end(self, trainer, metrics):
            calls.append(("val", trainer.epoch, "pixel_acc" in metrics))

        def on_epoch_end(self, trainer, means):
            calls.append(("end", trainer.epoch, round(means["total"], 6)))

    seen: List[Dict[str, float]] = []  # what each train_step returned
    cfg = toy_cfg(tmp_path / "run", epochs=2, val_every=2)
    trainer = Trainer(cfg, callbacks=[Recorder()])
    train_step = trainer.train_step
    trainer.train_step = lambda batch: seen.append(train_step(batch)) or seen[-1]
    trainer.fit()
    rows = read_rows(tmp_path / "run" / "results.csv")
    # 3 steps per epoch; validation only at epoch 2 (val_every=2); epoch means as logged
    assert calls == [("start", 0, 0), ("step", 0, 1, True), ("step", 0, 2, True), ("step", 0, 3, True),
                     ("end", 0, round(float(rows[0]["train/total"]), 6)),
                     ("start", 1, 3), ("step", 1, 4, True), ("step", 1, 5, True), ("step", 1, 6, True),
                     ("val", 1, True), ("end", 1, round(float(rows[1]["train/total"]), 6))]


@register("toy_input_grad")
class ToyInputGradLoss(Loss):
    """Cross-entropy that needs the input's graph (``input_grad``), as Sobolev-style losses do."""

    requires = frozenset({"input_grad"})

    def forward(self, student_out, teacher_out, batch):
        assert batch["images"].requires_grad and torch.is_grad_enabled()
        return F.cross_entropy(student_out["seg"], batch["masks"])


def test_loss_terms_are_unweighted_and_leave_no_trace(tmp_path):
    cfg = toy_cfg(tmp_path / "run")
    cfg["loss"]["seg"]["ratio"] = 2.0
    trainer = Trainer(cfg)
    trainer.build()
    batch = next(iter(trainer.train_loader))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    terms = trainer.loss_terms(batch)
    assert set(terms) == {"seg/hard/ce", "seg/hard/reg", "seg/hard", "seg", "total"}
    trainer.model.train()
    with torch.no_grad():
        ce = F.cross_entropy(trainer.model(batch["images"])["seg"], batch["masks"])
    assert terms["seg/hard/ce"] == pytest.approx(float(ce), rel=1e-5)
    assert terms["total"] == pytest.approx(2.0 * terms["seg/hard"], rel=1e-6)  # the ratio only in the total
    trainer.model.load_state_dict(before)  # undo the check's own forward
    assert trainer.loss_terms(batch) == terms
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics restored
    assert trainer.step == 0 and all(p.grad is None for p in trainer.params)
    assert not (tmp_path / "run").exists()

    cfg = toy_cfg(tmp_path / "grad")
    cfg["loss"]["seg"]["hard"] = {"name": "toy_input_grad"}
    trainer = Trainer(cfg)
    trainer.build()
    assert set(trainer.loss_terms(batch)) == {"seg/hard", "seg", "total"}


def test_a_callback_without_hooks_is_refused():
    with pytest.raises(TypeError, match="none of the hooks"):
        Trainer(toy_cfg(Path("unused")), callbacks=[object()])


def test_early_stopping_decides_on_rank_0_from_the_trainers_best_epoch():
    from types import SimpleNamespace

    asked: List[tuple] = []

    def trainer(epoch: int, best: int, main: bool = True) -> Any:
        return SimpleNamespace(epoch=epoch, best_epoch=best, dist=SimpleNamespace(is_main=main),
                               request_stop=lambda reason, detail="": asked.append((epoch, reason, detail)))

    es = EarlyStopping(2)
    es.on_epoch_end(trainer(5, 0), {})  # nothing validated yet
    es.on_epoch_end(trainer(1, 1), {})  # epoch 2, best epoch 1: one epoch without improvement
    es.on_epoch_end(trainer(2, 1, main=False), {})  # only rank 0, which validates, decides
    assert asked == []
    es.on_epoch_end(trainer(2, 1), {})  # epoch 3, best epoch 1: two epochs without improvement
    assert asked == [(2, "early_stopping", "no val improvement for 2 epochs")]
    for bad in (0, 1.5, True, None):
        with pytest.raises(ValueError, match="patience"):
            EarlyStopping(bad)


def test_early_stopping_is_installed_from_train_patience_before_the_given_callbacks(tmp_path):
    class Mine:
        def on_epoch_end(self, trainer, means):
            pass

    mine = Mine()
    installed = Trainer(toy_cfg(tmp_path / "a", patience=3), callbacks=[mine]).callbacks.callbacks
    assert [type(cb) for cb in installed] == [EarlyStopping, Mine]
    assert installed[0].patience == 3 and installed[1] is mine
    assert Trainer(toy_cfg(tmp_path / "b"), callbacks=[mine]).callbacks.callbacks == [mine]


def test_early_stopping_and_given_callbacks_run_side_by_side(tmp_path, capsys):
    epochs: List[int] = []

    class Recorder:
        def on_epoch_end(self, trainer, means):
            epochs.append(trainer.epoch)

    # lr 0: epoch 1 stays the best, so patience 2 stops after epoch 3; the given callback sees every epoch
    report = Trainer(toy_cfg(tmp_path / "es", epochs=10, lr=0.0, patience=2), callbacks=[Recorder()]).fit()
    assert epochs == [0, 1, 2] and report["stop_reason"] == "early_stopping" and report["epochs_run"] == 3
    assert "stopped: early stopping, no val improvement for 2 epochs (best epoch 1;" in capsys.readouterr().out

    class StopAfterEpoch2:
        def on_epoch_end(self, trainer, means):
            if trainer.epoch + 1 == 2:
                trainer.request_stop("enough", "two epochs are plenty")

    report = Trainer(toy_cfg(tmp_path / "own", epochs=10, patience=5), callbacks=[StopAfterEpoch2()]).fit()
    assert report["stop_reason"] == "enough" and report["epochs_run"] == 2 and report["steps"] == 6
    assert json.loads((tmp_path / "own" / "test_metrics.json").read_text())["stop_reason"] == "enough"
    assert ("stopped: enough, two epochs are plenty (asked by a callback; after 6 steps, epoch 2)"
            in capsys.readouterr().out)


def test_early_stopping_of_a_resumed_run_counts_from_the_checkpointed_best_epoch(tmp_path, monkeypatch):
    # killed after epoch 2 (best epoch 1, lr 0); resumed, it stops after epoch 3 as the uninterrupted run does
    revive = kill_after_epoch(monkeypatch, 2)
    cfg = toy_cfg(tmp_path / "es", epochs=10, lr=0.0, patience=2)
    with pytest.raises(Killed):
        Trainer(cfg).fit()
    revive()
    cfg["train"]["resume"] = True
    resumed = Trainer(cfg)
    report = resumed.fit()
    assert resumed.start_epoch == 2
    assert report["stop_reason"] == "early_stopping" and report["epochs_run"] == 3 and report["best_epoch"] == 1


def test_plots_callback_draws_val_pred_per_validation_and_curves_once_after_training(tmp_path, monkeypatch):
    events: List[tuple] = []

    class Recorder:
        def on_epoch_end(self, trainer, means):
            events.append(("end", trainer.epoch, (trainer.out / "val_pred.png").is_file()))

        def on_train_end(self, trainer):
            events.append(("train_end", trainer.epoch, (trainer.out / "curves.png").is_file(),
                           (trainer.out / "test_metrics.json").is_file()))

    trainer = Trainer(toy_cfg(tmp_path / "on", epochs=3, val_every=2, plots=True), callbacks=[Recorder()])
    assert [type(cb) for cb in trainer.callbacks.callbacks] == [Plots, Recorder]
    drawn: List[int] = []
    draw_val = trainer.task.draw_val
    monkeypatch.setattr(trainer.task, "draw_val",
                        lambda *args: drawn.append(trainer.epoch) or draw_val(*args))
    trainer.fit()
    # validated at epoch 2 (val_every) and 3 (the last); drawn before the given callbacks' on_epoch_end;
    # curves.png once, after the last epoch and before the test report
    assert drawn == [1, 2]
    assert events == [("end", 0, False), ("end", 1, True), ("end", 2, True), ("train_end", 2, True, False)]
    assert (tmp_path / "on" / "test_metrics.json").is_file()


def test_without_plots_nothing_is_drawn_and_matplotlib_is_not_imported(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # importing matplotlib now fails
    monkeypatch.setitem(sys.modules, "mtkd.engine.plots", None)
    ended: List[int] = []

    class Recorder:
        def on_train_end(self, trainer):
            ended.append(trainer.epoch)

    trainer = Trainer(toy_cfg(tmp_path / "off", epochs=2, plots=False), callbacks=[Recorder()])
    assert not any(isinstance(cb, Plots) for cb in trainer.callbacks.callbacks)
    trainer.fit()
    assert ended == [1]
    assert not (tmp_path / "off" / "curves.png").exists() and not (tmp_path / "off" / "val_pred.png").exists()


def test_a_trainer_starts_at_epoch_zero_before_fit(tmp_path):
    trainer = Trainer(toy_cfg(tmp_path / "run"))
    trainer.build()
    batch = next(iter(trainer.train_loader))
    assert trainer.epoch == 0 and trainer.train_step(batch) is not None and trainer.step == 1
