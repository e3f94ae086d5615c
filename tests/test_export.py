"""Exporting pruned students: mtkd prune, pruned checkpoints, model.init, mtkd export (ONNX).

Tiny models (the ``student_small`` preset at 64 px, 3 classes) on the CPU.
"""
from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from mtkd import checkpoint as ckpt_io
from mtkd.cli import main
from mtkd.engine.config import build_config
from mtkd.engine.trainer import load_model
from mtkd.errors import ConfigError, MtkdError
from mtkd.export.prune import check_replay, prune_checkpoint, prune_model, protected_layers
from mtkd.models import build_model, model_info
from mtkd.models.surgery import C2fSplit, split_c2f
from mtkd.teachers import load_teacher

pytest.importorskip("torch_pruning")

ROOT = Path(__file__).resolve().parents[1]
NC, SIZE = 3, 64
CLASSES = ["circle_solid", "square_solid", "triangle_solid"]  # names the synthetic data knows
SMALL = {"preset": "student_small"}


def small_model(seed: int = 0) -> nn.Module:
    """A student_small with non-trivial BatchNorm statistics (so eval differs from a fresh model)."""
    torch.manual_seed(seed)
    model = build_model(SMALL, NC)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, SIZE, SIZE) * 2 + 0.5)
    return model.eval()


def outputs(model: nn.Module, x: torch.Tensor) -> dict:
    model.eval()
    with torch.no_grad():
        out = model(x)
    d = out["det"]
    return {"cls": d.cls, "obj": d.obj, "box": d.box, "box_dist": d.box_dist, "seg": out["seg"]}


def shapes(out: dict) -> dict:
    return {k: tuple(v.shape) for k, v in out.items()}


def save_ckpt(path: Path, model: nn.Module, fmt: str = "mtkd-ckpt-1", classes=CLASSES) -> Path:
    """A checkpoint as a run writes it (the format given: version 1 by default, an older file)."""
    torch.save({"format": fmt, "task": "multitask", "classes": list(classes), "config": {"model": dict(SMALL)},
                "model": model.state_dict()}, path)
    return path


def small_cfg(**over) -> dict:
    user = {"model": dict(SMALL), "data": {"imgsz": SIZE}, "train": {"device": "cpu", "workers": 0}}
    user.update(over)
    return build_config(user)


# -- pruning ----------------------------------------------------------------------------------
def test_c2f_split_is_exact():
    model = small_model()
    x = torch.randn(2, 3, SIZE, SIZE)
    want = outputs(model, x)
    names = split_c2f(model)
    assert names == ["neck.td4", "neck.td3", "neck.bu4", "neck.bu5"]
    assert all(isinstance(model.get_submodule(n), C2fSplit) for n in names)
    got = outputs(model, x)
    for k in want:
        assert torch.allclose(want[k], got[k], atol=1e-6), k


def test_pruning_keeps_outputs_and_reduces_params_and_gflops():
    model = small_model()
    x = torch.randn(2, 3, SIZE, SIZE)
    before_shapes = shapes(outputs(model, x))
    protected_before = {id(m): m.out_channels for m in protected_layers(model)}
    before = model_info(model, SIZE, runs=1)
    report = prune_model(model, SIZE, ratio=0.3)
    after = model_info(model, SIZE, runs=1)
    assert shapes(outputs(model, x)) == before_shapes
    assert {id(m): m.out_channels for m in protected_layers(model)} == protected_before
    assert after["params"] < before["params"] and after["gflops"] < before["gflops"]
    assert report["params_before"] == before["params"] and report["params_after"] == after["params"]
    assert report["gflops_after"] == pytest.approx(after["gflops"])
    # the stale widths are refreshed from the real maps (distillation adapters are sized from them)
    feats = model(x)["feats"]
    assert model.feat_channels == {k: v.shape[1] for k, v in feats.items()}
    assert model.feat_channels["c5"] < 96  # cnn_w12: 8 x 12 channels before
    # a second pruning stage on the pruned model still rebuilds exactly from its record
    prune_model(model, SIZE, ratio=0.2, importance="lamp", global_pruning=True)
    assert len(model.pruning["stages"]) == 2
    assert model_info(model, SIZE, runs=1)["params"] < after["params"]
    assert check_replay(model, SIZE) == 0.0


