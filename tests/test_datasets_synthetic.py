"""The synthetic generator writes one set in three layouts that the loaders read identically."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from mtkd.datasets import SYNTHETIC_CLASSES, COCODataset, VOCDataset, YOLODataset, build_dataset, collate, make_synthetic
from mtkd.errors import ConfigError


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    roots = make_synthetic(out, n_train=12, n_val=3, imgsz=(64, 96), seed=0, seg_missing=0.25, det_missing=0.25)
    return out, roots


def test_layouts_and_class_names(synth):
    out, roots = synth
    assert roots == {"voc": out / "voc", "coco": out / "coco", "yolo": out / "yolo" / "data.yaml"}
    assert len(SYNTHETIC_CLASSES) == 12
    assert (roots["voc"] / "classes.txt").read_text().split() == SYNTHETIC_CLASSES
    data = yaml.safe_load(roots["yolo"].read_text())
    assert data["names"] == SYNTHETIC_CLASSES and data["path"] == str(out / "yolo")
    assert not (roots["yolo"].parent / "images" / "test").exists()  # n_test=0 -> no split


def test_loaders_agree_on_every_image(synth):
    _, roots = synth
    for split in ("train", "val"):
        voc, coco, yolo = VOCDataset(roots["voc"], split), COCODataset(roots["coco"], split), YOLODataset(roots["yolo"], split)
        assert voc.classes == coco.classes == yolo.classes == SYNTHETIC_CLASSES
        assert len(voc) == len(coco) == len(yolo)
        by_id = [{r.id: i for i, r in enumerate(ds.records)} for ds in (coco, yolo)]
        for i in range(len(voc)):
            a = voc.load_sample(i)
            others = [ds.load_sample(m[a.id]) for ds, m in zip((coco, yolo), by_id)]
            for b in others:
                assert np.array_equal(a.image, b.image)
                assert (a.has_det, a.has_seg) == (b.has_det, b.has_seg)
                if a.has_det:
                    assert a.labels.tolist() == b.labels.tolist()
                    np.testing.assert_allclose(a.boxes, b.boxes, atol=1.0)
                if a.has_seg:
                    np.testing.assert_array_equal(a.mask, b.mask)


def test_partial_labels_and_content(synth):
    _, roots = synth
    ds = VOCDataset(roots["voc"], "train")
    flags = [(r.has_det, r.has_seg) for r in ds.records]
    assert flags.count((False, True)) == 3 and flags.count((True, False)) == 3 and (False, False) not in flags
    assert all(r.has_det and r.has_seg for r in VOCDataset(roots["voc"], "val").records)
    for i in range(len(ds)):
        s = ds.load_sample(i)
        h, w = s.size
        assert 64 <= h <= 96 and 64 <= w <= 96
        if s.has_det:
            assert 2 <= len(s.boxes) <= 8
            assert (s.boxes[:, 2:] - s.boxes[:, :2]).min() >= 4
        if s.has_seg and s.has_det:
            assert set(np.unique(s.mask)) - {0} <= set((s.labels + 1).tolist())
    data = json.loads((roots["coco"] / "annotations" / "instances_train.json").read_text())
    kinds = {type(a["segmentation"]).__name__ + (type(a["segmentation"]["counts"]).__name__
             if isinstance(a["segmentation"], dict) else "") for a in data["annotations"] if "segmentation" in a}
    assert kinds == {"list", "dictstr", "dictlist"}


def test_deterministic_for_a_seed(synth, tmp_path):
    out, _ = synth
    again = make_synthetic(tmp_path / "a", n_train=12, n_val=3, imgsz=(64, 96), seed=0, seg_missing=0.25,
                           det_missing=0.25, formats=("voc",))
    assert set(again) == {"voc"}
    for name in ("JPEGImages/train_00004.jpg", "SegmentationClass/val_00001.png", "ImageSets/Main/train.txt"):
        assert (again["voc"] / name).read_bytes() == (out / "voc" / name).read_bytes()
    other = make_synthetic(tmp_path / "b", n_train=1, n_val=0, imgsz=(64, 96), seed=1, formats=("voc",))
    assert (other["voc"] / "JPEGImages/train_00000.jpg").read_bytes() != (out / "voc/JPEGImages/train_00000.jpg").read_bytes()


def test_build_dataset_on_synthetic_batches(synth):
    _, roots = synth
    cfg = {"format": "yolo", "root": str(roots["yolo"]), "imgsz": 64}
    ds = build_dataset(cfg, "train", train=True, seed=0)
    batch = collate([ds[i] for i in range(4)])
    assert batch["images"].shape == (4, 3, 64, 64)
    assert batch["has_det"].dtype == batch["has_seg"].dtype


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="formats"):
        make_synthetic(tmp_path, formats=("kitti",))
    with pytest.raises(ConfigError, match="seg_missing"):
        make_synthetic(tmp_path, seg_missing=0.7, det_missing=0.6)


def test_generator_options_class_subset_object_count_and_sizes(tmp_path):
    names = ["square_solid", "circle_stripes"]
    roots = make_synthetic(tmp_path, n_train=10, n_val=0, imgsz=(64, 64), formats=("voc", "yolo"),
                           classes=names, objects=(1, 2), min_size=16, max_size=0.5, clutter=0.0)
    assert (roots["voc"] / "classes.txt").read_text().split() == names
    ds = VOCDataset(roots["voc"], "train")
    assert ds.classes == names
    for i in range(len(ds)):
        s = ds.load_sample(i)
        assert s.size == (64, 64) and 1 <= len(s.boxes) <= 2
        assert set(s.labels.tolist()) <= {0, 1}
        assert set(np.unique(s.mask).tolist()) <= {0, 1, 2}
        # diameters from 16 px to half the side; a rotated square's box reaches 1.25x its diameter
        assert (s.boxes[:, 2:] - s.boxes[:, :2]).max() <= 1.25 * 0.5 * 64 + 1
        assert (s.boxes[:, 2:] - s.boxes[:, :2]).max(1).min() >= 0.6 * 16
    assert YOLODataset(roots["yolo"], "train").classes == names


def test_clutter_changes_only_the_background(tmp_path):
    a = make_synthetic(tmp_path / "a", n_train=3, n_val=0, imgsz=(64, 64), formats=("voc",), clutter=1.0)["voc"]
    b = make_synthetic(tmp_path / "b", n_train=3, n_val=0, imgsz=(64, 64), formats=("voc",), clutter=0.0)["voc"]
    for i in range(3):
        name = f"train_{i:05d}"
        # same objects and masks (the random draws do not depend on clutter), other pixels
        assert (a / "SegmentationClass" / f"{name}.png").read_bytes() == (b / "SegmentationClass" / f"{name}.png").read_bytes()
        assert (a / "Annotations" / f"{name}.xml").read_bytes() == (b / "Annotations" / f"{name}.xml").read_bytes()
    assert any((a / "JPEGImages" / f"train_{i:05d}.jpg").read_bytes() != (b / "JPEGImages" / f"train_{i:05d}.jpg").read_bytes()
               for i in range(3))


@pytest.mark.parametrize("kwargs, key", [({"classes": ["circle_solid", "hexagon"]}, "classes"),
                                         ({"classes": []}, "classes"),
                                         ({"objects": (3, 2)}, "objects"),
                                         ({"min_size": 40, "imgsz": (64, 64)}, "min_size"),
                                         ({"clutter": 1.5}, "clutter")])
def test_bad_generator_options(tmp_path, kwargs, key):
    with pytest.raises(ConfigError, match=key):
        make_synthetic(tmp_path, n_train=1, n_val=0, formats=("voc",), **kwargs)


def test_make_synthetic_cli_testbed_with_an_explicit_override(tmp_path):
    from mtkd.cli import main
    from mtkd.datasets.synthetic import TESTBEDS

    out = tmp_path / "small"
    assert main(["make-synthetic", "--out", str(out), "--testbed", "small", "--n-train", "4", "--n-val", "2",
                 "--n-test", "0", "--formats", "voc"]) == 0
    assert not (out / "coco").exists() and len(list((out / "voc" / "JPEGImages").glob("*.jpg"))) == 6
    n_classes = len(TESTBEDS["small"].get("classes") or SYNTHETIC_CLASSES)
    assert len((out / "voc" / "classes.txt").read_text().split()) == n_classes
    ds = VOCDataset(out / "voc", "train")
    assert all(ds.load_sample(i).size == (64, 64) for i in range(len(ds)))
