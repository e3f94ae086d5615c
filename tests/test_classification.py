"""Classification distillation: data, labels files, synthetic folders, classifiers, predict, task."""
import copy
import re

import numpy as np
import pytest
import torch
from PIL import Image

from mtkd.errors import ConfigError, DataError, MtkdError
from mtkd.losses import build_loss
from mtkd.tasks.classify import (ImageFolderDataset, build_classifier, build_transform, collate,
                                 compute_mean_std, load_weights, make_synthetic_imagefolder,
                                 parse_labels_file, predict_folder)
from mtkd.tasks.classify.task import ClassifyTask

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_imagefolder(tmp_path_factory.mktemp("cls") / "data", n_classes=3, n_per_class=4,
                                      imgsz=32, seed=3)


# -- labels files ---------------------------------------------------------------------
def test_labels_file_parsing(tmp_path):
    f = tmp_path / "labels.txt"
    f.write_text("1 golden retriever\n\n0 cat\n")
    assert parse_labels_file(f) == ["cat", "golden retriever"]


@pytest.mark.parametrize("text, match", [
    ("0 cat\n1\n", r"labels.txt:2: expected 'index name'"),
    ("0 cat\nx dog\n", r"labels.txt:2: index 'x' is not an integer"),
    ("0 cat\n0 dog\n", r"labels.txt:2: index 0 given twice"),
    ("0 cat\n2 dog\n", r"labels.txt: indices must be 0..1; missing \[1\]"),
    ("\n\n", r"labels.txt: labels file has no entries"),
])
def test_labels_file_errors_name_file_and_line(tmp_path, text, match):
    f = tmp_path / "labels.txt"
    f.write_text(text)
    with pytest.raises(DataError, match=match):
        parse_labels_file(f)


# -- synthetic ImageFolder ----------------------------------------------------------------
def test_synthetic_layout_and_determinism(synth, tmp_path):
    classes = ["class00", "class01", "class02"]
    for split, count in (("train", 4), ("val", 1)):
        assert sorted(p.name for p in (synth / split).iterdir()) == classes
        for c in classes:
            files = sorted((synth / split / c).glob("*.png"))
            assert len(files) == count
            assert Image.open(files[0]).size == (32, 32) and Image.open(files[0]).mode == "RGB"
    assert parse_labels_file(synth / "labels.txt") == classes
    again = make_synthetic_imagefolder(tmp_path / "again", n_classes=3, n_per_class=4, imgsz=32, seed=3)
    a = np.asarray(Image.open(synth / "train/class01/class01_0002.png"))
    b = np.asarray(Image.open(again / "train/class01/class01_0002.png"))
    assert np.array_equal(a, b)


def test_synthetic_colour_is_not_the_class(tmp_path):
    root = make_synthetic_imagefolder(tmp_path / "d", n_classes=2, n_per_class=24, imgsz=24, seed=0)
    means = {c: np.mean([np.asarray(Image.open(p)).reshape(-1, 3).mean(0)
                         for p in (root / "train" / c).glob("*.png")], axis=0) for c in ("class00", "class01")}
    spread = np.std([np.asarray(Image.open(p)).reshape(-1, 3).mean(0)
                     for p in (root / "train" / "class00").glob("*.png")], axis=0)
    # the class-mean colours differ by much less than the colour spread inside a class
    assert np.all(np.abs(means["class00"] - means["class01"]) < spread)


# -- dataset -------------------------------------------------------------------------------
def test_dataset_items_and_collate(synth):
    ds = ImageFolderDataset(synth / "train", ["class00", "class01", "class02"], build_transform(32, MEAN, STD))
    assert len(ds) == 12 and ds.targets == [0] * 4 + [1] * 4 + [2] * 4
    batch = collate([ds[0], ds[5]])
    assert batch["images"].shape == (2, 3, 32, 32) and batch["images"].dtype == torch.float32
    assert batch["labels"].tolist() == [0, 1] and batch["labels"].dtype == torch.int64
    assert batch["index"].tolist() == [0, 5] and batch["ids"][1] == "class01/class01_0001.png"
    raw = np.asarray(Image.open(synth / "train/class00/class00_0000.png"), dtype=np.float32) / 255
    expected = (torch.from_numpy(raw).permute(2, 0, 1) - 0.5) / 0.25
    assert torch.allclose(ds[0]["image"], expected, atol=1e-5)


def test_dataset_errors(synth, tmp_path):
    root = tmp_path / "bad"
    (root / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "train" / "a" / "ok.png")
    (root / "train" / "a" / "broken.png").write_bytes(b"not a png")
    ds = ImageFolderDataset(root / "train", ["a"], build_transform(8, MEAN, STD))
    with pytest.raises(DataError, match=r"broken\.png: not a readable image"):
        [ds[i] for i in range(len(ds))]
    with pytest.warns(RuntimeWarning, match="broken.png"):
        assert len(ImageFolderDataset(root / "train", ["a"], build_transform(8, MEAN, STD), skip_bad=True)) == 1
    with pytest.raises(DataError, match="class 'a' is not among the training classes"):
        ImageFolderDataset(root / "train", ["b"], build_transform(8, MEAN, STD))
    with pytest.raises(DataError, match="image folder not found"):
        ImageFolderDataset(root / "val", ["a"], build_transform(8, MEAN, STD))
    with pytest.raises(ConfigError, match="data.augment.rotate"):
        build_transform(8, MEAN, STD, {"rotate": 10})


