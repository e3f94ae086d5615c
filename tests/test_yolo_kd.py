"""End to end: a 1-epoch distillation run through ``mtkd yolo train`` on a tiny YOLO tree."""
import csv
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from mtkd.errors import ConfigError

NAMES = ["red", "green", "blue"]
COLORS = [(0, 0, 255), (0, 255, 0), (255, 0, 0)]  # BGR for cv2


def _write_tree(root: Path, seed: int = 0) -> Path:
    """A few 64 px images with coloured rectangles, in Ultralytics' YOLO layout."""
    import cv2

    rng = np.random.default_rng(seed)
    for split, n in (("train", 8), ("val", 4)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            img = np.full((64, 64, 3), 40, np.uint8)
            lines = []
            for _ in range(2):
                c = int(rng.integers(3))
                w, h = (int(v) for v in rng.integers(14, 30, 2))
                x, y = int(rng.integers(0, 64 - w)), int(rng.integers(0, 64 - h))
                cv2.rectangle(img, (x, y), (x + w - 1, y + h - 1), COLORS[c], -1)
                lines.append(f"{c} {(x + w / 2) / 64:.6f} {(y + h / 2) / 64:.6f} {w / 64:.6f} {h / 64:.6f}")
            cv2.imwrite(str(root / "images" / split / f"{i}.png"), img)
            (root / "labels" / split / f"{i}.txt").write_text("\n".join(lines) + "\n")
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames: {NAMES}\n")
    return data


def _save_random_teacher(path: Path, nc: int, names=None) -> Path:
    """A randomly initialised yolov8n saved the way Ultralytics reads checkpoints (the data's names for 3 classes)."""
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolov8n.yaml", nc=nc, verbose=False)
    names = names or (NAMES if nc == len(NAMES) else [f"c{i}" for i in range(nc)])
    model.names = dict(enumerate(names))
    torch.save({"model": model, "train_args": {}}, path)
    return path


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("yolo_kd")
    data = _write_tree(root / "data")
    return {"root": root, "data": data, "teacher": _save_random_teacher(root / "teacher.pt", len(NAMES))}


def _args(tree, name, **extra):
    args = ["model=yolov8n.yaml", f"teacher={tree['teacher']}", f"data={tree['data']}", "epochs=1", "imgsz=64",
            "batch=4", "device=cpu", "workers=0", "plots=False", "deterministic=False",
            f"project={tree['root'] / 'runs'}", f"name={name}", "exist_ok=True"]
    return args + [f"{k}={v}" for k, v in extra.items()]


@pytest.fixture(scope="module")
def run(tree):
    from mtkd.yolo.cli import parse_args, train

    teacher_before = torch.load(tree["teacher"], weights_only=False)["model"].state_dict()
    events = []
    callbacks = {"on_train_epoch_start": [lambda t: events.append(("start", t.epoch))],
                 "on_train_epoch_end": [lambda t: events.append(("end", t.epoch, type(t).__name__))]}
    trainer = train(parse_args(_args(tree, "kd", kd_feat=1.0)), callbacks=callbacks)
    return {"trainer": trainer, "teacher_before": teacher_before, "events": events}


def test_callbacks_reach_the_kd_trainer(run):
    assert run["events"] == [("start", 0), ("end", 0, "KDDetectionTrainer")]


def test_results_csv_has_kd_columns(run):
    with open(run["trainer"].csv) as fh:
        rows = list(csv.DictReader(fh))
    header = [k.strip() for k in rows[0]]
    for col in ("train/kd_cls", "train/kd_dfl", "train/kd_obj", "train/kd_feat"):
        assert col in header
    row = {k.strip(): float(v) for k, v in rows[0].items()}
    assert all(np.isfinite(row[c]) and row[c] > 0 for c in ("train/kd_cls", "train/kd_dfl", "train/kd_feat"))
    assert "train/box_loss" in header and "metrics/mAP50-95(B)" in header  # Ultralytics' own columns kept
    kd_yaml = (run["trainer"].save_dir / "kd.yaml").read_text()
    assert "kd_feat: 1.0" in kd_yaml and "kd_" not in (run["trainer"].save_dir / "args.yaml").read_text()


def test_adapters_trained_teacher_frozen(run):
    trainer = run["trainer"]
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    adapters = list(trainer.kd_loss.parameters())
    assert adapters and all(id(p) in in_opt for p in adapters)
    eye = torch.eye(64).view(64, 64, 1, 1)
    assert not torch.allclose(trainer.kd_loss.adapters["p3"].weight.detach().cpu(), eye)  # it moved
    teacher = trainer.kd_teacher.model
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    # the teacher's weights are what was saved (fused, so compare an unfused layer: the head's last conv)
    w_now = teacher.model[-1].cv3[0][-1].weight.detach().cpu()
    torch.testing.assert_close(w_now, run["teacher_before"]["model.22.cv3.0.2.weight"].float())


CHECK = textwrap.dedent("""
    import sys, pickletools, zipfile
    sys.modules["mtkd"] = None  # importing mtkd now fails: the checkpoint must not need it
    import numpy as np, torch
    from ultralytics import YOLO
    path, out = sys.argv[1], sys.argv[2]
    with zipfile.ZipFile(path) as z:
        pkl = z.read([n for n in z.namelist() if n.endswith("data.pkl")][0])
    mods = {str(a).split()[0] for op, a, _ in pickletools.genops(pkl) if op.name in ("GLOBAL", "STACK_GLOBAL") and a}
    assert not any(m.startswith("mtkd") for m in mods), mods
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = ckpt["ema"] or ckpt["model"]
    assert getattr(model, "criterion", None) is None
    assert not any(k.startswith("kd_") for k in ckpt["train_args"]) and not ckpt["train_args"]["distill_model"]
    assert ckpt["mtkd"]["distilled"] is True
    print("PARAMS", sum(p.numel() for p in model.parameters()))
    yolo = YOLO(path)
    res = yolo.predict(np.zeros((64, 64, 3), np.uint8), imgsz=64, verbose=False)
    assert len(res) == 1 and res[0].boxes is not None
    onnx = yolo.export(format="onnx", imgsz=64, simplify=False, dynamic=False)
    import onnxruntime
    sess = onnxruntime.InferenceSession(onnx)
    y = sess.run(None, {sess.get_inputs()[0].name: np.zeros((1, 3, 64, 64), np.float32)})[0]
    print("ONNX", y.shape)
""")


def test_checkpoint_is_plain_ultralytics(run, tmp_path, monkeypatch):
    """Loads, predicts and exports where mtkd cannot be imported; no teacher/adapters inside."""
    from ultralytics.nn.tasks import DetectionModel

    last = run["trainer"].last
    assert last.is_file() and run["trainer"].best.is_file()
    copy = tmp_path / "last.pt"  # export writes beside the weights
    copy.write_bytes(last.read_bytes())
    monkeypatch.chdir(tmp_path)
    proc = subprocess.run([sys.executable, "-c", CHECK, str(copy), str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    params = int(proc.stdout.split("PARAMS")[1].split()[0])
    assert params == sum(p.numel() for p in DetectionModel("yolov8n.yaml", nc=3, verbose=False).parameters())
    assert "ONNX (1, 7, 84)" in proc.stdout  # 4 box + 3 classes, 84 anchors at 64 px


def test_checkpoints_record_the_distillation(run, tree):
    """best.pt and last.pt carry a top-level ``mtkd`` entry of plain types; train_args stay Ultralytics' own."""
    import io

    from ultralytics import YOLO

    from mtkd.yolo.trainer import KD_DEFAULTS

    for path in (run["trainer"].best, run["trainer"].last):
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        entry = ckpt["mtkd"]
        assert entry["distilled"] is True
        assert entry["teacher"] == {"path": str(Path(tree["teacher"]).resolve()), "kind": "ultralytics",
                                    "names": NAMES}
        assert entry["kd"] == {**{k: v for k, v in KD_DEFAULTS.items() if k != "kd_teacher"}, "kd_feat": 1.0}
        buf = io.BytesIO()
        torch.save(entry, buf)
        buf.seek(0)
        assert torch.load(buf, weights_only=True) == entry  # plain types only
        assert not any(k.startswith("kd_") for k in ckpt["train_args"]) and not ckpt["train_args"]["distill_model"]
        assert YOLO(str(path)).task == "detect"


def test_bad_calls_create_nothing(tmp_path, monkeypatch, capsys):
    """kd values, unknown keys, a missing student or data yaml are rejected before the teacher is loaded,
    the data scanned or a run folder written; a teacher with other class names right after loading."""
    import mtkd.yolo.trainer
    from mtkd.yolo.cli import main

    tree = {"root": tmp_path, "data": _write_tree(tmp_path / "data"),
            "teacher": _save_random_teacher(tmp_path / "teacher.pt", 3)}
    renamed = _save_random_teacher(tmp_path / "renamed.pt", 3, ["r", "g", "b"])

    def no_teacher(*_a, **_k):
        raise AssertionError("the teacher was loaded")

    calls = [_args(tree, "bad", kd_t=0), _args(tree, "bad", kd_feat_t=-1), _args(tree, "bad", kd_cls=-0.5),
             _args(tree, "bad", kd_obj="nan"), _args(tree, "bad", kd_names_ok=3), _args(tree, "bad", kd_bogus=1),
             _args(tree, "bad", epoch=3), [a for a in _args(tree, "bad") if not a.startswith("data=")],
             ["model=missing.pt"] + _args(tree, "bad")[1:]]
    with monkeypatch.context() as m:
        m.setattr(mtkd.yolo.trainer, "build_teacher", no_teacher)
        assert [main(argv) for argv in calls] == [2] * len(calls)
    assert main([a if not a.startswith("teacher=") else f"teacher={renamed}" for a in _args(tree, "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[1].strip() for line in err] == [
        "kd_t", "kd_feat_t", "kd_cls", "kd_obj", "kd_names_ok", "kd_bogus", "epoch", "data", "model", "kd_teacher"]
    assert "class 0 is 'r' but the data's is 'red'; set kd_names_ok=true" in err[-1]
    assert "model: missing.pt not found" in err[-2]
    assert not (tmp_path / "runs").exists()
    assert not list((tmp_path / "data").rglob("*.cache"))  # the labels were never scanned


def test_class_count_mismatch_is_a_config_error(tree):
    from mtkd.yolo.cli import parse_args, train

    teacher5 = _save_random_teacher(tree["root"] / "teacher5.pt", 5)
    args = _args(tree, "mismatch")
    args[1] = f"teacher={teacher5}"
    with pytest.raises(ConfigError, match=r"kd_teacher: teacher .*teacher5.pt has 5 classes but the student .* 3"):
        train(parse_args(args))


def test_cli_reports_bad_arguments_in_one_line(tree, capsys):
    from mtkd.yolo.cli import main

    assert main(_args(tree, "bad", kd_bogus=1)) == 2
    assert main([a if not a.startswith("teacher=") else "teacher=/nonexistent.pt" for a in _args(tree, "bad")]) == 2
    assert main(_args(tree, "bad", epoch=3)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3
    assert err[0].startswith("error: kd_bogus:") and "/nonexistent.pt not found" in err[1]
    assert err[2].startswith("error: epoch:")
    assert not (tree["root"] / "runs" / "bad").exists()  # no run folder for a bad call


def test_ddp_relaunch_rebuilds_kd_args_from_trainer_args(tree):
    """Ultralytics' DDP script rebuilds the trainer as ``type(trainer)(cfg=DEFAULT_CFG_DICT+save_dir,
    overrides=vars(trainer.args))``; the kd_* values must survive that round trip."""
    from ultralytics.utils import DEFAULT_CFG_DICT

    from mtkd.yolo.trainer import KD_DEFAULTS, KDDetectionTrainer

    overrides = dict(model="yolov8n.yaml", data=str(tree["data"]), epochs=1, imgsz=64, device="cpu",
                     project=str(tree["root"] / "runs"), name="ddp", exist_ok=True, plots=False,
                     kd_teacher=str(tree["teacher"]), kd_cls=0.7, kd_feat=2.0, kd_t=3.0)
    parent = KDDetectionTrainer(overrides=overrides)
    cfg = DEFAULT_CFG_DICT.copy()
    cfg.update(save_dir="")  # as the generated DDP script does
    worker = type(parent)(cfg=cfg, overrides=vars(parent.args))
    kd = {k: getattr(worker.args, k) for k in KD_DEFAULTS}
    assert kd == {k: getattr(parent.args, k) for k in KD_DEFAULTS}
    assert kd["kd_cls"] == 0.7 and kd["kd_feat"] == 2.0 and kd["kd_t"] == 3.0
    assert kd["kd_dfl"] == KD_DEFAULTS["kd_dfl"]  # an argument not given keeps its default
    assert worker.save_dir == parent.save_dir


def test_all_kd_weights_zero_is_the_plain_loss_without_a_teacher_pass():
    """With every KD weight 0 the criterion returns Ultralytics' loss alone and never runs the teacher."""
    from mtkd.yolo.losses import YoloKD
    from mtkd.yolo.trainer import KDCriterion

    loss, items = torch.tensor([1.0, 2.0, 3.0]), {"box": torch.tensor(1.0)}
    calls = []

    def teacher(images):
        calls.append(images)
        raise AssertionError("the teacher ran")

    def base(preds, batch):
        return loss, items

    from ultralytics.nn.tasks import DetectionModel

    student = DetectionModel("yolov8n.yaml", nc=3, verbose=False).train()
    batch = {"img": torch.zeros(2, 3, 64, 64)}
    preds = student(batch["img"])  # train-mode predictions
    crit = KDCriterion(base, student.model[-1], teacher, YoloKD(cls=0.0, dfl=0.0, obj=0.0, feat=0.0))
    out_loss, out_items = crit(preds, batch)
    assert out_loss is loss and out_items is items and not calls
    live = KDCriterion(base, student.model[-1], teacher, YoloKD(cls=0.5, dfl=0.0, obj=0.0))
    with pytest.raises(AssertionError, match="the teacher ran"):  # a live term does run it
        live(preds, batch)
    assert len(calls) == 1
