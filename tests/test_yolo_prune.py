"""``mtkd yolo prune``: Torch-Pruning on an Ultralytics detection model, saved as a stock Ultralytics checkpoint."""
import contextlib
import io
import pickletools
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

from mtkd.errors import MtkdError
from test_yolo_kd import NAMES, _save_random_teacher, _write_tree

SIZE = 64


def _pickled_modules(path):
    with zipfile.ZipFile(path) as z:
        pkl = z.read([n for n in z.namelist() if n.endswith("data.pkl")][0])
    return {str(a).split()[0] for op, a, _ in pickletools.genops(pkl) if op.name in ("GLOBAL", "STACK_GLOBAL") and a}


def _params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A random 3-class yolov8n, pruned by half with taylor importance on a tiny data set."""
    from mtkd.yolo.prune import main, output_shapes

    root = tmp_path_factory.mktemp("yolo_prune")
    data = _write_tree(root / "data")
    src = _save_random_teacher(root / "src.pt", len(NAMES))
    full = torch.load(src, weights_only=False)["model"].float().eval()
    out = root / "pruned.pt"
    argv = [f"model={src}", "ratio=0.5", f"out={out}", "importance=taylor", f"data={data}", f"imgsz={SIZE}"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(argv) == 0
    return {"root": root, "data": data, "teacher": src, "src": src, "out": out, "stdout": stdout.getvalue(),
            "full_params": _params(full), "full_shapes": output_shapes(full, SIZE)}


@pytest.mark.slow
def test_prune_reports_and_writes_a_smaller_stock_model(pruned):
    from ultralytics.nn.modules import C2f, Detect
    from ultralytics.nn.tasks import DetectionModel

    from mtkd.yolo.prune import output_shapes

    ckpt = torch.load(pruned["out"], map_location="cpu", weights_only=False)
    model = ckpt["model"].float().eval()
    assert type(model) is DetectionModel and ckpt["ema"] is None and ckpt["train_args"] == {}
    assert not any(m.startswith(("mtkd", "torch_pruning")) for m in _pickled_modules(pruned["out"]))
    report = ckpt["mtkd"]["pruned"]
    assert report["params_before"] == pruned["full_params"] and report["params_after"] == _params(model)
    assert report["params_after"] < 0.5 * report["params_before"]
    assert report["gflops_after"] < 0.5 * report["gflops_before"]
    assert report["importance"] == "taylor" and report["imgsz"] == SIZE and report["round_to"] == 8
    assert output_shapes(model, SIZE) == pruned["full_shapes"]  # Detect's outputs are kept
    head = model.model[-1]
    assert isinstance(head, Detect)
    assert [b[-1].out_channels for b in head.cv3] == [len(NAMES)] * 3 and head.cv2[0][-1].out_channels == 64
    blocks = [m for m in model.modules() if isinstance(m, C2f)]
    assert len(blocks) == 8
    for block in blocks:  # merged back: one cv1 whose two halves feed chunk(2)
        assert block.cv1.conv.out_channels == 2 * block.c and block.c % 8 == 0
        assert block.m[0].cv1.conv.in_channels == block.c
    assert blocks[-1].c == 64  # the widest block lost half its channels (128 -> 64)
    table = pruned["stdout"]
    assert "params" in table and "GFLOPs" in table and f"{report['params_after']:,}" in table
    assert "mtkd yolo train" in table


def test_split_and_merge_are_exact_for_c2f_and_c3k2():
    from ultralytics.nn.modules import C2f
    from ultralytics.nn.modules.block import C3k2
    from ultralytics.nn.tasks import DetectionModel

    from mtkd.models.surgery import C2fSplit, merge_c2f, split_c2f

    x = torch.randn(1, 3, SIZE, SIZE)
    for cfg, kind, count in (("yolov8n.yaml", C2f, 8), ("yolo11n.yaml", C3k2, 8)):
        model = DetectionModel(cfg, nc=3, verbose=False).eval()
        with torch.no_grad():
            before = model(x)[0]
        assert len(split_c2f(model)) == (count if kind is C2f else 0)  # C3k2 only with subclasses=True
        split = split_c2f(model, subclasses=True)
        assert len(split) == (0 if kind is C2f else count)
        assert all(isinstance(model.get_submodule(n), C2fSplit) for n in split)
        with torch.no_grad():
            torch.testing.assert_close(model(x)[0], before)
        merge_c2f(model)
        assert not any(isinstance(m, C2fSplit) for m in model.modules())
        assert sum(type(m) is kind for m in model.modules()) == count
        with torch.no_grad():
            torch.testing.assert_close(model(x)[0], before)


def test_merge_refuses_halves_of_different_widths():
    from ultralytics.nn.modules import Conv
    from ultralytics.nn.tasks import DetectionModel

    from mtkd.models.surgery import merge_c2f, split_c2f

    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    name = split_c2f(model)[0]
    block = model.get_submodule(name)
    block.cv0 = Conv(block.cv0.conv.in_channels, block.cv0.conv.out_channels // 2, 1, 1)
    with pytest.raises(MtkdError, match=rf"{name}: the halves of its first conv kept 8 and 16 channels; a C2f"):
        merge_c2f(model)


@pytest.mark.slow
def test_yolo11_c3k2_blocks_prune_to_equal_halves():
    from ultralytics.nn.modules.block import C3k2
    from ultralytics.nn.tasks import DetectionModel

    from mtkd.yolo.prune import output_shapes, prune_detection

    model = DetectionModel("yolo11n.yaml", nc=3, verbose=False)
    shapes = output_shapes(model, SIZE)
    report = prune_detection(model, SIZE, 0.5, importance="lamp")
    assert report["params_after"] < 0.6 * report["params_before"]
    assert output_shapes(model, SIZE) == shapes
    blocks = [m for m in model.modules() if type(m) is C3k2]
    assert len(blocks) == 8 and all(b.cv1.conv.out_channels == 2 * b.c for b in blocks)
    assert any(b.c < 32 for b in blocks)


@pytest.mark.slow
def test_a_half_that_cannot_be_pruned_keeps_the_other_half_whole(monkeypatch):
    """Protect one half of a split C2f: the other half is kept whole too, so the block merges back."""
    from ultralytics.nn.tasks import DetectionModel

    import mtkd.yolo.prune as yprune

    protected = yprune.protected_layers
    monkeypatch.setattr(yprune, "protected_layers", lambda m: protected(m) + [m.model[8].cv1.conv])
    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    report = yprune.prune_detection(model, SIZE, 0.5)
    assert report["params_after"] < 0.6 * report["params_before"]
    assert model.model[8].c == 128 and model.model[6].c == 32  # kept whole / halved (64 -> 32)


CHECK = textwrap.dedent("""
    import sys
    sys.modules["mtkd"] = None  # importing mtkd now fails: the checkpoint must not need it
    try:
        import mtkd
    except ImportError:
        pass
    else:
        raise SystemExit("mtkd importable")
    import numpy as np
    from ultralytics import YOLO
    yolo = YOLO(sys.argv[1])
    assert yolo.task == "detect"
    print("PARAMS", sum(p.numel() for p in yolo.model.parameters()))
    res = yolo.predict(np.zeros((64, 64, 3), np.uint8), imgsz=64, verbose=False)
    assert len(res) == 1 and res[0].boxes is not None
    onnx = yolo.export(format="onnx", imgsz=64, simplify=False, dynamic=False)
    import onnxruntime
    sess = onnxruntime.InferenceSession(onnx)
    y = sess.run(None, {sess.get_inputs()[0].name: np.zeros((1, 3, 64, 64), np.float32)})[0]
    print("ONNX", y.shape)
