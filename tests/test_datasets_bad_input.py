"""Bad data: one-line DataError naming the file; skip_bad skips with a warning and a count."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml

from mtkd.datasets import COCODataset, VOCDataset, YOLODataset, build_dataset
from mtkd.errors import ConfigError, DataError
from test_datasets_formats import voc_xml, write_coco, write_palette_png, write_voc, write_yolo


def raises_naming(path, fn):
    """Assert ``fn()`` raises a one-line DataError whose message contains ``path``."""
    with pytest.raises(DataError) as info:
        fn()
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    return message


@pytest.fixture
def voc(tmp_path):
    return write_voc(tmp_path / "voc")


def test_missing_root_split_and_image(voc, tmp_path):
    raises_naming(tmp_path / "nope", lambda: VOCDataset(tmp_path / "nope", "train"))
    raises_naming(voc / "ImageSets" / "Main" / "val.txt", lambda: VOCDataset(voc, "val"))
    (voc / "JPEGImages" / "b.jpg").unlink()
    raises_naming(voc / "JPEGImages" / "b.jpg", lambda: VOCDataset(voc, "train"))
    (tmp_path / "c").mkdir()
    raises_naming(tmp_path / "c" / "annotations" / "instances_train.json", lambda: COCODataset(tmp_path / "c", "train"))
    raises_naming(tmp_path / "y.yaml", lambda: YOLODataset(tmp_path / "y.yaml", "train"))


def test_missing_seg_mask_file(voc):
    (voc / "SegmentationClass" / "c.png").unlink()
    raises_naming(voc / "SegmentationClass" / "c.png", lambda: VOCDataset(voc, "train"))


def test_corrupt_image_raises_then_skips_with_count(voc):
    bad = voc / "JPEGImages" / "b.jpg"
    bad.write_bytes(b"this is not a jpeg")
    ds = VOCDataset(voc, "train")  # images are decoded lazily
    raises_naming(bad, lambda: ds.load_sample(1))
    raises_naming(bad, lambda: ds[1])
    skipping = VOCDataset(voc, "train", skip_bad=True)
    with pytest.warns(UserWarning, match=re.escape(str(bad))):
        sample = skipping[1]
    assert sample.id == "c" and sample.index == 2  # the next good sample
    assert skipping.skipped == [str(bad)]


def test_non_image_file_is_not_a_readable_image(voc, tmp_path):
    import sys

    import ultralytics.utils.patches  # noqa: F401  (what mtkd's models import: it replaces PIL.Image.open)

    from mtkd.datasets.common import image_size, read_image
    from mtkd.imageio import open_image

    text = voc / "JPEGImages" / "b.jpg"
    text.write_text("hello, I am a text file\n")
    hostname = tmp_path / "hostname"  # like /etc/hostname given as an image: no suffix, one line of text
    hostname.write_text("buildhost\n")
    heif_before = "pi_heif" in sys.modules
    for path, read in ((text, read_image), (hostname, read_image), (hostname, image_size)):
        message = raises_naming(path, lambda: read(path))
        assert message == f"{path}: not a readable image (not a file format PIL reads)"
    message = raises_naming(text, lambda: VOCDataset(voc, "train")[1])
    assert "not a readable image" in message and "pi_heif" not in message
    assert ("pi_heif" in sys.modules) == heif_before  # no plugin was looked for
    assert "not a readable mask" in raises_naming(hostname, lambda: open_image(hostname, "mask"))


def test_malformed_xml_and_skip_at_construction(voc):
    xml = voc / "Annotations" / "b.xml"
    xml.write_text("<annotation><object>")
    raises_naming(xml, lambda: VOCDataset(voc, "train", classes=["cat", "dog"]))
    with pytest.warns(UserWarning, match="b.xml"):
        ds = VOCDataset(voc, "train", classes=["cat", "dog"], skip_bad=True)
    assert [r.id for r in ds.records] == ["a", "c"] and len(ds.skipped) == 1


def test_truncated_xml_while_reading_the_class_list(voc):
    xml = voc / "Annotations" / "b.xml"
    xml.write_text(xml.read_text()[:40])  # cut short mid-element
    message = raises_naming(xml, lambda: VOCDataset(voc, "train"))  # no class list: read from the XMLs
    assert "malformed XML" in message
    with pytest.warns(UserWarning, match="b.xml") as caught:
        ds = VOCDataset(voc, "train", skip_bad=True)
    assert any("class list" in str(w.message) for w in caught)
    assert ds.classes == ["cat", "dog"] and [r.id for r in ds.records] == ["a", "c"]
    assert ds.skipped_files() == [str(voc / "JPEGImages" / "b.jpg")]


def test_skipped_files_are_counted_across_dataloader_workers(voc):
    import torch

    from mtkd.datasets.collate import collate
    from mtkd.datasets.transforms import build_transforms

    bad = voc / "JPEGImages" / "c.jpg"
    bad.write_bytes(b"not a jpeg")
    (voc / "Annotations" / "b.xml").write_text("<annotation><object>")  # skipped at construction
    with pytest.warns(UserWarning):
        ds = VOCDataset(voc, "train", classes=["cat", "dog"], skip_bad=True,
                        transform=build_transforms({"imgsz": 64}, train=False))
    assert ds.skipped_files() == [str(voc / "JPEGImages" / "b.jpg")]
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1, collate_fn=collate)
    assert [b["ids"] for b in loader] == [["a"], ["a"]]  # c is bad: the next good sample stands in
    assert ds.skipped == [str(voc / "JPEGImages" / "b.jpg")]  # the worker's list stayed in the worker
    assert ds.skipped_files() == [str(voc / "JPEGImages" / "b.jpg"), str(bad)]


def test_unknown_class_name_names_file_and_class(voc):
    message = raises_naming(voc / "Annotations" / "a.xml", lambda: VOCDataset(voc, "train", classes=["cat", "bird"]))
    assert "'dog'" in message


@pytest.mark.parametrize(
    "box, expected",
    [((1, 1, 40.8, 30), [0, 0, 40, 30]),  # 0.8 px overshoot is clipped to the border
     ((5, 5, 5, 10), [4, 4, 5, 10]),  # 1-based inclusive corners: xmin == xmax is 1 px wide
     ((1, 1, 42, 30), None), ((-1, 1, 10, 10), None), ((5, 5, 4, 10), None)],  # xmax = xmin - 1: zero width
)
def test_box_outside_or_empty(voc, box, expected):
    (voc / "Annotations" / "b.xml").write_text(voc_xml([("dog", box, False)]))
    if expected is not None:
        np.testing.assert_allclose(VOCDataset(voc, "train").load_sample(1).boxes, [expected])
    else:
        raises_naming(voc / "Annotations" / "b.xml", lambda: VOCDataset(voc, "train"))


def test_mask_index_beyond_classes(voc):
    mask = np.zeros((30, 40), np.uint8)
    mask[3, 3] = 7
    write_palette_png(voc / "SegmentationClass" / "c.png", mask)
    ds = VOCDataset(voc, "train")
    raises_naming(voc / "SegmentationClass" / "c.png", lambda: ds.load_sample(2))


def test_coco_malformed_json_bad_box_and_category(tmp_path):
    root = write_coco(tmp_path / "coco")
    path = root / "annotations" / "instances_train.json"
    good = json.loads(path.read_text())
    path.write_text("{not json")
    raises_naming(path, lambda: COCODataset(root, "train"))
    for mutate in (
        lambda d: d["annotations"][0].update(bbox=[5, 5, 0, 5]),  # zero width
        lambda d: d["annotations"][0].update(bbox=[30, 5, 20, 5]),  # beyond the border
        lambda d: d["annotations"][0].update(category_id=99),
        lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3]]),
    ):
        data = json.loads(json.dumps(good))
        mutate(data)
        path.write_text(json.dumps(data))
        raises_naming(path, lambda: COCODataset(root, "train"))
    raises_naming(path, lambda: COCODataset(root, "train", classes=["ant"]))  # 'zebra' unknown


def test_yolo_class_id_beyond_names_and_malformed_lines(tmp_path):
    data_yaml = write_yolo(tmp_path / "yolo")
    txt = tmp_path / "yolo" / "labels" / "train" / "x.txt"
    for content in ("2 0.5 0.5 0.2 0.2\n", "0 0.5 0.5\n", "0 0.5 0.5 0 0.2\n", "0 a b c d\n"):
        txt.write_text(content)
        raises_naming(txt, lambda: YOLODataset(data_yaml, "train"))
    txt.write_text("0 0.5 0.5 1.2 0.2\n")  # 0.1 * 40 px = 4 px outside: found when loaded
    ds = YOLODataset(data_yaml, "train")
    raises_naming(txt, lambda: ds.load_sample(0))
    skipping = YOLODataset(data_yaml, "train", skip_bad=True)
    with pytest.warns(UserWarning, match="x.txt"):
        assert skipping[0].id == "y"
    assert skipping.skipped == [str(tmp_path / "yolo" / "images" / "train" / "x.png")]
    raises_naming(txt, ds.coco_gt)
    with pytest.warns(UserWarning, match="x.txt"):
        assert [im["file_name"] for im in skipping.coco_gt()["images"]] == ["y.png"]
    assert len(skipping.skipped) == 1


def test_yolo_yaml_errors(tmp_path):
    data_yaml = write_yolo(tmp_path / "yolo")
    raises_naming(data_yaml, lambda: YOLODataset(data_yaml, "val"))  # no val entry
    raises_naming(data_yaml, lambda: YOLODataset(data_yaml, "train", classes=["a", "b", "c"]))
    data_yaml.write_text("names: [a\n")
    raises_naming(data_yaml, lambda: YOLODataset(data_yaml, "train"))
    data_yaml.write_text(yaml.safe_dump({"names": {0: "a", 2: "b"}, "train": "images/train"}))
    raises_naming(data_yaml, lambda: YOLODataset(data_yaml, "train"))


def test_build_dataset_config_errors(voc):
    with pytest.raises(ConfigError, match=r"data\.format"):
        build_dataset({"format": "kitti", "root": str(voc)}, "train", train=False)
    with pytest.raises(ConfigError, match=r"data\.batch"):
        build_dataset({"format": "voc", "root": str(voc), "batch": 3}, "train", train=False)
    with pytest.raises(ConfigError, match=r"data\.classes"):
        build_dataset({"format": "voc", "root": str(voc), "classes": "cat"}, "train", train=False)
    ds = build_dataset({"format": "voc", "root": str(voc), "imgsz": 64, "skip_bad": True}, "train", train=False)
    assert ds.skip_bad and len(ds) == 3


def test_empty_split_names_the_split_file(voc):
    (voc / "ImageSets" / "Main" / "val.txt").write_text("\n")
    raises_naming(voc / "ImageSets" / "Main" / "val.txt", lambda: VOCDataset(voc, "val"))


def test_image_modes_load_as_8bit_rgb(tmp_path):
    from PIL import Image

    from mtkd.tasks.classify.data import load_rgb
    from mtkd.datasets.common import read_image

    wide = np.array([[0, 257 * 100, 65535], [128, 65535 // 2, 257 * 7]], np.uint16)
    grey = np.round(wide / 65535 * 255).astype(np.uint8)  # [[0, 100, 255], [0, 127, 7]]
    rgb = np.random.default_rng(0).integers(0, 256, (2, 3, 3), dtype=np.uint8)
    palette = [v for i in range(256) for v in (i, 255 - i, (3 * i) % 256)]
    indices = np.array([[0, 1, 2], [100, 200, 255]], np.uint8)
    expected_p = np.array(palette, np.uint8).reshape(256, 3)[indices]
    cases = {
        "i16.png": (Image.fromarray(wide), grey),  # mode I;16
        "i32.tif": (Image.fromarray(wide.astype(np.int32)), grey),  # mode I
        "grey.png": (Image.fromarray(grey), grey),  # mode L
        "rgba.png": (Image.fromarray(np.dstack([rgb, np.full((2, 3), 9, np.uint8)])), rgb),
        "pal.png": (Image.fromarray(indices, mode="P"), expected_p),
    }
    cases["pal.png"][0].putpalette(palette)
    for name, (im, want) in cases.items():
        im.save(tmp_path / name)
        want = want if want.ndim == 3 else np.repeat(want[..., None], 3, axis=2)
        got = read_image(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == (2, 3, 3), name
        np.testing.assert_array_equal(got, want, err_msg=name)
        np.testing.assert_array_equal(np.asarray(load_rgb(tmp_path / name)), want, err_msg=name)
    assert Image.open(tmp_path / "i16.png").mode.startswith("I;16")
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    Image.fromarray(wide.astype(np.float32)).save(tmp_path / "float.tif")
    message = raises_naming(tmp_path / "float.tif", lambda: read_image(tmp_path / "float.tif"))
    assert "mode F" in message
    raises_naming(tmp_path / "float.tif", lambda: load_rgb(tmp_path / "float.tif"))


def write_rotated_jpeg(path, orientation=6):
    """A 30x40 (h x w) JPEG, left half white, stored with an EXIF orientation tag.

    Orientation 6 means "turn 90 degrees clockwise to view": upright it is 40x30
    with the white half on top.
    """
    from PIL import Image

    pixels = np.zeros((30, 40, 3), np.uint8)
    pixels[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=95)
    return path


def test_exif_orientation_applied_to_pixels_and_header_size(tmp_path):
    from PIL import Image

    from mtkd.tasks.classify.data import load_rgb
    from mtkd.datasets.common import image_size, read_image

    path = write_rotated_jpeg(tmp_path / "r.jpg")
    assert Image.open(path).getexif()[0x0112] == 6
    image = read_image(path)
    assert image.shape == (40, 30, 3)
    assert image[:18].mean() > 240 and image[22:].mean() < 15  # white half on top
    assert image_size(path) == (40, 30)
    assert load_rgb(path).size == (30, 40)  # PIL: (w, h)
    # orientation 3 (upside down) keeps the size but flips the pixels
    upside = read_image(write_rotated_jpeg(tmp_path / "u.jpg", orientation=3))
    assert upside.shape == (30, 40, 3) and upside[:, 22:].mean() > 240 and upside[:, :18].mean() < 15
    assert image_size(tmp_path / "u.jpg") == (30, 40)
    # PNG with an eXIf chunk: the header reader sees it too
    Image.open(path).save(tmp_path / "r.png", exif=Image.open(path).getexif().tobytes())
    assert image_size(tmp_path / "r.png") == (40, 30) and read_image(tmp_path / "r.png").shape == (40, 30, 3)


def test_exif_rotated_image_in_yolo_dataset(tmp_path):
    data_yaml = write_yolo(tmp_path / "yolo")
    write_rotated_jpeg(tmp_path / "yolo" / "images" / "train" / "z.jpg")
    ds = YOLODataset(data_yaml, "train")
    z = [r.id for r in ds.records].index("z")
    gt = ds.coco_gt()  # header sizes, cached in the records
    entry = [im for im in gt["images"] if im["id"] == z][0]
    assert (entry["height"], entry["width"]) == (40, 30)
    sample = ds.load_sample(z)  # the decoded image agrees with the cached header size
    assert sample.image.shape == (40, 30, 3)


def test_exif_rotated_image_in_voc_dataset_matches_its_upright_xml_size(tmp_path):
    """A VOC XML declares the upright size (40x30 here) of a JPEG stored 30x40 with an EXIF turn: it loads
    upright, box inside, instead of failing the declared-size check."""
    root = write_voc(tmp_path / "voc")
    write_rotated_jpeg(root / "JPEGImages" / "z.jpg")
    (root / "Annotations" / "z.xml").write_text(voc_xml([("cat", (2, 22, 30, 40), False)], w=30, h=40))
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nb\nz\n")
    ds = VOCDataset(root, "train")
    z = [r.id for r in ds.records].index("z")
    sample = ds.load_sample(z)
    assert sample.image.shape == (40, 30, 3)
    assert sample.image[:20].mean() > 200 and sample.image[20:].mean() < 50  # white half on top: turned
    np.testing.assert_allclose(sample.boxes, [[1, 21, 30, 40]])


@pytest.mark.parametrize("escape", ["../../outside.jpg", "ABSOLUTE", "sub/../../i.jpg"])
def test_coco_file_name_outside_the_image_folder(tmp_path, escape):
    root = write_coco(tmp_path / "coco")
    outside = root / "outside.jpg"  # exists, so only the confinement check can refuse it
    outside.write_bytes((root / "images" / "train" / "i.jpg").read_bytes())
    file_name = str(outside) if escape == "ABSOLUTE" else escape
    path = root / "annotations" / "instances_train.json"
    data = json.loads(path.read_text())
    data["images"][0]["file_name"] = file_name
    image_id = data["images"][0]["id"]
    path.write_text(json.dumps(data))
    message = raises_naming(path, lambda: COCODataset(root, "train"))
    assert f"image {image_id} " in message and repr(file_name) in message and "outside" in message
    with pytest.warns(UserWarning, match="outside the image folder"):
        ds = COCODataset(root, "train", skip_bad=True)
    assert len(ds) == len(data["images"]) - 1