def test_ratio_half_on_student_small_removes_a_sizeable_share():
    model = small_model()
    report = prune_model(model, SIZE, ratio=0.5, round_to=8)
    assert report["gflops_after"] <= 0.65 * report["gflops_before"]  # measured 0.574
    assert report["params_after"] <= 0.45 * report["params_before"]  # measured 0.388
    fresh = build_model(SMALL, NC)
    split_c2f(fresh)
    widths = {n: m.out_channels for n, m in fresh.named_modules() if isinstance(m, nn.Conv2d)}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.out_channels != widths[name]:
            assert m.out_channels % 8 == 0 and m.out_channels >= 8, name  # nearest multiple, never emptied


def test_target_gflops_prunes_until_at_or_below_and_says_when_it_cannot():
    model = small_model()
    full = model_info(model, SIZE, runs=1)["gflops"]
    report = prune_model(model, SIZE, target_gflops=0.8 * full)
    assert report["gflops_after"] <= 0.8 * full
    assert model_info(model, SIZE, runs=1)["gflops"] == pytest.approx(report["gflops_after"])
    assert 0 < report["channel_ratio"] < 0.5  # stopped at the first step that got there
    stuck = small_model()
    with pytest.raises(MtkdError, match=r"--target-gflops 1e-06: removing 90% of the channels only reaches"):
        prune_model(stuck, SIZE, target_gflops=1e-6)
    assert check_replay(stuck, SIZE) == 0.0  # pruned as far as it got, and its record says so


def test_taylor_importance_uses_the_gradients_it_is_given():
    calls = []

    def grad_fn(model):
        calls.append(1)
        out = model(torch.randn(2, 3, SIZE, SIZE))
        (out["seg"].square().mean() + out["det"].cls.square().mean()).backward()

    a, b = small_model(), small_model()
    prune_model(a, SIZE, ratio=0.5, importance="taylor", grad_fn=grad_fn)
    prune_model(b, SIZE, ratio=0.5, importance="magnitude")
    assert calls == [1]
    assert all(p.grad is None for p in a.parameters())
    assert a.pruning["stages"] != b.pruning["stages"]  # other channels chosen, same widths
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]
    with pytest.raises(MtkdError, match="taylor"):
        prune_model(small_model(), SIZE, ratio=0.5, importance="taylor")


# -- pruned checkpoints ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A student_small pruned at 0.5 through prune_checkpoint, from a version-1 checkpoint."""
    tmp = tmp_path_factory.mktemp("pruned")
    source = save_ckpt(tmp / "source.pt", small_model())
    report = prune_checkpoint(small_cfg(), source, tmp / "pruned", ratio=0.5)
    return {"dir": tmp, "source": source, "ckpt": tmp / "pruned" / "best.pt", "report": report}


