"""VOC, COCO and YOLO loaders on tiny hand-written trees with known answers."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from pycocotools import mask as mask_utils

from mtkd.datasets import COCODataset, VOCDataset, YOLODataset, build_dataset
from mtkd.structures import VOID

H, W = 30, 40


def write_image(path: Path, h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(img).save(path)  # PNG/JPEG by suffix; JPEG is lossy, compare with tolerance
    return img


def write_palette_png(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    im.save(path)


def voc_xml(objects, w: int = W, h: int = H) -> str:
    objs = "".join(
        f"<object><name>{name}</name><difficult>{int(d)}</difficult><bndbox>"
        f"<xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for name, b, d in objects
    )
    return f"<annotation><size><width>{w}</width><height>{h}</height><depth>3</depth></size>{objs}</annotation>"


def voc_mask_a() -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    mask[2:12, 1:10] = 2  # dog = class 1
    mask[4:30, 20:40] = 1  # cat = class 0
    mask[0, :] = VOID
    return mask


def write_voc(root: Path) -> Path:
    """ids a (det+seg), b (det only), c (seg only); classes by name: cat=0, dog=1."""
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "Annotations").mkdir()
    for k, img_id in enumerate("abc"):
        write_image(root / "JPEGImages" / f"{img_id}.jpg", seed=k)
    (root / "Annotations" / "a.xml").write_text(
        voc_xml([("dog", (2, 3, 10, 12), False), ("cat", (20.5, 5, 40, 30), True)])
    )
    (root / "Annotations" / "b.xml").write_text(voc_xml([("dog", (1, 1, 40, 30), False)]))
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nb\n")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("c\na\n")
    write_palette_png(root / "SegmentationClass" / "a.png", voc_mask_a())
    write_palette_png(root / "SegmentationClass" / "c.png", np.zeros((H, W), np.uint8))
    return root


def test_voc_parses_boxes_flags_and_masks(tmp_path):
    ds = VOCDataset(write_voc(tmp_path / "voc"), "train")
    assert ds.classes == ["cat", "dog"] and ds.seg_classes == ["background", "cat", "dog"]
    assert [r.id for r in ds.records] == ["a", "b", "c"]
    a, b, c = (ds.load_sample(i) for i in range(3))
    # 1-based inclusive -> 0-based edges: xmin-1, ymin-1, xmax, ymax; float kept
    np.testing.assert_allclose(a.boxes, [[1, 2, 10, 12], [19.5, 4, 40, 30]])
    assert a.labels.tolist() == [1, 0]
    assert a.difficult.tolist() == [False, True]
    assert a.has_det and a.has_seg and a.index == 0
    np.testing.assert_array_equal(a.mask, voc_mask_a())
    assert b.has_det and not b.has_seg and b.mask is None
    assert not c.has_det and c.has_seg and len(c.boxes) == 0
    assert (c.mask == 0).all()
    assert a.image.shape == (H, W, 3) and a.image.dtype == np.uint8


def test_voc_classes_txt_and_configured_classes(tmp_path):
    root = write_voc(tmp_path / "voc")
    assert VOCDataset(root, "train", classes=["dog", "cat"]).load_sample(0).labels.tolist() == [0, 1]
    (root / "classes.txt").write_text("dog\ncat\nbird\n")
    ds = VOCDataset(root, "train")
    assert ds.classes == ["dog", "cat", "bird"]
    assert ds.load_sample(0).labels.tolist() == [0, 1]


def test_voc_coco_gt_marks_difficult_as_crowd(tmp_path):
    gt = VOCDataset(write_voc(tmp_path / "voc"), "train").coco_gt()
    assert [im["id"] for im in gt["images"]] == [0, 1]  # c has no detection labels
    assert gt["images"][0]["width"] == W and gt["images"][0]["height"] == H
    anns = [a for a in gt["annotations"] if a["image_id"] == 0]
    assert [a["category_id"] for a in anns] == [2, 1]
    assert [a["iscrowd"] for a in anns] == [0, 1]
    np.testing.assert_allclose(anns[0]["bbox"], [1, 2, 9, 10])
    assert anns[0]["area"] == pytest.approx(90)
    assert [c["name"] for c in gt["categories"]] == ["cat", "dog"]


def _square(x1, y1, x2, y2):
    return [[x1, y1, x2, y1, x2, y2, x1, y2]]


def write_coco(root: Path) -> Path:
    """Two images; categories 7=zebra, 3=ant (sorted ids -> ant=0, zebra=1)."""
    write_image(root / "images" / "train" / "i.jpg", seed=0)
    write_image(root / "images" / "train" / "j.jpg", seed=1)
    rle_block = np.zeros((H, W), np.uint8)
    rle_block[22:28, 22:29] = 1
    compressed = mask_utils.encode(np.asfortranarray(rle_block))
    crowd = np.zeros((H, W), np.uint8)
    crowd[:, 32:36] = 1
    flat = crowd.reshape(-1, order="F")
    runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[-1], flat, [-1]])))).tolist()
    uncompressed = {"size": [H, W], "counts": ([0] if flat[0] else []) + runs}
    anns = [
        # small ant listed first: area ordering must still keep it on top of the zebra
        {"id": 1, "image_id": 10, "category_id": 3, "bbox": [5, 5, 5, 5], "segmentation": _square(5, 5, 10, 10)},
        {"id": 2, "image_id": 10, "category_id": 7, "bbox": [0, 0, 20, 20], "segmentation": _square(0, 0, 20, 20)},
        {"id": 3, "image_id": 10, "category_id": 3, "bbox": [22, 22, 7, 6],
         "segmentation": {"size": [H, W], "counts": compressed["counts"].decode("ascii")}},
        {"id": 4, "image_id": 10, "category_id": 7, "bbox": [32, 0, 4, 30], "iscrowd": 1, "segmentation": uncompressed},
        {"id": 5, "image_id": 11, "category_id": 7, "bbox": [1.5, 2, 10, 8]},  # no segmentation
    ]
    data = {
        "images": [
            {"id": 11, "file_name": "j.jpg", "height": H, "width": W},
            {"id": 10, "file_name": "i.jpg", "height": H, "width": W},
        ],
        "annotations": anns,
        "categories": [{"id": 7, "name": "zebra"}, {"id": 3, "name": "ant"}],
    }
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_train.json").write_text(json.dumps(data))
    return root


def test_coco_masks_crowd_and_category_mapping(tmp_path):
    ds = COCODataset(write_coco(tmp_path / "coco"), "train")
    assert ds.classes == ["ant", "zebra"]
    assert [r.id for r in ds.records] == ["i", "j"]  # sorted by image id
    i, j = ds.load_sample(0), ds.load_sample(1)
    # crowd (ann 4) excluded from the detection targets
    np.testing.assert_allclose(i.boxes, [[5, 5, 10, 10], [0, 0, 20, 20], [22, 22, 29, 28]])
    assert i.labels.tolist() == [0, 1, 0]
    expected = np.zeros((H, W), np.uint8)
    expected[0:20, 0:20] = 2
    expected[5:10, 5:10] = 1  # small on top despite JSON order
    expected[22:28, 22:29] = 1  # compressed RLE
    expected[:, 32:36] = VOID  # uncompressed RLE crowd
    np.testing.assert_array_equal(i.mask, expected)
    assert i.has_det and i.has_seg
    assert j.has_det and not j.has_seg and j.mask is None
    np.testing.assert_allclose(j.boxes, [[1.5, 2, 11.5, 10]])
    gt = ds.coco_gt()
    crowd = [a for a in gt["annotations"] if a["iscrowd"]]
    assert len(crowd) == 1 and crowd[0]["category_id"] == 2 and crowd[0]["image_id"] == 0
    assert len(gt["annotations"]) == 5


def test_coco_configured_classes_match_by_name(tmp_path):
    ds = COCODataset(write_coco(tmp_path / "coco"), "train", classes=["zebra", "ant"])
    assert ds.load_sample(0).labels.tolist() == [1, 0, 1]
    mask = ds.load_sample(0).mask
    assert mask[0, 0] == 1 and mask[6, 6] == 2


def test_coco_missing_bbox_flags_has_det_off(tmp_path):
    root = write_coco(tmp_path / "coco")
    path = root / "annotations" / "instances_train.json"
    data = json.loads(path.read_text())
    del data["annotations"][0]["bbox"]
    path.write_text(json.dumps(data))
    ds = COCODataset(root, "train")
    assert not ds.records[0].has_det and ds.records[0].has_seg
    assert [im["id"] for im in ds.coco_gt()["images"]] == [1]


def write_yolo(root: Path, names=None) -> Path:
    write_image(root / "images" / "train" / "x.png", h=20, w=40, seed=3)
    write_image(root / "images" / "train" / "y.png", h=20, w=40, seed=4)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "train" / "x.txt").write_text("1 0.5 0.5 0.5 0.5\n\n0 0.1 0.1 0.2 0.1 0.2 0.4 0.1 0.4\n")
    mask = np.zeros((20, 40), np.uint8)
    mask[5:15, 10:30] = 2
    write_palette_png(root / "masks" / "train" / "x.png", mask)
    data = {"path": ".", "train": "images/train", "names": names or {0: "a", 1: "b"}}
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    return root / "data.yaml"


def test_yolo_labels_masks_and_missing_files(tmp_path):
    ds = YOLODataset(write_yolo(tmp_path / "yolo"), "train")
    assert ds.classes == ["a", "b"]
    x, y = ds.load_sample(0), ds.load_sample(1)
    assert x.id == "x" and y.id == "y"
    np.testing.assert_allclose(x.boxes, [[10, 5, 30, 15], [4, 2, 8, 8]], atol=1e-4)  # box, then segment bbox
    assert x.labels.tolist() == [1, 0]
    assert x.has_seg and x.mask[10, 20] == 2 and x.mask[0, 0] == 0
    assert y.has_det and len(y.boxes) == 0  # missing label file = no objects
    assert not y.has_seg and y.mask is None
    gt = ds.coco_gt()
    assert gt["images"][0]["width"] == 40
    np.testing.assert_allclose(gt["annotations"][0]["bbox"], [10, 5, 20, 10], atol=1e-4)


def test_yolo_names_list_and_no_det_key(tmp_path):
    path = write_yolo(tmp_path / "yolo", names=["p", "q"])
    data = yaml.safe_load(path.read_text())
    data["mtkd_no_det"] = {"train": ["x"]}
    path.write_text(yaml.safe_dump(data))
    ds = YOLODataset(path, "train")
    assert ds.classes == ["p", "q"]
    assert not ds.load_sample(0).has_det and len(ds.load_sample(0).boxes) == 0


@pytest.mark.parametrize("fmt", ["voc", "coco", "yolo"])
def test_build_dataset_items(tmp_path, fmt):
    root = {"voc": write_voc, "coco": write_coco, "yolo": write_yolo}[fmt](tmp_path / fmt)
    cfg = {"format": fmt, "root": str(root), "train": "train", "classes": None, "imgsz": 64, "skip_bad": False,
           "augment": {"hflip": 0.5}, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    ds = build_dataset(cfg, "train", train=True, seed=0)
    item = ds[0]
    assert item["image"].shape == (3, 64, 64) and item["mask"].shape == (64, 64)
    assert item["index"] == 0 and item["orig_size"] == ds.load_sample(0).size


def test_list_images_is_recursive_sorted_and_case_blind(tmp_path):
    from mtkd.imageio import list_images
    from mtkd.errors import DataError

    for rel in ("b.PNG", "a/c.jpg", "a/b.JpEg", "z.webp"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "dir.jpg").mkdir()  # a folder with an image suffix is no image
    assert list_images(tmp_path) == [tmp_path / p for p in ("a/b.JpEg", "a/c.jpg", "b.PNG", "z.webp")]
    assert list_images(tmp_path, (".png",)) == [tmp_path / "b.PNG"]
    assert list_images(tmp_path / "notes.txt") == [tmp_path / "notes.txt"]  # a file named explicitly
    (tmp_path / "empty").mkdir()
    assert list_images(tmp_path / "empty") == []
    with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path / 'missing'))}: no such image file or folder$"):
        list_images(tmp_path / "missing")
