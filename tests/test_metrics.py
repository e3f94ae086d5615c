"""Metrics: COCO mAP against pycocotools itself, VOC AP and mIoU against hand computations."""
import contextlib
import copy
import io
import logging
import math

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mtkd.errors import DataError
from mtkd.tasks.multitask.metrics import SegConfusion, coco_map, coco_results, voc_map50


def _ann(i, image_id, cat, x1, y1, x2, y2, crowd=0):
    return {
        "id": i,
        "image_id": image_id,
        "category_id": cat,
        "bbox": [x1, y1, x2 - x1, y2 - y1],
        "area": (x2 - x1) * (y2 - y1),
        "iscrowd": crowd,
    }


@pytest.fixture
def coco_gt():
    images = [{"id": i, "width": 100, "height": 80, "file_name": f"{i}.jpg"} for i in (0, 1, 2)]
    anns = [
        _ann(1, 0, 1, 10, 10, 40, 50),
        _ann(2, 0, 2, 50, 20, 90, 70),
        _ann(3, 1, 1, 5, 5, 30, 30),
        _ann(4, 1, 1, 60, 40, 95, 75),  # missed below
        _ann(5, 2, 2, 20, 10, 70, 60),
        _ann(6, 2, 1, 0, 0, 15, 15, crowd=1),  # ignored region
    ]
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    return {"images": images, "annotations": anns, "categories": cats}


def _perfect(gt):
    preds = []
    for img in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == img["id"] and not a["iscrowd"]]
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]
        preds.append(
            {
                "image_id": img["id"],
                "boxes": np.array(boxes, np.float32).reshape(-1, 4),
                "scores": np.ones(len(anns)),
                "labels": np.array([a["category_id"] - 1 for a in anns]),
            }
        )
    return preds


def _pycocotools_stats(gt, results):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(results)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def test_coco_map_matches_pycocotools(coco_gt):
    preds = [
        {  # one good box, one shifted box of the right class
            "image_id": 0,
            "boxes": torch.tensor([[11.0, 10.0, 41.0, 52.0], [55.0, 25.0, 95.0, 75.0]]),
            "scores": torch.tensor([0.9, 0.6]),
            "labels": torch.tensor([0, 1]),
        },
        {  # one hit, a false positive of class b; the second class-a box is missed
            "image_id": 1,
            "boxes": np.array([[6.0, 4.0, 31.0, 29.0], [40.0, 40.0, 60.0, 60.0]]),
            "scores": np.array([0.8, 0.95]),
            "labels": np.array([0, 1]),
        },
        {  # a hit and a detection on the crowd region (ignored, not a false positive)
            "image_id": 2,
            "boxes": np.array([[22.0, 12.0, 70.0, 58.0], [1.0, 1.0, 14.0, 14.0]]),
            "scores": np.array([0.7, 0.85]),
            "labels": np.array([1, 0]),
        },
        {  # an image absent from the ground truth (has_det False): dropped
            "image_id": 7,
            "boxes": np.array([[0.0, 0.0, 5.0, 5.0]]),
            "scores": np.array([0.99]),
            "labels": np.array([0]),
        },
    ]
    ours = coco_map(preds, coco_gt)
    ref = _pycocotools_stats(coco_gt, coco_results(preds[:3]))
    assert ours["map50_95"] == pytest.approx(ref[0], abs=1e-9)
    assert ours["map50"] == pytest.approx(ref[1], abs=1e-9)
    assert 0.0 < ours["map50_95"] < ours["map50"] < 1.0
    # the ground-truth dict is left untouched (COCOeval writes "ignore" flags into its annotations)
    assert all("ignore" not in a for a in coco_gt["annotations"])