def test_pruned_checkpoint_needs_no_pickle_and_round_trips_in_a_fresh_process(pruned):
    ck = torch.load(pruned["ckpt"], weights_only=True)
    assert ck["format"] == ckpt_io.FORMAT == "mtkd-ckpt-3"
    assert ck["pruning"]["model"]["backbone"] == "cnn_w12" and ck["pruning"]["rewrites"] == ["c2f_split"]
    assert json.loads((pruned["ckpt"].parent / "prune.json").read_text())["params_after"] == \
        pruned["report"]["params_after"]
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    torch.save(x, pruned["dir"] / "x.pt")
    _, here, classes, _ = load_model(small_cfg(), pruned["ckpt"])
    assert classes == CLASSES
    want = outputs(here, x)
    script = (
        "import sys, torch\n"
        "from mtkd.env import go_offline; go_offline()\n"
        "from mtkd.engine.config import build_config\n"
        "from mtkd.engine.trainer import load_model\n"
        "cfg = build_config({'model': {'preset': 'student_small'}, 'data': {'imgsz': 64}, 'train': {'device': 'cpu'}})\n"
        "_, m, _, _ = load_model(cfg, sys.argv[1])\n"
        "x = torch.load(sys.argv[2], weights_only=True)\n"
        "with torch.no_grad(): o = m(x)\n"
        "torch.save({'cls': o['det'].cls, 'box': o['det'].box, 'obj': o['det'].obj, 'seg': o['seg']}, sys.argv[3])\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(pruned["ckpt"]), str(pruned["dir"] / "x.pt"),
                           str(pruned["dir"] / "y.pt")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = torch.load(pruned["dir"] / "y.pt", weights_only=True)
    for k in ("cls", "box", "obj", "seg"):
        assert torch.equal(want[k], got[k]), k
    # the pruned model's outputs keep the unpruned model's shapes
    _, full, _, _ = load_model(small_cfg(), pruned["source"])
    assert shapes(outputs(full, x)) == shapes(want)
    assert model_info(here, SIZE, runs=1)["params"] == pruned["report"]["params_after"]


def test_version_1_checkpoints_still_load_and_unknown_formats_are_refused(tmp_path):
    model = small_model()
    old = save_ckpt(tmp_path / "old.pt", model)
    _, loaded, _, _ = load_model(small_cfg(), old)
    x = torch.randn(1, 3, SIZE, SIZE)
    assert torch.equal(outputs(model, x)["seg"], outputs(loaded, x)["seg"])
    teacher = load_teacher({"ckpt": str(old)}, NC)
    assert torch.equal(outputs(model, x)["cls"], outputs(teacher.model, x)["cls"])
    newer = save_ckpt(tmp_path / "newer.pt", model, fmt="mtkd-ckpt-9")
    with pytest.raises(MtkdError, match=r"newer\.pt: checkpoint format 'mtkd-ckpt-9' .*newer mtkd"):
        load_model(small_cfg(), newer)


def test_teacher_loader_rebuilds_a_pruned_checkpoint(pruned):
    student = build_model(SMALL, NC)
    # a teacher.model from the config cannot describe the pruned widths: the record is used
    teacher = load_teacher({"ckpt": str(pruned["ckpt"]), "model": {"preset": "teacher_small"}}, NC, student=student)
    _, direct, _, _ = load_model(small_cfg(), pruned["ckpt"])
    assert teacher.feat_channels == direct.feat_channels != student.feat_channels
    x = torch.randn(1, 3, SIZE, SIZE)
    assert torch.equal(outputs(direct, x)["seg"], outputs(teacher.model, x)["seg"])


def test_a_damaged_pruning_record_is_a_one_line_error(pruned, tmp_path):
    ck = torch.load(pruned["ckpt"], weights_only=True)
    ck["pruning"]["stages"][0][0][0] = "neck.no_such_layer"
    torch.save(ck, tmp_path / "bad.pt")
    with pytest.raises(MtkdError, match=r"bad\.pt: cannot replay pruning stage 0") as err:
        load_model(small_cfg(), tmp_path / "bad.pt")
    assert "\n" not in str(err.value)
    ck["pruning"]["version"] = 99
    torch.save(ck, tmp_path / "newer.pt")
    with pytest.raises(MtkdError, match=r"newer\.pt: malformed pruning record: version 99"):
        load_model(small_cfg(), tmp_path / "newer.pt")


def test_missing_torch_pruning_names_the_extra(pruned, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # import torch_pruning -> ImportError
    with pytest.raises(MtkdError, match=r'pip install "mtkd\[export\]"') as err:
        load_model(small_cfg(), pruned["ckpt"])
    assert "\n" not in str(err.value)
    with pytest.raises(MtkdError, match=r'torch-pruning is not installed.*pip install "mtkd\[export\]"'):
        prune_checkpoint(small_cfg(), pruned["source"], pruned["dir"] / "never", ratio=0.5)


# -- model.init -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from mtkd.datasets import make_synthetic

    root = tmp_path_factory.mktemp("syn")
    return make_synthetic(root, n_train=8, n_val=2, n_test=2, imgsz=(64, 72), seed=0, formats=("voc",),
                          classes=CLASSES, objects=(1, 2), min_size=12.0)["voc"]


def _train_cfg(synthetic, out, **model):
    return build_config({
        "out": str(out), "model": {**SMALL, **model},
        "data": {"root": str(synthetic), "imgsz": SIZE},
        "train": {"epochs": 1, "batch": 4, "max_steps": 2, "workers": 0, "device": "cpu", "tensorboard": False,
                  "plots": False, "lr": 0.0, "ema": False, "warmup_epochs": 0.0},
        "eval": {"max_det": 20}})


def test_model_init_from_a_pruned_checkpoint_trains_two_steps(pruned, synthetic, tmp_path):
    from mtkd.engine.trainer import Trainer

    out = tmp_path / "recover"
    report = Trainer(_train_cfg(synthetic, out, init=str(pruned["ckpt"]))).fit()
    assert report["steps"] == 2 and report["params"] == pruned["report"]["params_after"]
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["pruning"]["stages"] == torch.load(pruned["ckpt"], weights_only=True)["pruning"]["stages"]
    # lr 0: the convolutions still hold the pruned checkpoint's weights (BatchNorm statistics moved)
    start = torch.load(pruned["ckpt"], weights_only=True)["model"]
    convs = [k for k in start if k.endswith("conv.weight")]
    assert convs and all(torch.equal(start[k], best["model"][k]) for k in convs)
    _, model, _, _ = load_model(_train_cfg(synthetic, out), out / "best.pt")  # eval/predict load it as well
    assert model.pruning is not None


def test_model_init_errors_name_the_key(pruned, synthetic, tmp_path):
    from mtkd.engine.trainer import Trainer

    wrong = save_ckpt(tmp_path / "wrong.pt", build_model(SMALL, 5), classes=list("abcde"))
    with pytest.raises(ConfigError, match=r"model.init: .*wrong\.pt has 5 classes but the data has 3"):
        Trainer(_train_cfg(synthetic, tmp_path / "r1", init=str(wrong))).fit()
    with pytest.raises(ConfigError, match=r"model.init: .*nope\.pt: checkpoint not found"):
        Trainer(_train_cfg(synthetic, tmp_path / "r2", init=str(tmp_path / "nope.pt"))).fit()


# -- ONNX ----------------------------------------------------------------------------------------
def confident(model: nn.Module) -> nn.Module:
    """Raise the objectness and class biases so that many boxes pass NMS thresholds (an untrained model's don't)."""
    with torch.no_grad():
        for conv in list(model.det_head.obj_pred) + [b[-1] for b in model.det_head.cls_branch]:
            conv.bias.fill_(1.0)
    return model


def test_onnx_export_of_a_pruned_model_matches_pytorch(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from mtkd.export.onnx import export_onnx

    model = confident(small_model())
    prune_model(model, SIZE, ratio=0.5)
    images = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    path = tmp_path / "sub" / "model.onnx"
    report = export_onnx(model, path, SIZE, images, conf=0.25, metadata={"classes": CLASSES})
    assert report["outputs"] == ["boxes", "scores", "seg"] and report["simplified"]
    assert report["nodes"] < report["nodes_exported"]
    par = report["parity"]
    assert par["boxes_checked"] > 10 and par["max_abs_diff"]["seg"] <= 1e-4
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]  # no external data, no temp file
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["classes"]) == CLASSES and meta["mtkd_format"] == "mtkd-onnx-1"
    # dynamic batch; scores as decode ranks them (sigmoid(cls) * sigmoid(obj)); boxes as boxes_xyxy
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, SIZE, SIZE)
    boxes, scores, seg = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        out = model(x)
    assert boxes.shape == (5, out["det"].cls.shape[1], 4) and seg.shape == (5, NC + 1, SIZE, SIZE)
    assert torch.allclose(torch.from_numpy(scores), out["det"].scores(), atol=1e-5)
    assert torch.allclose(torch.from_numpy(boxes), out["det"].boxes_xyxy(), atol=1e-3)


