"""Hard task losses: masking of unlabelled samples/pixels, empty images, and a tiny overfit."""
import math

import pytest
import torch
from torchvision.ops import box_iou

from mtkd.errors import DataError
from mtkd.heads import decode
from mtkd.losses import build_loss
from mtkd.models import build_model
from mtkd.structures import VOID

TINY = {"backbone": "resnet10t", "neck_channels": 16, "head_channels": 16, "seg_channels": 32}
H = 64


@pytest.fixture(scope="module")
def model():
    return build_model(TINY, 2)


def _batch(n_boxes=(1, 2), has_det=(True, True), has_seg=(True, True)):
    torch.manual_seed(1)
    boxes = [torch.tensor([[8.0, 8.0, 40.0, 36.0], [30.0, 20.0, 60.0, 60.0]])[:n] for n in n_boxes]
    return {
        "images": torch.randn(len(n_boxes), 3, H, H),
        "boxes": boxes,
        "labels": [torch.tensor([0, 1])[:n] for n in n_boxes],
        "masks": torch.randint(0, 3, (len(n_boxes), H, H)),
        "has_det": torch.tensor(has_det),
        "has_seg": torch.tensor(has_seg),
    }


def _total(parts):
    return sum(parts.values())


def test_det_loss_zero_boxes_finite_and_connected(model):
    loss = build_loss("yolo_det")
    batch = _batch(n_boxes=(0, 0))
    out = model(batch["images"])
    parts = loss(out, None, batch)
    assert set(parts) == {"box", "dfl", "cls", "obj"}
    assert all(math.isfinite(v.item()) for v in parts.values())
    assert parts["box"].item() == 0.0 and parts["cls"].item() > 0  # all anchors are negatives
    _total(parts).backward()
    assert model.det_head.cls_branch[0][-1].bias.grad.abs().sum() > 0


def test_det_loss_masks_unlabelled_samples(model):
    loss = build_loss("yolo_det")
    batch = _batch(has_det=(True, False))
    out = model(batch["images"])
    ref = {k: v.item() for k, v in loss(out, None, batch).items()}
    assert ref["box"] > 0
    batch["boxes"][1] = torch.tensor([[0.0, 0.0, 64.0, 64.0], [1.0, 1.0, 20.0, 20.0]])
    batch["labels"][1] = torch.tensor([1, 1])
    changed = {k: v.item() for k, v in loss(out, None, batch).items()}
    assert changed == pytest.approx(ref, rel=1e-6, abs=1e-7)
    # The same change counts once the sample is labelled.
    batch["has_det"] = torch.tensor([True, True])
    labelled = {k: v.item() for k, v in loss(out, None, batch).items()}
    assert labelled != pytest.approx(ref, rel=1e-3)
    # No labelled sample at all: graph-connected zeros.
    batch["has_det"] = torch.tensor([False, False])
    parts = loss(out, None, batch)
    assert all(v.item() == 0.0 and v.requires_grad for v in parts.values())


def test_det_loss_rejects_bad_label(model):
    batch = _batch()
    batch["labels"][0] = torch.tensor([5])
    with torch.no_grad():
        out = model(batch["images"])
    with pytest.raises(DataError, match="labels"):
        build_loss("yolo_det")(out, None, batch)


def test_det_loss_direct_regression_and_proxy_objectness():
    model = build_model({**TINY, "reg_max": 1}, 2)
    batch = _batch()
    out = model(batch["images"])
    assert out["det"].box_dist is None
    parts = build_loss("yolo_det")(out, None, batch)
    assert all(math.isfinite(v.item()) for v in parts.values()) and parts["dfl"].item() > 0  # L1 term
    _total(parts).backward()
    assert model.det_head.box_pred[0].weight.grad.abs().sum() > 0
    # A head whose objectness is a stand-in (Ultralytics Detect) gets no objectness term.
    out["det"].obj_is_proxy = True
    assert build_loss("yolo_det")(out, None, batch)["obj"].item() == 0.0


def test_seg_ce_rejects_bad_mask_value():
    batch = _batch()
    batch["masks"][0, 0, 0] = 7
    with pytest.raises(DataError, match="masks"):
        build_loss("seg_ce")({"seg": torch.randn(2, 3, H, H)}, None, batch)


def test_seg_ce_ignores_void_and_unlabelled():
    loss = build_loss("seg_ce", dice=0.5)
    batch = _batch(has_seg=(True, False))
    batch["masks"][0, :16] = VOID
    logits = torch.randn(2, 3, H, H, requires_grad=True)
    ref = {k: v.item() for k, v in loss({"seg": logits}, None, batch).items()}
    assert set(ref) == {"ce", "dice"}
    edited = logits.detach().clone()
    edited[0, :, :16] = torch.randn(3, 16, H) * 10   # void pixels of sample 0
    edited[1] = torch.randn(3, H, H) * 10            # every pixel of the unlabelled sample
    assert {k: v.item() for k, v in loss({"seg": edited}, None, batch).items()} == pytest.approx(ref, rel=1e-6)
    edited[0, :, 20:] += torch.randn(3, H - 20, H) * 10  # labelled pixels do count
    assert loss({"seg": edited}, None, batch)["ce"].item() != pytest.approx(ref["ce"], rel=1e-3)
    batch["has_seg"] = torch.tensor([False, False])
    parts = loss({"seg": logits}, None, batch)
    assert all(v.item() == 0.0 for v in parts.values())
    _total(parts).backward()
    assert logits.grad is not None


def test_tiny_overfit_detects_and_segments():
    """One fixed batch, 60 Adam steps from a seeded init: the hard losses fall and decode finds the drawn boxes.

    DFL has a floor (the entropy of its two-bin soft target), so the fall is
    checked on the total and, more strictly, on every other term.
    """
    boxes = [torch.tensor([[8.0, 16.0, 40.0, 48.0]]), torch.tensor([[24.0, 8.0, 56.0, 32.0]])]
    labels = [torch.tensor([0]), torch.tensor([1])]
    images = torch.zeros(2, 3, H, H)
    masks = torch.zeros(2, H, H, dtype=torch.long)
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        x1, y1, x2, y2 = b[0].int().tolist()
        images[i, int(lab), y1:y2, x1:x2] = 1.0
        masks[i, y1:y2, x1:x2] = int(lab) + 1
    batch = {"images": images, "boxes": boxes, "labels": labels, "masks": masks,
             "has_det": torch.tensor([True, True]), "has_seg": torch.tensor([True, True])}
    torch.manual_seed(0)
    model = build_model(TINY, 2)
    det_loss, seg_loss = build_loss("yolo_det"), build_loss("seg_ce")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    history = []
    for _ in range(60):
        out = model(images)
        parts = {**det_loss(out, None, batch), **seg_loss(out, None, batch)}
        total = _total(parts)
        history.append((total.item(), total.item() - parts["dfl"].item()))
        opt.zero_grad()
        total.backward()
        opt.step()
    assert history[-1][0] < history[0][0] / 3
    assert history[-1][1] < history[0][1] / 5
    model.eval()
    with torch.no_grad():
        out = model(images)
    for i, res in enumerate(decode(out["det"], conf=0.001)):
        assert len(res["boxes"]) > 0
        assert res["labels"][0].item() == labels[i].item()
        assert box_iou(res["boxes"][:1], boxes[i]).item() > 0.5
    assert (out["seg"].argmax(1) == masks).float().mean().item() > 0.9