def test_coco_map_perfect_and_empty(coco_gt):
    assert coco_map(_perfect(coco_gt), coco_gt) == {"map50_95": pytest.approx(1.0), "map50": pytest.approx(1.0)}
    assert coco_map([], coco_gt) == {"map50_95": 0.0, "map50": 0.0}
    empty = [{"image_id": 0, "boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0)}]
    assert coco_map(empty, coco_gt) == {"map50_95": 0.0, "map50": 0.0}


def test_coco_map_is_silent(coco_gt, capsys, caplog):
    caplog.set_level(logging.INFO)
    coco_map(_perfect(coco_gt), coco_gt)
    assert capsys.readouterr().out == ""
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]


def _voc_case():
    gts = [
        {"image_id": 0, "boxes": [[0, 0, 10, 10], [40, 40, 60, 60]], "labels": [0, 1], "difficult": [False, False]},
        {"image_id": 1, "boxes": [[20, 20, 30, 30], [50, 50, 60, 60]], "labels": [0, 0], "difficult": [False, True]},
    ]
    preds = [
        {
            "image_id": 0,
            "boxes": [[0, 0, 10, 10], [0, 0, 10, 10], [45, 40, 65, 60]],
            "scores": [0.9, 0.7, 0.5],
            "labels": [0, 0, 1],
        },
        {
            "image_id": 1,
            "boxes": [[50, 50, 60, 60], [20, 20, 30, 30], [0, 0, 5, 5], [0, 0, 5, 5]],
            "scores": [0.8, 0.6, 0.95, 0.3],
            "labels": [0, 0, 1, 2],
        },
        {"image_id": 9, "boxes": [[0, 0, 10, 10]], "scores": [1.0], "labels": [0]},  # not in gts: dropped
    ]
    return preds, gts


def test_voc_map50_hand_computed():
    preds, gts = _voc_case()
    # class 0, 2 non-difficult boxes; by score: .9 TP, .8 on the difficult box (ignored),
    #   .7 duplicate FP, .6 TP -> recall .5 .5 .5 1, precision 1 1 .5 2/3.
    #   All-point AP = .5 * 1 + .5 * 2/3 = 5/6.
    #   11-point AP = (6 * 1 + 5 * 2/3) / 11 = 28/33.
    # class 1, 1 box; .95 FP (no class-1 box in image 1), .5 TP (IoU 300/500 = .6)
    #   -> recall 0 1, precision 0 .5 -> AP .5 (both variants).
    # class 2 has no ground truth: nan, left out of the mean.
    out = voc_map50(preds, gts, num_classes=3)
    assert out["ap_per_class"][0] == pytest.approx(5 / 6)
    assert out["ap_per_class"][1] == pytest.approx(0.5)
    assert math.isnan(out["ap_per_class"][2])
    assert out["map50"] == pytest.approx((5 / 6 + 0.5) / 2)
    out07 = voc_map50(preds, gts, num_classes=3, use_07=True)
    assert out07["ap_per_class"][0] == pytest.approx(28 / 33)
    assert out07["map50"] == pytest.approx((28 / 33 + 0.5) / 2)


def test_voc_map50_iou_threshold_and_perfect():
    gts = [{"image_id": 0, "boxes": [[0, 0, 10, 10]], "labels": [0]}]
    # IoU 5/15 < .5 -> FP, no TP: AP 0
    low = [{"image_id": 0, "boxes": [[5, 0, 15, 10]], "scores": [0.9], "labels": [0]}]
    assert voc_map50(low, gts, 1)["map50"] == 0.0
    good = [{"image_id": 0, "boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "scores": torch.tensor([0.9]),
             "labels": torch.tensor([0])}]
    assert voc_map50(good, gts, 1)["map50"] == pytest.approx(1.0)


def test_seg_confusion_hand_case():
    # target / prediction, 255 = void. Non-void pixels (t, p): (0,0) (1,1) (2,2) (2,1) (1,0)
    # class 0: tp 1, union 1 + 2 - 1 = 2 -> .5; class 1: tp 1, union 2 + 2 - 1 = 3 -> 1/3;
    # class 2: tp 1, union 2 + 1 - 1 = 2 -> .5; class 3 absent everywhere -> nan, not averaged.
    target = torch.tensor([[0, 1, 255], [2, 2, 1]])
    pred = torch.tensor([[0, 1, 2], [2, 1, 0]])
    m = SegConfusion(4)
    m.update(pred, target)
    out = m.compute()
    assert out["miou"] == pytest.approx((0.5 + 1 / 3 + 0.5) / 3)
    assert out["pixel_acc"] == pytest.approx(3 / 5)
    assert out["iou_per_class"][:3] == pytest.approx([0.5, 1 / 3, 0.5])
    assert math.isnan(out["iou_per_class"][3])
    # two updates (as two DDP ranks would hold) sum to the same matrix as one update
    halves = SegConfusion(4)
    halves.update(pred[:1], target[:1])
    other = SegConfusion(4)
    other.update(pred[1:].numpy(), target[1:].numpy())
    assert torch.equal(halves.matrix + other.matrix, m.matrix)
    m.all_reduce()  # no process group: unchanged
    assert m.compute()["miou"] == pytest.approx(out["miou"])


def test_seg_confusion_bad_target():
    m = SegConfusion(3)
    with pytest.raises(DataError, match="class index 5"):
        m.update(torch.zeros(2, 2), torch.full((2, 2), 5))
