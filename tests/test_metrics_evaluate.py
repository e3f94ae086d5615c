"""evaluate(): a stand-in model that outputs the (letterboxed) labels scores perfectly in original pixels.

Images are non-square and of different sizes, so that the letterbox scale is
1, 2 or 0.5 with padding on either axis. Mask regions start and end on even
pixels, which makes "crop, resize logits bilinearly, argmax" reproduce them
exactly (the test would catch an off-by-one crop or a wrong scale).
"""
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from mtkd.datasets.collate import collate
from mtkd.datasets.transforms import build_transforms
from mtkd.structures import VOID, DetOutput, Sample
from mtkd.tasks.multitask.evaluation import evaluate

IMGSZ = 64
CLASSES = ["a", "b", "c"]


def _sample_specs():
    # (h, w, boxes, labels, difficult, has_det, has_seg)
    return [
        (32, 64, [[4, 2, 20, 18], [30, 10, 60, 30]], [0, 1], [False, False], True, True),  # scale 1, pad_y 16
        (16, 32, [[2, 2, 12, 10], [16, 4, 30, 14]], [2, 0], [False, True], True, True),  # scale 2, a difficult box
        (128, 96, [[10, 20, 50, 80], [60, 90, 90, 120]], [1, 2], [False, False], True, True),  # scale .5, pad_x 8
        (64, 48, [[4, 4, 40, 30]], [0], [False], False, True),  # no detection labels
        (48, 64, [[8, 8, 30, 40]], [1], [False], True, False),  # no segmentation labels
    ]


class TinyDataset:
    """Follows the dataset contract: classes, load_sample, coco_gt, items through the eval transform."""

    classes = CLASSES

    def __init__(self):
        self.samples = []
        for i, (h, w, boxes, labels, difficult, has_det, has_seg) in enumerate(_sample_specs()):
            image = np.full((h, w, 3), 30 + 40 * i, np.uint8)  # unique grey: the stand-in model's image id
            mask = None
            if has_seg:
                mask = np.zeros((h, w), np.uint8)
                for (x1, y1, x2, y2), k in zip(boxes, labels):
                    mask[y1:y2, x1:x2] = k + 1
                mask[:2, :] = VOID
            self.samples.append(
                Sample(image, np.array(boxes, np.float32), np.array(labels), mask, has_det, has_seg, f"s{i}",
                       np.array(difficult), index=i)
            )
        self.transform = build_transforms({"imgsz": IMGSZ, "augment": {}}, train=False)

    def __len__(self):
        return len(self.samples)

    def load_sample(self, i):
        return self.samples[i]

    def __getitem__(self, i):
        return self.transform(self.samples[i])

    def coco_gt(self):
        images, anns = [], []
        for i, s in enumerate(self.samples):
            if not s.has_det:
                continue
            h, w = s.size
            images.append({"id": i, "width": w, "height": h, "file_name": f"{i}.png"})
            for (x1, y1, x2, y2), k, d in zip(s.boxes.tolist(), s.labels, s.difficult):
                anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(k) + 1,
                             "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": int(d)})
        return {"images": images, "annotations": anns, "categories": [{"id": k + 1, "name": n}
                                                                       for k, n in enumerate(CLASSES)]}


class PerfectModel(nn.Module):
    """Recognises each image by its centre pixel and returns its letterboxed labels as outputs.

    Detection: one anchor per box at (0, 0) with stride 1, so ltrb = (-x1, -y1, x2, y2) in input
    pixels; logits +20 for the true class/objectness, -20 elsewhere (padding anchors score ~0).
    Segmentation: 10 * one-hot of the letterboxed mask (void -> background).
    """

    def __init__(self, dataset, det=True, seg=True, shift=0.0):
        super().__init__()
        self.items = [dataset[i] for i in range(len(dataset))]
        self.keys = torch.stack([it["image"][:, IMGSZ // 2, IMGSZ // 2] for it in self.items])
        self.det, self.seg, self.shift = det, seg, shift
        self.dummy = nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, images):
        assert not self.training and torch.is_inference_mode_enabled()
        self.calls += 1
        ids = [int((self.keys - im[:, IMGSZ // 2, IMGSZ // 2]).abs().sum(1).argmin()) for im in images]
        items = [self.items[i] for i in ids]
        out = {}
        if self.det:
            a = 4
            box = torch.zeros(len(items), a, 4)
            cls = torch.full((len(items), a, len(CLASSES)), -20.0)
            obj = torch.full((len(items), a), -20.0)
            for b, it in enumerate(items):
                n = len(it["labels"])
                x1y1, x2y2 = it["boxes"][:, :2] + self.shift, it["boxes"][:, 2:] + self.shift
                box[b, :n] = torch.cat([-x1y1, x2y2], 1)
                cls[b, torch.arange(n), it["labels"]] = 20.0
                obj[b, :n] = 20.0
            out["det"] = DetOutput(cls=cls, obj=obj, box=box, anchors=torch.zeros(a, 2), strides=torch.ones(a, 1))
        if self.seg:
            masks = torch.stack([it["mask"] for it in items]).clone()
            masks[masks == VOID] = 0
            out["seg"] = 10.0 * nn.functional.one_hot(masks, len(CLASSES) + 1).permute(0, 3, 1, 2).float()
        return out


@pytest.fixture(scope="module")
def data():
    ds = TinyDataset()
    return ds, DataLoader(ds, batch_size=2, shuffle=False, collate_fn=collate)


def test_evaluate_perfect_model(data):
    ds, loader = data
    model = PerfectModel(ds)
    model.train()
    out = evaluate(model, loader, ds)
    assert model.training  # mode restored
    assert out["n_images"] == len(ds)
    assert out["map50"] == pytest.approx(1.0)
    assert out["map50_95"] == pytest.approx(1.0)
    assert out["voc_map50"] == pytest.approx(1.0)
    assert out["miou"] == pytest.approx(1.0)
    assert out["pixel_acc"] == pytest.approx(1.0)


def test_evaluate_detects_misplaced_boxes(data):
    ds, loader = data
    # a shift of 3 input pixels is 1.5 to 6 original pixels depending on the scale: mAP drops below 1
    out = evaluate(PerfectModel(ds, shift=3.0), loader, ds)
    assert out["map50_95"] < 0.9
    assert out["miou"] == pytest.approx(1.0)


def test_evaluate_single_head_and_max_batches(data):
    ds, loader = data
    seg_only = evaluate(PerfectModel(ds, det=False), loader, ds)
    assert set(seg_only) == {"miou", "pixel_acc", "n_images"}
    assert seg_only["miou"] == pytest.approx(1.0)
    det_model = PerfectModel(ds, seg=False)
    det_only = evaluate(det_model, loader, ds, max_batches=1)
    assert set(det_only) == {"map50_95", "map50", "voc_map50", "n_images"}
    assert det_model.calls == 1 and det_only["n_images"] == 2
    assert det_only["map50"] == pytest.approx(1.0)  # only the images seen are scored
