"""predict_folder (outputs in original pixels, bad images) and the drawing/plotting helpers."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from mtkd.datasets.transforms import build_transforms
from mtkd.engine.plots import plot_loss_curves
from mtkd.errors import ConfigError, DataError, MtkdError
from mtkd.structures import DetOutput
from mtkd.tasks.multitask.plots import class_color, draw_predictions
from mtkd.tasks.multitask.predict import eval_item, predict_batch, predict_folder

IMGSZ = 64
CLASSES = ["thing", "other"]

# (relative path, (h, w), white rectangle x1, y1, x2, y2 in original pixels)
IMAGES = [
    ("a.png", (40, 100), (20, 8, 70, 30)),  # scale .64, pad_y 19
    ("sub/b.bmp", (120, 60), (10, 30, 50, 100)),  # scale .533, pad_x 16
    ("sub/deeper/c.png", (30, 30), (5, 5, 20, 25)),  # scale 2.13, no padding
    ("d.tif", (50, 40), (4, 6, 30, 40)),  # every suffix the training loaders read is predicted
    ("e.webp", (64, 64), (10, 10, 40, 50)),
]


class ThresholdModel(nn.Module):
    """Finds the bright rectangle in the (letterboxed) input: one class-0 box and a class-1 mask.

    With mean 0 / std 1 the input is pixels / 255; the letterbox pad (114 grey) stays below 0.75.
    """

    def __init__(self, nc=2):
        super().__init__()
        self.nc = nc

    def forward(self, images):
        assert images.shape[0] == 1 and images.shape[-1] == IMGSZ
        region = images[0, 0] > 0.75
        ys, xs = region.nonzero(as_tuple=True)
        x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        box = torch.stack([-x1, -y1, x2, y2]).float().view(1, 1, 4)
        cls = torch.tensor([[[20.0] + [-20.0] * (self.nc - 1)]])
        det = DetOutput(cls=cls, obj=torch.full((1, 1), 20.0), box=box, anchors=torch.zeros(1, 2),
                        strides=torch.ones(1, 1))
        seg = torch.zeros(1, self.nc + 1, IMGSZ, IMGSZ)
        seg[0, 1] = region.float() * 10
        return {"det": det, "seg": seg}


def _write_images(root):
    for rel, (h, w), (x1, y1, x2, y2) in IMAGES:
        image = np.zeros((h, w, 3), np.uint8)
        image[y1:y2, x1:x2] = 255
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
    (root / "notes.txt").write_text("not an image, not listed")


def _predict(src, out, **kw):
    return predict_folder(ThresholdModel(), src, out, CLASSES, IMGSZ, mean=[0, 0, 0], std=[1, 1, 1], **kw)


def test_predict_folder_outputs_in_original_pixels(tmp_path):
    src, out = tmp_path / "images", tmp_path / "out"
    _write_images(src)
    results = _predict(src, out)
    saved = json.loads((out / "detections.json").read_text())
    assert saved == results
    assert [r["file"] for r in saved] == sorted(rel for rel, _, _ in IMAGES)
    truth = {rel: (hw, rect) for rel, hw, rect in IMAGES}
    for r in saved:
        (h, w), rect = truth[r["file"]]
        assert (r["height"], r["width"]) == (h, w)
        assert r["classes"] == ["thing"] and r["labels"] == [0] and r["scores"][0] > 0.99
        # one input pixel is up to 1 / 0.533 original pixels; a missing letterbox inverse is off by far more
        assert np.abs(np.array(r["boxes"][0]) - np.array(rect)).max() <= 2.5
        vis = Image.open(out / r["vis"])
        assert vis.size == (w, h)
        mask = Image.open(out / r["mask"])
        assert mask.mode == "P" and mask.size == (w, h)
        m = np.array(mask)
        assert set(np.unique(m)) == {0, 1}
        gt = np.zeros((h, w), bool)
        gt[rect[1]:rect[3], rect[0]:rect[2]] = True
        assert (gt & (m == 1)).sum() / (gt | (m == 1)).sum() > 0.85
    assert len(list((out / "vis").rglob("*.png"))) == len(IMAGES)


def test_predict_folder_bad_image(tmp_path):
    src, out = tmp_path / "images", tmp_path / "out"
    _write_images(src)
    (src / "sub" / "broken.jpg").write_bytes(b"this is no jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        _predict(src, out)
    with pytest.warns(UserWarning, match="broken.jpg"):
        results = _predict(src, out, skip_bad=True)
    assert len(results) == len(IMAGES)


def test_predict_folder_input_errors(tmp_path):
    with pytest.raises(DataError, match="missing"):
        _predict(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no jpg"):
        _predict(tmp_path / "empty", tmp_path / "out")
    src = tmp_path / "images"
    _write_images(src)
    with pytest.raises(ConfigError, match="classes"):
        predict_folder(ThresholdModel(nc=3), src, tmp_path / "out", CLASSES, IMGSZ, [0, 0, 0], [1, 1, 1])


def test_predict_one_image_file(tmp_path):
    src = tmp_path / "images"
    _write_images(src)
    rel, (h, w), rect = IMAGES[1]
    results = _predict(src / rel, tmp_path / "out")
    assert [r["file"] for r in results] == ["b.bmp"] and (results[0]["height"], results[0]["width"]) == (h, w)
    assert np.abs(np.array(results[0]["boxes"][0]) - np.array(rect)).max() <= 2.5
    assert json.loads((tmp_path / "out" / "detections.json").read_text()) == results
    assert (tmp_path / "out" / "vis" / "b.png").is_file()
    hostname = tmp_path / "hostname"  # a file named explicitly is read whatever its suffix
    hostname.write_text("buildhost\n")
    with pytest.raises(DataError, match=f"^{hostname}: not a readable image"):
        _predict(hostname, tmp_path / "out2")


def _multitask_checkpoint(tmp_path, imgsz=64):
    """A random student_small checkpoint and the config YAML it was "trained" with."""
    import yaml

    from mtkd import checkpoint as ckpt_io
    from mtkd.engine.config import build_config
    from mtkd.models import build_model

    user = {"task": "multitask", "model": {"preset": "student_small"}, "data": {"imgsz": imgsz},
            "train": {"device": "cpu"}, "eval": {"predict_conf": 0.0}}
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(user))
    ckpt = tmp_path / "best.pt"
    ckpt_io.save_atomic({"format": ckpt_io.FORMAT, "task": "multitask", "classes": CLASSES,
                         "config": build_config(user), "model": build_model({"preset": "student_small"},
                                                                             len(CLASSES)).state_dict()}, ckpt)
    return cfg_path, ckpt


def test_cli_predict_accepts_an_image_file_and_a_folder(tmp_path, capsys):
    from mtkd.cli import main

    cfg, ckpt = _multitask_checkpoint(tmp_path)
    src = tmp_path / "images"
    _write_images(src)
    assert main(["predict", str(cfg), "--ckpt", str(ckpt), "--source", str(src / "a.png"),
                 "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "detections.json").read_text())
    assert [r["file"] for r in one] == ["a.png"] and one[0]["mask"] == "masks/a.png"
    assert main(["predict", str(cfg), "--ckpt", str(ckpt), "--source", str(src),
                 "--out", str(tmp_path / "all")]) == 0
    every = json.loads((tmp_path / "all" / "detections.json").read_text())
    assert [r["file"] for r in every] == sorted(rel for rel, _, _ in IMAGES)
    assert every[0] == one[0]  # the same image, predicted alone or in its folder
    capsys.readouterr()
    assert main(["predict", str(cfg), "--ckpt", str(ckpt), "--source", str(tmp_path / "nope.jpg"),
                 "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path / 'nope.jpg'}: source not found "
                                               "(give an image file or a folder of images)")


def test_cli_predict_honours_skip_bad(tmp_path, capsys):
    from mtkd.cli import main

    cfg, ckpt = _multitask_checkpoint(tmp_path)
    src = tmp_path / "images"
    _write_images(src)
    broken = src / "sub" / "broken.jpg"
    broken.write_bytes(b"this is no jpeg")
    capsys.readouterr()
    assert main(["predict", str(cfg), "--ckpt", str(ckpt), "--source", str(src), "--out", str(tmp_path / "p")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {broken}: not a readable image (not a file format PIL reads)"
    assert not (tmp_path / "p" / "detections.json").exists()
    with pytest.warns(UserWarning, match=f"skipping bad image: {broken}"):
        code = main(["predict", str(cfg), "data.skip_bad=true", "--ckpt", str(ckpt), "--source", str(src),
                     "--out", str(tmp_path / "p")])
    assert code == 0
    saved = json.loads((tmp_path / "p" / "detections.json").read_text())
    assert [r["file"] for r in saved] == sorted(rel for rel, _, _ in IMAGES)


def test_draw_predictions():
    image = np.full((40, 60, 3), 100, np.uint8)
    mask = np.zeros((40, 60), np.uint8)
    mask[20:, :] = 2  # class 1
    mask[:, :5] = 255  # void: untouched
    drawn = draw_predictions(image, np.array([[10, 5, 30, 15]]), np.array([0]), np.array([0.87]), mask, CLASSES)
    assert drawn.dtype == np.uint8 and drawn.shape == image.shape
    assert (image == 100).all()  # the input is not modified
    expected = np.round(0.5 * 100 + 0.5 * np.array(class_color(1)))
    assert np.array_equal(drawn[35, 40], expected)
    assert np.array_equal(drawn[35, 2], [100, 100, 100])  # void pixel
    assert tuple(drawn[15, 20]) == class_color(0)  # bottom edge of the box outline
    plain = draw_predictions(image, np.zeros((0, 4)), [], None, None, CLASSES)
    assert np.array_equal(plain, image)


def test_plot_loss_curves(tmp_path):
    csv_path = tmp_path / "log.csv"
    csv_path.write_text("epoch,loss/det,val/miou,time\n0,2.5,,12:00\n1,1.9,0.3,12:01\n2,1.2,0.4,12:02\n")
    png = plot_loss_curves(csv_path, tmp_path / "plots" / "curves.png")
    with Image.open(png) as im:
        assert im.size[0] > im.size[1]  # two subplots side by side ('time' is not numeric)
    bad = tmp_path / "bad.csv"
    bad.write_text("step,loss\n0,1.0\n")
    with pytest.raises(DataError, match="bad.csv"):
        plot_loss_curves(bad, tmp_path / "x.png")


def test_predict_folder_applies_exif_orientation(tmp_path):
    # stored 40x100 (h x w) with orientation 6 ("turn 90 degrees clockwise"): upright 100x40
    src, out = tmp_path / "images", tmp_path / "out"
    src.mkdir()
    pixels = np.zeros((40, 100, 3), np.uint8)
    pixels[8:30, 20:70] = 255  # rows 8..30, columns 20..70 as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(src / "r.jpg", exif=exif.tobytes(), quality=95)
    (r,) = _predict(src, out)
    assert (r["height"], r["width"]) == (100, 40)
    # clockwise turn: stored (x, y) -> upright (40 - y, x)
    assert np.abs(np.array(r["boxes"][0]) - np.array([40 - 30, 20, 40 - 8, 70])).max() <= 3
    assert Image.open(out / r["vis"]).size == (40, 100)


def test_predict_folder_write_failures_name_the_file(tmp_path, monkeypatch):
    import errno
    import os
    from pathlib import Path

    src, out = tmp_path / "images", tmp_path / "out"
    _write_images(src)

    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(MtkdError) as err:
        _predict(src, out)
    assert str(err.value) == f"{out / 'vis' / 'a.png'}: cannot write: No space left on device"
    assert err.value.__suppress_context__
    monkeypatch.undo()
    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(MtkdError, match=r"detections\.json: cannot write: No space left on device"):
        _predict(src, out)


def test_predict_batch_maps_back_only_the_images_with_a_size():
    transform = build_transforms({"imgsz": IMGSZ, "mean": [0, 0, 0], "std": [1, 1, 1]}, train=False)
    _, (h, w), (x1, y1, x2, y2) = IMAGES[0]
    image = np.zeros((h, w, 3), np.uint8)
    image[y1:y2, x1:x2] = 255
    item = eval_item(image, transform)
    model = ThresholdModel()
    pred, = predict_batch(model, item["image"][None], [item["letterbox"]], [(h, w)], 0.25, 0.6, 10)
    np.testing.assert_allclose(pred.boxes.numpy(), [[x1, y1, x2, y2]], atol=1.0)
    assert pred.labels.tolist() == [0] and pred.scores.shape == (1,)
    assert pred.seg_logits().shape == (3, h, w)
    mask = pred.mask()
    assert mask.shape == (h, w) and torch.equal(mask, pred.seg_logits().argmax(0))
    assert (mask[y1 + 1:y2 - 1, x1 + 1:x2 - 1] == 1).all() and mask[0, 0] == 0
    assert predict_batch(model, item["image"][None], [item["letterbox"]], [None], 0.25, 0.6, 10) == [None]
    with pytest.raises(ConfigError, match="3 names were given"):
        predict_batch(model, item["image"][None], [item["letterbox"]], [(h, w)], 0.25, 0.6, 10,
                      classes=["a", "b", "c"])