def test_mean_std_from_training_images(tmp_path):
    (tmp_path / "t" / "a").mkdir(parents=True)
    pixels = [np.full((4, 4, 3), v, dtype=np.uint8) for v in (0, 255)]
    pixels[1][..., 2] = 51
    for i, px in enumerate(pixels):
        Image.fromarray(px).save(tmp_path / "t" / "a" / f"{i}.png")
    mean, std = compute_mean_std(tmp_path / "t", 4)
    allpx = np.concatenate([p.reshape(-1, 3) for p in pixels]).astype(np.float64) / 255
    assert np.allclose(mean, allpx.mean(0)) and np.allclose(std, allpx.std(0))


# -- classifiers --------------------------------------------------------------------------------
def _check_output(out, b, nc):
    assert set(out) == {"logits", "embed", "feats"}
    assert out["logits"].shape == (b, nc) and out["embed"].shape[0] == b and out["embed"].dim() == 2
    assert list(out["feats"]) == ["f1", "f2", "f3", "f4"]
    for f in out["feats"].values():
        assert f.dim() == 4 and f.shape[0] == b


def test_student_output_dict():
    m = build_classifier("cnn4", 3)
    out = m(torch.randn(2, 3, 32, 32))
    _check_output(out, 2, 3)
    assert out["embed"].shape == (2, 256)
    assert [tuple(f.shape[1:]) for f in out["feats"].values()] == [(32, 16, 16), (64, 8, 8), (128, 4, 4), (256, 4, 4)]
    assert torch.allclose(out["embed"], out["feats"]["f4"].mean((2, 3)))


def test_cnn8_teacher_matches_student_strides_and_is_bigger():
    def count_params(m):
        return sum(p.numel() for p in m.parameters())

    s, t = build_classifier("cnn4", 3), build_classifier("cnn8", 3)
    out_s, out_t = s(torch.randn(2, 3, 32, 32)), t(torch.randn(2, 3, 32, 32))
    _check_output(out_t, 2, 3)
    # same map sizes under the same names, twice the channels
    for k in ("f1", "f2", "f3", "f4"):
        assert out_t["feats"][k].shape[-2:] == out_s["feats"][k].shape[-2:]
        assert out_t["feats"][k].shape[1] == 2 * out_s["feats"][k].shape[1]
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in t.modules())
    assert n_convs == 8
    assert count_params(t) > 8 * count_params(s)
    with pytest.raises(ConfigError, match="cnn8"):
        build_classifier("cnn8", 3, bogus=1)
    with pytest.raises(ConfigError, match="depth"):
        build_classifier("cnn4", 3, depth=0)


@pytest.mark.parametrize("name", ["resnet18", "timm/resnet18"])
def test_teacher_output_dict_and_deepcopy(name):
    m = build_classifier(name, 4).eval()
    x = torch.randn(2, 3, 64, 64)
    out = m(x)
    _check_output(out, 2, 4)
    assert [f.shape[-1] for f in out["feats"].values()] == [16, 8, 4, 2]  # strides 4, 8, 16, 32
    assert out["embed"].shape == (2, 512)
    assert torch.allclose(out["logits"], m.model.fc(out["embed"]), atol=1e-5)
    twin = copy.deepcopy(m)  # the EMA's copy must own its hooks' store
    out2 = twin(x)
    assert torch.allclose(out2["feats"]["f3"], out["feats"]["f3"]) and not m._store


def test_load_weights_variants(tmp_path):
    from torchvision import models as tvm

    raw = tvm.resnet18(num_classes=3)  # a seed-style torchvision state dict, no wrapper prefix
    torch.save({f"module.{k}": v for k, v in raw.state_dict().items()}, tmp_path / "dp.pth")
    m = load_weights(build_classifier("resnet18", 3), tmp_path / "dp.pth")
    assert torch.equal(m.model.fc.weight, raw.fc.weight)
    torch.save(raw, tmp_path / "pickled.pt")
    with pytest.raises(MtkdError, match="pickled.pt.*trust_pickle"):
        load_weights(build_classifier("resnet18", 3), tmp_path / "pickled.pt")
    m = load_weights(build_classifier("resnet18", 3), tmp_path / "pickled.pt", trust_pickle=True)
    assert torch.equal(m.model.conv1.weight, raw.conv1.weight)
    with pytest.raises(MtkdError, match="dp.pth: weights do not fit"):
        load_weights(build_classifier("resnet18", 5), tmp_path / "dp.pth")
    with pytest.raises(ConfigError, match="not a torchvision classification model"):
        build_classifier("torchvision/not_a_model", 3)