""")


@pytest.mark.slow
def test_pruned_model_loads_predicts_and_exports_without_mtkd(pruned, tmp_path):
    pytest.importorskip("onnxruntime")
    copy = tmp_path / "pruned.pt"  # export writes beside the weights
    copy.write_bytes(pruned["out"].read_bytes())
    proc = subprocess.run([sys.executable, "-c", CHECK, str(copy)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = torch.load(copy, weights_only=False)["mtkd"]["pruned"]
    assert int(proc.stdout.split("PARAMS")[1].split()[0]) == report["params_after"]
    assert "ONNX (1, 7, 84)" in proc.stdout  # 4 box + 3 classes, 84 anchors at 64 px


@pytest.mark.slow
def test_mtkd_yolo_train_keeps_the_pruned_widths(pruned):
    """Ultralytics would rebuild the yaml's widths; the KD trainer trains the pruned model itself."""
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    from mtkd.yolo.cli import parse_args, train

    report = torch.load(pruned["out"], weights_only=False)["mtkd"]["pruned"]
    seen = []
    callbacks = {"on_train_epoch_end": [lambda t: seen.append(_params(t.model))]}
    args = [f"model={pruned['out']}", f"teacher={pruned['teacher']}", f"data={pruned['data']}", "epochs=1",
            f"imgsz={SIZE}", "batch=4", "device=cpu", "workers=0", "plots=False", "deterministic=False",
            f"project={pruned['root'] / 'runs'}", "name=ft", "exist_ok=True"]
    trainer = train(parse_args(args), callbacks=callbacks)
    assert seen == [report["params_after"]]
    assert _params(YOLO(str(trainer.last)).model) == report["params_after"]
    # what plain Ultralytics would train: the yaml's widths
    assert _params(DetectionModel(YOLO(str(pruned["out"])).model.yaml, nc=3, verbose=False)) == report["params_before"]