def test_onnx_parity_check_catches_a_different_model():
    pytest.importorskip("onnxruntime")
    from mtkd.export.onnx import check_parity, to_onnx

    a, b = confident(small_model(0)), confident(small_model(1))
    data, _ = to_onnx(a, SIZE, simplify=False)
    images = torch.randn(2, 3, SIZE, SIZE)
    assert check_parity(a, data, images, conf=0.25)["boxes_checked"] > 0
    with pytest.raises(MtkdError, match="ONNX parity: seg differs from PyTorch by"):
        check_parity(b, data, images, conf=0.25)
    # boxes alone: b's seg head and scores made a's, its box branch left different
    b.seg_head.load_state_dict(a.seg_head.state_dict())
    for i in range(3):
        b.det_head.cls_branch[i].load_state_dict(a.det_head.cls_branch[i].state_dict())
        b.det_head.obj_pred[i].load_state_dict(a.det_head.obj_pred[i].state_dict())
    b.det_head.box_tower.load_state_dict(a.det_head.box_tower.state_dict())
    b.backbone.load_state_dict(a.backbone.state_dict())
    b.neck.load_state_dict(a.neck.state_dict())
    reg_max = b.det_head.reg_max
    with torch.no_grad():  # stride-8 boxes grow (DFL bins tilted to the far end): same scores, other geometry
        b.det_head.box_pred[0].bias.add_(torch.linspace(0.0, 6.0, reg_max).repeat(4))
    with pytest.raises(MtkdError, match=r"ONNX parity: after NMS, image 0: .* has no counterpart"):
        check_parity(b, data, images, conf=0.25)