def test_zoo_losses_on_classifier_outputs():
    s, t = build_classifier("cnn4", 3), build_classifier("timm/resnet18", 3).eval()
    x = torch.randn(4, 3, 32, 32)
    s_out = s(x)
    with torch.no_grad():
        t_out = t(x)
    batch = {"labels": torch.tensor([0, 1, 2, 0])}
    for name, kw in [("ce", {}), ("st", {"T": 4.0}), ("at", {}), ("fitnet", {"feats": ["f4"]}), ("rkd", {}),
                     ("pkt", {})]:
        loss = build_loss(name, **kw)
        value = loss(s_out, t_out if name != "ce" else None, batch)
        assert torch.isfinite(value), name
    ce = build_loss("ce")(s_out, None, batch)
    assert ce.item() == pytest.approx(torch.nn.functional.cross_entropy(s_out["logits"], batch["labels"]).item())


# -- predict ------------------------------------------------------------------------------------
def test_predict_folder_lines(synth, tmp_path):
    model = build_classifier("cnn4", 3)
    lines = predict_folder(model, synth / "val", synth / "labels.txt", 32, MEAN, STD)
    assert len(lines) == 3
    for line, c in zip(lines, ["class00", "class01", "class02"]):
        file, cls, prob = line.split(" ")
        assert file.startswith(f"{c}/") and cls in {"class00", "class01", "class02"}
        assert re.fullmatch(r"\d\.\d{4}", prob) and 1 / 3 - 1e-3 <= float(prob) <= 1
    same = predict_folder(model, synth / "val", ["class00", "class01", "class02"], 32, MEAN, STD)
    assert same == lines
    with pytest.raises(MtkdError, match="3 classes but 2 class names"):
        predict_folder(model, synth / "val", ["a", "b"], 32, MEAN, STD)
    with pytest.raises(DataError, match="no images found"):
        predict_folder(model, tmp_path, ["a", "b", "c"], 32, MEAN, STD)


# -- task --------------------------------------------------------------------------------------------
def _cfg(root, **data):
    from mtkd.engine.config import build_config

    return build_config({"task": "classify", "data": {"format": "imagefolder", "root": str(root), "imgsz": 32,
                                                       "mean": None, "std": None, **data}})


def test_task_datasets_and_evaluate(synth):
    task = ClassifyTask()
    cfg = _cfg(synth)
    train = task.build_dataset(cfg, "train", True)
    test = task.build_dataset(cfg, "test", False)  # no test folder: val stands in
    assert train.classes == ["class00", "class01", "class02"] and len(test) == 3
    assert len(cfg["data"]["mean"]) == 3 and all(s > 0 for s in cfg["data"]["std"])  # written back
    model = task.build_model(cfg, 3)
    loader = torch.utils.data.DataLoader(test, batch_size=2, collate_fn=task.collate)
    metrics = task.evaluate(model, loader, test, cfg, torch.device("cpu"), False)
    assert set(metrics) == {"top1", "top5", "loss"} and metrics["top5"] == 100.0  # 3 classes: top-3
    assert 0 <= metrics["top1"] <= 100 and task.fitness(metrics) == metrics["top1"]
    with pytest.raises(ConfigError, match="data.format"):
        task.build_dataset(_cfg(synth, format="voc"), "train", True)


def test_task_teacher_from_checkpoint(synth, tmp_path):
    task = ClassifyTask()
    teacher = build_classifier("timm/resnet18", 3)
    torch.save({"model": teacher.state_dict()}, tmp_path / "t.pt")
    cfg = _cfg(synth)
    assert task.build_teacher(cfg, 3) is None
    cfg["teacher"].update(ckpt=str(tmp_path / "t.pt"), model={"name": "timm/resnet18"})
    loaded = task.build_teacher(cfg, 3)
    assert torch.equal(loaded.model.fc.weight, teacher.model.fc.weight)


def test_cnn4w_is_the_student_layout_at_twice_the_width():
    s, t = build_classifier("cnn4", 3), build_classifier("cnn4w", 3)
    out_s, out_t = s(torch.randn(2, 3, 16, 16)), t(torch.randn(2, 3, 16, 16))
    _check_output(out_t, 2, 3)
    for k in ("f1", "f2", "f3", "f4"):
        assert out_t["feats"][k].shape[-2:] == out_s["feats"][k].shape[-2:]
        assert out_t["feats"][k].shape[1] == 2 * out_s["feats"][k].shape[1]
    assert sum(isinstance(m, torch.nn.Conv2d) for m in t.modules()) == 4


def test_topk_counts_hits_within_k_and_the_mean_cross_entropy():
    from mtkd.tasks.classify.metrics import TopK

    metric = TopK(num_classes=6)  # k = 5: the last-ranked class is a top-5 miss
    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0], [0.0, 1, 2, 3, 4, 5], [0.0, 1, 2, 3, 5, 4]])
    labels = torch.tensor([5, 5, 5])
    metric.update(logits, labels)
    got = metric.compute()
    assert got["top1"] == pytest.approx(100 / 3)
    assert got["top5"] == pytest.approx(200 / 3)
    assert got["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)))