def test_bad_calls_are_one_line_errors(tmp_path, monkeypatch, capsys):
    from ultralytics.nn.tasks import SegmentationModel

    from mtkd.yolo.cli import main

    src = _save_random_teacher(tmp_path / "src.pt", 3)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    seg = tmp_path / "seg.pt"
    torch.save({"model": SegmentationModel("yolov8n-seg.yaml", nc=3, verbose=False), "train_args": {}}, seg)
    calls = [[f"model={src}", "ratio=0"], [f"model={src}", "ratio=1"], [f"model={src}", "ratio=1.5"],
             [f"model={src}"], [f"model={src}", "ratio=0.5", "importance=random"],
             [f"model={src}", "ratio=0.5", "importance=taylor"], [f"model={src}", "ratio=0.5", "round_to=0"],
             [f"model={src}", "ratio=0.5", "bogus=1"], [f"model={tmp_path / 'missing.pt'}", "ratio=0.5"],
             [f"model={text}", "ratio=0.5"], [f"model={seg}", "ratio=0.5"],
             [f"model={src}", "ratio=0.5", "imgsz=50"], [f"model={src}", "ratio=0.5", f"out={src}"]]
    assert [main(["prune", *argv]) for argv in calls] == [2] * len(calls)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "torch_pruning", None)
        assert main(["prune", f"model={src}", "ratio=0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == len(calls) + 1 and all(line.startswith("error: ") for line in err)
    assert [line.split(":")[1].strip() for line in err[:-1]] == [
        "ratio", "ratio", "ratio", "ratio", "importance", "data", "round_to", "bogus", "model", "model", "model",
        "imgsz", "out"]
    assert "not found" in err[8] and "is not an Ultralytics YOLO detection checkpoint" in err[9]
    assert "holds a SegmentationModel" in err[10]
    assert 'pip install "mtkd[export]"' in err[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.pt", "seg.pt", "src.pt"]  # nothing written


def test_help_names_the_retraining_trap(capsys):
    from mtkd.cli import main

    assert main(["yolo", "prune", "help"]) == 0
    text = capsys.readouterr().out
    assert "mtkd yolo prune model=MODEL.pt ratio=R" in text
    assert "mtkd yolo train model=PATH" in text and "rebuilds the model at its original widths" in text
    assert main(["yolo"]) == 2 and "mtkd yolo prune model=" in capsys.readouterr().out