def test_unwritable_onnx_path_is_a_one_line_error(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    import mtkd.export.onnx as mo

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(mo.os, "replace", read_only)
    model = small_model()
    with pytest.raises(MtkdError, match=r"model\.onnx: cannot write: Read-only file system") as err:
        mo.export_onnx(model, tmp_path / "model.onnx", SIZE, torch.randn(1, 3, SIZE, SIZE))
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone too


# -- the command line -------------------------------------------------------------------------
def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_prune_cli_errors(pruned, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": SMALL, "data": {"imgsz": SIZE}, "train": {"device": "cpu"}}))
    base = ["prune", str(cfg), "--ckpt", str(pruned["source"]), "--out", str(tmp_path / "p")]
    for bad in ("1.5", "0", "-0.2", "1"):
        assert main(base + ["--ratio", bad]) == 2
        assert "--ratio: the share of channels to remove must be in (0, 1)" in one_line_error(capsys)
    not_model = tmp_path / "not_model.pt"
    torch.save({"weights": torch.zeros(3)}, not_model)
    assert main(["prune", str(cfg), "--ckpt", str(not_model), "--out", str(tmp_path / "p"), "--ratio", "0.5"]) == 2
    assert "not_model.pt: not an mtkd checkpoint" in one_line_error(capsys)
    not_state = tmp_path / "not_state.pt"
    torch.save({"model": [1, 2, 3], "classes": CLASSES}, not_state)
    assert main(["prune", str(cfg), "--ckpt", str(not_state), "--out", str(tmp_path / "p"), "--ratio", "0.5"]) == 2
    assert "not_state.pt: its 'model' entry is not a state dict" in one_line_error(capsys)
    assert not (tmp_path / "p").exists()


def test_prune_export_eval_from_the_command_line(synthetic, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": SMALL, "data": {"root": str(synthetic), "imgsz": SIZE},
                                   "train": {"device": "cpu", "workers": 0, "batch": 4}, "eval": {"max_det": 20}}))
    source = save_ckpt(tmp_path / "source.pt", confident(small_model()))
    assert main(["prune", str(cfg), "--ckpt", str(source), "--out", str(tmp_path / "p"), "--ratio", "0.5",
                 "--importance", "taylor"]) == 0
    text = capsys.readouterr().out
    assert "GFLOPs" in text and "model.init=" in text
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", str(cfg), "eval.conf=0.25", "--ckpt", str(tmp_path / "p" / "best.pt"),
                 "--out", str(onnx_path)]) == 0
    text = capsys.readouterr().out
    assert onnx_path.is_file() and "parity with PyTorch on 2 val images" in text
    assert main(["eval", str(cfg), "--ckpt", str(tmp_path / "p" / "best.pt"), "--split", "val"]) == 0
    params = int(capsys.readouterr().out.strip().splitlines()[-1].split()[3].replace(",", ""))
    assert params == json.loads((tmp_path / "p" / "prune.json").read_text())["params_after"]
    assert main(["export", str(cfg), "--ckpt", str(source), "--out", str(tmp_path)]) == 2
    assert "cannot write: is a directory" in one_line_error(capsys)


