"""Augmentation keeps boxes and masks together; letterbox maps back; collate builds the batch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mtkd.datasets import build_transforms, collate, unletterbox_boxes
from mtkd.datasets.transforms import PAD_VALUE
from mtkd.errors import ConfigError
from mtkd.structures import BATCH_KEYS, VOID, Sample

H, W = 48, 64
BOXES = np.array([[5, 10, 25, 30], [40, 2, 60, 20]], np.float32)


def make_sample(has_seg: bool = True, difficult=None) -> Sample:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    mask = np.zeros((H, W), np.uint8)
    for k, (x1, y1, x2, y2) in enumerate(BOXES.astype(int)):
        mask[y1:y2, x1:x2] = k + 1
    return Sample(image=image, boxes=BOXES, labels=[0, 1], mask=mask if has_seg else None,
                  has_det=True, has_seg=has_seg, id="s", difficult=difficult, index=3)


def mask_bbox(mask: np.ndarray, value: int) -> np.ndarray:
    ys, xs = np.nonzero(mask == value)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def cfg(**augment):
    return {"imgsz": 64, "augment": augment}


def test_hflip_moves_boxes_and_mask_together():
    t = build_transforms(cfg(hflip=1.0, scale=None, color=0.0), train=True, seed=0)
    item = t(make_sample())
    mask = item["mask"].numpy()
    assert item["labels"].tolist() == [0, 1]
    for box, label in zip(item["boxes"].numpy(), item["labels"].tolist()):
        np.testing.assert_allclose(mask_bbox(mask, label + 1), box, atol=1.0)
    # flipped: the first box now sits at x in [64-25, 64-5] of the original image
    orig = unletterbox_boxes(item["boxes"], item["letterbox"])
    np.testing.assert_allclose(orig[0].numpy(), [W - 25, 10, W - 5, 30], atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_affine_keeps_boxes_on_mask(seed):
    t = build_transforms(cfg(hflip=0.5, scale=[0.6, 1.4], translate=0.1, color=0.3), train=True, seed=seed)
    item = t(make_sample())
    mask = item["mask"].numpy()
    assert len(item["boxes"]) > 0
    for box, label in zip(item["boxes"].numpy(), item["labels"].tolist()):
        np.testing.assert_allclose(mask_bbox(mask, label + 1), box, atol=1.5)
    # pixels uncovered by the affine are VOID, never background
    assert set(np.unique(mask)) <= {0, 1, 2, VOID}


def test_seeded_pipeline_is_deterministic():
    a = build_transforms(cfg(scale=[0.5, 1.5], color=0.3), train=True, seed=5)(make_sample())
    b = build_transforms(cfg(scale=[0.5, 1.5], color=0.3), train=True, seed=5)(make_sample())
    c = build_transforms(cfg(scale=[0.5, 1.5], color=0.3), train=True, seed=6)(make_sample())
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["boxes"], b["boxes"])
    assert not torch.equal(a["image"], c["image"])


def test_set_epoch_makes_an_epoch_independent_of_earlier_draws():
    def epoch_images(t, epoch, rank=0):
        t.set_epoch(epoch, rank)
        return [t(make_sample())["image"] for _ in range(3)]

    augment = cfg(scale=[0.5, 1.5], color=0.3)
    fresh = build_transforms(augment, train=True, seed=5)
    used = build_transforms(augment, train=True, seed=5)
    for _ in range(4):  # draws before set_epoch (the trainer's lazy forward) and in epoch 0
        used(make_sample())
    epoch_images(used, 0)
    # epoch 1 of a run that drew epoch 0 first == epoch 1 of a resumed run that did not
    assert all(torch.equal(a, b) for a, b in zip(epoch_images(used, 1), epoch_images(fresh, 1)))
    assert not torch.equal(epoch_images(fresh, 0)[0], epoch_images(fresh, 1)[0])
    assert not torch.equal(epoch_images(fresh, 1, rank=1)[0], epoch_images(fresh, 1)[0])


def test_eval_letterbox_maps_back_and_pads_void():
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    t = build_transforms({"imgsz": 96, "mean": mean, "std": std}, train=False)
    sample = make_sample()
    item = t(sample)
    scale, pad_x, pad_y = item["letterbox"]
    assert scale == pytest.approx(96 / W) and pad_x == 0 and pad_y == (96 - round(H * 96 / W)) // 2
    np.testing.assert_allclose(unletterbox_boxes(item["boxes"], item["letterbox"]).numpy(), sample.boxes, atol=1e-4)
    mask = item["mask"].numpy()
    assert (mask[:pad_y] == VOID).all() and (mask[-pad_y:] == VOID).all()
    for box, label in zip(item["boxes"].numpy(), item["labels"].tolist()):
        np.testing.assert_allclose(mask_bbox(mask, label + 1), box, atol=1.0)
    expected_pad = (PAD_VALUE / 255 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(item["image"][:, 0, 0].numpy(), expected_pad, atol=1e-5)
    assert item["orig_size"] == (H, W) and item["index"] == 3


def test_difficult_boxes_are_not_targets():
    item = build_transforms({"imgsz": 64}, train=False)(make_sample(difficult=[True, False]))
    assert item["labels"].tolist() == [1]


def test_augment_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"data\.augment\.mosaic"):
        build_transforms(cfg(mosaic=1.0), train=True)
    with pytest.raises(ConfigError, match=r"data\.augment\.mosaic"):
        build_transforms(cfg(mosaic=1.0), train=False)
    with pytest.raises(ConfigError, match=r"data\.augment\.scale"):
        build_transforms(cfg(scale=[1.5, 0.5]), train=True)
    with pytest.raises(ConfigError, match=r"data\.imgsz"):
        build_transforms({"imgsz": 50}, train=False)
    with pytest.raises(ConfigError, match=r"data\.std"):
        build_transforms({"imgsz": 64, "std": [0, 1, 1]}, train=False)


def test_collate_builds_the_batch_contract():
    t = build_transforms({"imgsz": 64}, train=False)
    batch = collate([t(make_sample()), t(make_sample(has_seg=False))])
    assert batch.keys() == BATCH_KEYS.keys()
    assert batch["images"].shape == (2, 3, 64, 64) and batch["images"].dtype == torch.float32
    assert batch["masks"].shape == (2, 64, 64) and batch["masks"].dtype == torch.int64
    assert (batch["masks"][1] == VOID).all() and (batch["masks"][0] != VOID).any()
    assert batch["has_seg"].tolist() == [True, False] and batch["has_det"].dtype == torch.bool
    assert [b.shape for b in batch["boxes"]] == [(2, 4), (2, 4)]
    assert batch["labels"][0].dtype == torch.int64
    assert batch["index"].tolist() == [3, 3] and batch["ids"] == ["s", "s"]
    assert batch["orig_sizes"].tolist() == [[H, W], [H, W]]
    assert batch["letterbox"].shape == (2, 3) and batch["letterbox"].dtype == torch.float32