# -- ONNX inference and INT8 ---------------------------------------------------------------------
def lively(seed: int = 0) -> nn.Module:
    """A student_small whose scores vary from anchor to anchor, as a trained model's do.

    The preset's own init makes the neck's features nearly constant over the image, so an untrained
    model scores many anchors exactly alike and NMS may keep either of two tied boxes; Kaiming-normal
    convolutions (BatchNorm statistics from normalised noise) and zero score biases avoid that.
    """
    torch.manual_seed(seed)
    model = build_model(SMALL, NC)
    fixed = set(model.det_head.dfl.modules())  # DFL's conv holds the bin positions 0..reg_max-1
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m not in fixed:
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model((torch.rand(4, 3, SIZE, SIZE) - 0.45) / 0.225)
        for conv in list(model.det_head.obj_pred) + [b[-1] for b in model.det_head.cls_branch]:
            conv.weight.mul_(3.0)
            conv.bias.zero_()
    return model.eval()


@pytest.fixture(scope="module")
def exported(synthetic, tmp_path_factory):
    """A :func:`lively` student_small exported from the command line, with its config and checkpoint."""
    pytest.importorskip("onnxruntime")
    root = tmp_path_factory.mktemp("onnx")
    cfg = root / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": SMALL, "data": {"root": str(synthetic), "imgsz": SIZE},
                                   "train": {"device": "cpu", "workers": 0, "batch": 4}, "eval": {"max_det": 20}}))
    model = lively()
    ckpt = save_ckpt(root / "best.pt", model)
    onnx_path = root / "m.onnx"
    assert main(["export", str(cfg), "eval.conf=0.25", "--ckpt", str(ckpt), "--out", str(onnx_path)]) == 0
    return {"cfg": cfg, "ckpt": ckpt, "onnx": onnx_path, "model": model}


def _as_tensors(entry: dict) -> dict:
    return {"boxes": torch.tensor(entry["boxes"]).reshape(-1, 4), "scores": torch.tensor(entry["scores"]),
            "labels": torch.tensor(entry["labels"], dtype=torch.long)}


def _near_ties(model: nn.Module, path: Path):
    """Pixels of ``path`` whose two best seg logits (PyTorch, original pixels) differ by less than the
    export's tolerance."""
    from mtkd.datasets.common import read_image
    from mtkd.datasets.transforms import build_transforms
    from mtkd.export.onnx import TOL
    from mtkd.tasks.multitask.predict import eval_item, predict_batch

    image = read_image(path)
    data = small_cfg()["data"]  # the exported metadata: imgsz 64, the default normalisation
    transform = build_transforms({k: data[k] for k in ("imgsz", "mean", "std")}, train=False)
    item = eval_item(image, transform, path.name)
    pred, = predict_batch(model, item["image"][None], [item["letterbox"]], [image.shape[:2]], 0.25, 0.6, 20)
    top2 = pred.seg_logits().topk(2, dim=0).values
    return (top2[0] - top2[1] < TOL).numpy()


def test_predict_from_the_onnx_file_alone_matches_the_checkpoint(exported, synthetic, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from mtkd.export.onnx import compare_detections

    # noise images of several sizes (letterboxed both ways): an untrained model scores the anchors
    # of uniform regions exactly alike, and NMS may then keep either of two tied boxes
    source, rng = tmp_path / "images", np.random.default_rng(0)
    source.mkdir()
    for i, (h, w) in enumerate([(64, 64), (80, 96), (72, 50), (40, 120), (100, 100), (64, 90)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(source / f"{i}.png")
    assert main(["predict", str(exported["cfg"]), "--ckpt", str(exported["ckpt"]), "--source", str(source),
                 "--out", str(tmp_path / "torch")]) == 0
    # no config, no checkpoint: classes, size and normalisation come from the file's metadata
    assert main(["predict", "--onnx", str(exported["onnx"]), "--source", str(source),
                 "--out", str(tmp_path / "onnx")]) == 0
    capsys.readouterr()
    ref = json.loads((tmp_path / "torch" / "detections.json").read_text())
    got = json.loads((tmp_path / "onnx" / "detections.json").read_text())
    assert [r["file"] for r in got] == [r["file"] for r in ref] and len(ref) == 6
    assert [(r["width"], r["height"], r["vis"], r["mask"]) for r in got] == \
           [(r["width"], r["height"], r["vis"], r["mask"]) for r in ref]
    assert sum(len(r["boxes"]) for r in ref) > 20  # the check below compares real detections
    # every box above the threshold (plus the parity margin) has a same-class twin at IoU >= 0.99
    cut = 0.25 + 1e-3
    assert compare_detections([_as_tensors(r) for r in ref], [_as_tensors(r) for r in got],
                              [cut] * len(ref)) is None
    for a, b in zip(ref, got):
        strong_a = sorted(s for s in a["scores"] if s >= cut)
        strong_b = sorted(s for s in b["scores"] if s >= cut)
        assert len(strong_a) == len(strong_b) and np.allclose(strong_a, strong_b, atol=2e-4)
        assert {c for c, s in zip(a["classes"], a["scores"]) if s >= cut} == \
               {c for c, s in zip(b["classes"], b["scores"]) if s >= cut}
        mask_a = np.array(Image.open(tmp_path / "torch" / a["mask"]))
        mask_b = np.array(Image.open(tmp_path / "onnx" / b["mask"]))
        # equal wherever PyTorch's two best classes are more than the export tolerance apart
        # (onnxruntime's float noise may flip an exact tie, about one pixel in 10^4 here)
        tie = _near_ties(exported["model"], source / a["file"])
        assert mask_a.shape == tie.shape == (a["height"], a["width"]) and tie.mean() < 1e-3
        assert np.array_equal(mask_a[~tie], mask_b[~tie])


def test_predict_onnx_errors_are_one_line(exported, synthetic, tmp_path, capsys):
    source = str(synthetic / "JPEGImages")
    assert main(["predict", "--onnx", str(tmp_path / "nope.onnx"), "--source", source, "--out", str(tmp_path)]) == 2
    assert "nope.onnx: ONNX file not found" in one_line_error(capsys)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a protobuf" * 10)
    assert main(["predict", "--onnx", str(garbage), "--source", source, "--out", str(tmp_path)]) == 2
    assert "garbage.onnx: not a valid ONNX model" in one_line_error(capsys)
    from mtkd.export.onnx import to_onnx  # a valid graph, but not written by mtkd export (no metadata)

    plain = tmp_path / "plain.onnx"
    plain.write_bytes(to_onnx(small_model(), SIZE, simplify=False)[0])
    assert main(["predict", "--onnx", str(plain), "--source", source, "--out", str(tmp_path)]) == 2
    assert "plain.onnx: not an mtkd ONNX export" in one_line_error(capsys)
    assert main(["predict", "--ckpt", str(exported["ckpt"]), "--source", source, "--out", str(tmp_path)]) == 2
    assert "predict --ckpt: give the run config" in one_line_error(capsys)


def test_int8_export_is_smaller_keeps_shapes_and_reports_the_metric_drop(exported, tmp_path, capsys):
    import numpy as np
    import onnxruntime as ort

    out = tmp_path / "m.onnx"
    assert main(["export", str(exported["cfg"]), "eval.conf=0.25", "--ckpt", str(exported["ckpt"]),
                 "--out", str(out), "--int8", "--calib", "4", "--parity-images", "2"]) == 0
    text = capsys.readouterr().out
    int8, report_path = tmp_path / "m.int8.onnx", tmp_path / "m.int8.json"
    assert "INT8 parity on 2 val images" in text and str(report_path) in text
    assert int8.stat().st_size < out.stat().st_size
    x = np.random.default_rng(0).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    fp = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    q = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    assert any(n.op_type == "QuantizeLinear" for n in __import__("onnx").load(str(int8)).graph.node)
    assert [o.name for o in q.get_outputs()] == ["boxes", "scores", "seg"]
    assert [a.shape for a in q.run(None, {"images": x})] == [a.shape for a in fp.run(None, {"images": x})]
    report = json.loads(report_path.read_text())
    par = report["parity"]
    assert par["images"] == 2 and report["quantization"]["calib_images"] == 4
    assert set(par["drop"]) == {"map50_95", "map50", "miou"}
    for k, v in par["drop"].items():
        assert v == pytest.approx(par["fp32"][k] - par["int8"][k]) and 0.0 <= par["int8"][k] <= 1.0
    # the same scoring on another split (the prune benchmark scores the test split)
    from mtkd.engine.config import load_config
    from mtkd.export.quantize import metric_drop

    cfg = load_config(exported["cfg"], ["eval.conf=0.25"])
    task = load_model(cfg, exported["ckpt"])[0]
    test = metric_drop(cfg, task, out, int8, 100, split="test")
    assert test["split"] == "test" and test["images"] == 2 and set(test["drop"]) == {"map50_95", "map50", "miou"}
    # the INT8 file carries the metadata, so it predicts from the file alone too
    from mtkd.export.runtime import OnnxModel

    model = OnnxModel(int8)
    assert model.classes == CLASSES and model.imgsz == SIZE and json.loads(model.quantization)["format"] == "QDQ"


def test_int8_argument_errors(exported, tmp_path, capsys):
    base = ["export", str(exported["cfg"]), "--ckpt", str(exported["ckpt"]), "--out", str(tmp_path / "m.onnx")]
    assert main(base + ["--int8", "--calib", "0"]) == 2
    assert "--calib: expected a whole number >= 1, got 0" in one_line_error(capsys)
    assert main(base + ["--parity-images", "3"]) == 2
    assert "--calib and --parity-images apply to --int8 only" in one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_missing_onnxruntime_names_the_extra(exported, synthetic, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["predict", "--onnx", str(exported["onnx"]), "--source", str(synthetic / "JPEGImages"),
                 "--out", str(tmp_path)]) == 2
    assert 'onnxruntime is not installed; install the export extras: pip install "mtkd[export]"' \
        in one_line_error(capsys)
