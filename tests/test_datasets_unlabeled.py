"""Unlabelled images (``data.unlabeled``): the mixing batch sampler, the folder and
split readers, and the hard losses on batches without labels."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, DistributedSampler

from mtkd.datasets import (MixedBatchSampler, MixedDataset, build_dataset, build_unlabeled, collate,
                           mixed_shares)
from mtkd.errors import ConfigError, DataError
from mtkd.structures import VOID, DetOutput
from test_datasets_formats import write_image, write_voc, write_yolo

CFG = {"format": "voc", "imgsz": 64, "augment": {"hflip": 0.5}, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


# -- the sampler ---------------------------------------------------------------------------------

def epoch_batches(sampler: MixedBatchSampler, epoch: int) -> list:
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("n_l, n_u, batch, ratio", [(20, 13, 8, 0.5), (21, 50, 6, 0.34), (9, 3, 4, 0.75)])
def test_sampler_shares_and_epoch_length(n_l, n_u, batch, ratio):
    s = MixedBatchSampler(n_l, n_u, batch, ratio, seed=0)
    u = round(ratio * batch)
    batches = epoch_batches(s, 0)
    assert len(batches) == len(s) == n_l // (batch - u)
    for b in batches:
        assert len(b) == batch
        assert sum(i >= n_l for i in b) == u
        assert all(0 <= i < n_l for i in b[:batch - u]) and all(n_l <= i < n_l + n_u for i in b[batch - u:])
    # the labelled part is one pass over the labelled set (no repeats; only the incomplete rest dropped)
    labeled = [i for b in batches for i in b if i < n_l]
    assert len(set(labeled)) == len(labeled) == len(s) * (batch - u)


def test_sampler_deterministic_per_seed_and_epoch_and_differs_across_epochs():
    a, b = MixedBatchSampler(30, 17, 8, 0.5, seed=4), MixedBatchSampler(30, 17, 8, 0.5, seed=4)
    assert epoch_batches(a, 3) == epoch_batches(b, 3)
    assert epoch_batches(a, 0) == epoch_batches(b, 0)  # set_epoch back, same batches
    assert epoch_batches(a, 0) != epoch_batches(a, 1)
    e0, e1 = epoch_batches(a, 0), epoch_batches(a, 1)
    assert [i for bt in e0 for i in bt if i < 30] != [i for bt in e1 for i in bt if i < 30]
    assert [i for bt in e0 for i in bt if i >= 30] != [i for bt in e1 for i in bt if i >= 30]
    assert epoch_batches(MixedBatchSampler(30, 17, 8, 0.5, seed=5), 0) != e0


def test_sampler_labelled_order_is_the_distributed_samplers():
    for rank in range(2):
        s = MixedBatchSampler(11, 40, 4, 0.5, seed=7, rank=rank, world_size=2)
        d = DistributedSampler(list(range(11)), num_replicas=2, rank=rank, shuffle=True, seed=7)
        for epoch in (0, 1):
            d.set_epoch(epoch)
            labeled = [i for b in epoch_batches(s, epoch) for i in b if i < 11]
            assert labeled == list(d)[:len(labeled)] and len(labeled) == 6


def test_sampler_shards_disjointly_across_two_ranks():
    n_l, n_u = 24, 100
    ranks = [MixedBatchSampler(n_l, n_u, 6, 0.5, seed=1, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 4  # 12 labelled a rank, 3 a batch
    for epoch in (0, 1):
        b0, b1 = (epoch_batches(s, epoch) for s in ranks)
        i0, i1 = {i for b in b0 for i in b}, {i for b in b1 for i in b}
        assert not i0 & i1
        assert {i for i in i0 | i1 if i < n_l} == set(range(n_l))
        assert len({i for i in i0 | i1 if i >= n_l}) == 2 * 4 * 3


def test_sampler_unlabelled_stream_covers_the_pool_evenly():
    # 7 unlabelled images, 2 drawn per batch, 5 batches an epoch: 10 per epoch, 70 over 7 epochs
    s = MixedBatchSampler(10, 7, 4, 0.5, seed=0)
    counts = np.zeros(7, int)
    for epoch in range(7):
        for b in epoch_batches(s, epoch):
            for i in b[2:]:
                counts[i - 10] += 1
    assert counts.tolist() == [10] * 7


def test_mixed_shares_rejects_ratios_that_leave_a_share_empty():
    assert mixed_shares(8, 0.25) == (6, 2)
    for ratio in (0.0, 1.0, 0.05, 0.95, "half", None, True):
        with pytest.raises(ConfigError, match=r"data\.unlabeled_ratio"):
            mixed_shares(8, ratio)


# -- the readers ---------------------------------------------------------------------------------

def make_folder(root: Path) -> Path:
    write_image(root / "a.jpg", seed=1)
    write_image(root / "sub" / "b.PNG", h=20, w=50, seed=2)
    write_image(root / "sub" / "deeper" / "c.webp", seed=3)
    (root / "notes.txt").write_text("not an image")
    return root


def test_folder_dataset_yields_unlabelled_items(tmp_path):
    voc = write_voc(tmp_path / "voc")
    folder = make_folder(tmp_path / "extra")
    ds = build_unlabeled({**CFG, "root": str(voc), "unlabeled": str(folder)}, ["cat", "dog"], seed=0)
    assert len(ds) == 3 and ds.classes == ["cat", "dog"]
    assert [r.id for r in ds.records] == ["a", "sub/b", "sub/deeper/c"]
    for i in range(3):
        s = ds.load_sample(i)
        assert not s.has_det and not s.has_seg and s.mask is None and len(s.boxes) == 0 and len(s.labels) == 0
        item = ds[i]
        assert item["image"].shape == (3, 64, 64) and not item["has_det"] and not item["has_seg"]
        assert (item["mask"] == VOID).all() and item["boxes"].shape == (0, 4) and item["index"] == i
    assert ds.load_sample(1).size == (20, 50)


def test_split_name_readers_ignore_labels(tmp_path):
    voc = write_voc(tmp_path / "voc")
    (voc / "ImageSets" / "Main" / "extra.txt").write_text("c\nb\n")  # c has no XML: none is needed
    ds = build_unlabeled({**CFG, "root": str(voc), "unlabeled": "extra"}, ["cat", "dog"], seed=0)
    assert [r.id for r in ds.records] == ["b", "c"]
    assert not any(r.has_det or r.has_seg for r in ds.records) and len(ds.load_sample(0).boxes) == 0

    data_yaml = write_yolo(tmp_path / "yolo")
    ds = build_unlabeled({**CFG, "format": "yolo", "root": str(data_yaml), "unlabeled": "train"}, ["p", "q"])
    labeled = build_dataset({**CFG, "format": "yolo", "root": str(data_yaml)}, "train", train=False)
    assert [r.image_path for r in ds.records] == [r.image_path for r in labeled.records]
    assert all(len(ds.load_sample(i).boxes) == 0 and not ds.load_sample(i).has_seg for i in range(len(ds)))

    coco = tmp_path / "coco"
    write_image(coco / "images" / "unl" / "x.jpg", seed=5)
    write_image(coco / "images" / "unl" / "y.jpg", seed=6)
    (coco / "annotations").mkdir(parents=True)
    (coco / "annotations" / "instances_unl.json").write_text(json.dumps(
        {"images": [{"id": 9, "file_name": "y.jpg"}, {"id": 2, "file_name": "x.jpg"}]}))
    ds = build_unlabeled({**CFG, "format": "coco", "root": str(coco), "unlabeled": "unl"}, ["a"])
    assert [r.id for r in ds.records] == ["x", "y"]


@pytest.mark.parametrize("escape", ["../../outside.jpg", "ABSOLUTE"])
def test_coco_unlabeled_file_name_outside_the_image_folder_is_refused(tmp_path, escape):
    coco = tmp_path / "coco"
    write_image(coco / "images" / "unl" / "x.jpg", seed=5)
    outside = coco / "outside.jpg"  # exists, so only the confinement check can refuse it
    write_image(outside, seed=6)
    file_name = str(outside) if escape == "ABSOLUTE" else escape
    ann = coco / "annotations" / "instances_unl.json"
    ann.parent.mkdir(parents=True)
    ann.write_text(json.dumps({"images": [{"id": 2, "file_name": "x.jpg"}, {"id": 7, "file_name": file_name}]}))
    with pytest.raises(DataError) as info:
        build_unlabeled({**CFG, "format": "coco", "root": str(coco), "unlabeled": "unl"}, ["a"])
    msg = str(info.value)
    assert "\n" not in msg and str(ann) in msg and "image 7 " in msg and "outside" in msg


def test_missing_folder_or_split_is_one_line_error_naming_key_and_path(tmp_path):
    voc = write_voc(tmp_path / "voc")
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError) as info:
        build_unlabeled({**CFG, "root": str(voc), "unlabeled": str(missing)}, ["cat", "dog"])
    msg = str(info.value)
    assert "data.unlabeled" in msg and str(missing) in msg and "\n" not in msg
    with pytest.raises(DataError) as info:
        build_unlabeled({**CFG, "root": str(voc), "unlabeled": "no_such_split"}, ["cat", "dog"])
    msg = str(info.value)
    assert "data.unlabeled" in msg and "no_such_split.txt" in msg and "\n" not in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"data\.unlabeled: no images"):
        build_unlabeled({**CFG, "root": str(voc), "unlabeled": str(tmp_path / "empty")}, ["cat", "dog"])


def test_corrupt_image_follows_skip_bad(tmp_path):
    voc = write_voc(tmp_path / "voc")
    folder = make_folder(tmp_path / "extra")
    bad = folder / "sub" / "b.PNG"
    bad.write_bytes(b"not a png")
    cfg = {**CFG, "root": str(voc), "unlabeled": str(folder)}
    ds = build_unlabeled(cfg, ["cat", "dog"])
    with pytest.raises(DataError, match=re.escape(str(bad))):
        ds[1]
    ds = build_unlabeled({**cfg, "skip_bad": True}, ["cat", "dog"])
    with pytest.warns(UserWarning, match=re.escape(str(bad))):
        item = ds[1]
    assert item["id"] == "sub/deeper/c" and ds.skipped == [str(bad)]


def test_mixed_loader_same_batches_with_and_without_workers(tmp_path):
    voc = write_voc(tmp_path / "voc")
    folder = make_folder(tmp_path / "extra")
    cfg = {**CFG, "root": str(voc), "unlabeled": str(folder), "augment": {"hflip": 0.0, "scale": None,
                                                                           "color": 0.0}}
    labeled = build_dataset(cfg, "train", train=True, seed=0)
    mixed = MixedDataset(labeled, build_unlabeled(cfg, labeled.classes, seed=0))
    runs = []
    for workers in (0, 2):
        sampler = MixedBatchSampler(len(labeled), 3, 2, 0.5, seed=0)
        loader = DataLoader(mixed, batch_sampler=sampler, num_workers=workers, collate_fn=collate)
        seen = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            seen += [(b["index"].tolist(), b["has_det"].tolist(), b["has_seg"].tolist(), b["images"])
                     for b in loader]
        runs.append(seen)
    assert len(runs[0]) == 2 * 3
    for (i0, d0, s0, x0), (i1, d1, s1, x1) in zip(*runs):
        assert i0 == i1 and d0 == d1 and s0 == s1 and torch.equal(x0, x1)
        assert i0[1] >= 3 and not d0[1] and not s0[1]  # the unlabelled half, index shifted past the labelled
    assert {i for r in runs[0] for i in r[0][1:]} <= {3, 4, 5}


# -- the hard losses on unlabelled samples -------------------------------------------------------

def _outputs(b: int, nc: int = 2, size: int = 64, seed: int = 0):
    from mtkd.models import build_model

    torch.manual_seed(seed)
    model = build_model({"preset": "student"}, nc).eval()
    with torch.no_grad():
        out = model(torch.randn(b, 3, size, size))
    det = out["det"]
    leaves = {"cls": det.cls, "obj": det.obj, "box": det.box}
    if det.box_dist is not None:
        leaves["box_dist"] = det.box_dist
    leaves = {k: v.clone().requires_grad_(True) for k, v in leaves.items()}
    seg = out["seg"].clone().requires_grad_(True)

    def view(rows):
        d = DetOutput(anchors=det.anchors, strides=det.strides, obj_is_proxy=det.obj_is_proxy,
                      **{k: v[rows] for k, v in leaves.items()})
        return {"det": d, "seg": seg[rows]}

    return view, leaves, seg


def _batch(has: list, size: int = 64) -> dict:
    b = len(has)
    boxes = [torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]]) if h else torch.zeros(0, 4)
             for h in has]
    labels = [torch.tensor([0, 1]) if h else torch.zeros(0, dtype=torch.long) for h in has]
    masks = torch.full((b, size, size), VOID, dtype=torch.long)
    for i, h in enumerate(has):
        if h:
            masks[i] = 0
            masks[i, 6:40, 4:30] = 1
            masks[i, 10:50, 20:60] = 2
    flags = torch.tensor(has)
    return {"images": torch.zeros(b, 3, size, size), "boxes": boxes, "labels": labels, "masks": masks,
            "has_det": flags, "has_seg": flags.clone(),
            "letterbox": torch.tensor([[1.0, 0.0, 0.0]] * b), "orig_sizes": torch.tensor([[size, size]] * b)}


def test_hard_losses_zero_and_finite_on_an_all_unlabelled_batch():
    from mtkd.losses.det_hard import YoloDetLoss
    from mtkd.losses.seg_hard import SegCELoss

    view, leaves, seg = _outputs(3)
    out = view(slice(None))
    batch = _batch([False, False, False])
    det = YoloDetLoss()(out, None, batch)
    ce = SegCELoss(dice=1.0)(out, None, batch)
    total = sum(det.values()) + sum(ce.values())
    for name, v in {**det, **ce}.items():
        assert torch.isfinite(v) and float(v.detach()) == 0.0, name
    total.backward()  # graph-connected, all-zero gradients
    assert seg.grad is not None and leaves["cls"].grad is not None
    for t in [*leaves.values(), seg]:
        assert t.grad is None or (torch.isfinite(t.grad).all() and t.grad.abs().sum() == 0)


def test_unlabelled_samples_add_nothing_to_the_hard_losses_of_a_mixed_batch():
    from mtkd.losses.det_hard import YoloDetLoss
    from mtkd.losses.seg_hard import SegCELoss

    view, leaves, seg = _outputs(4, seed=1)
    has = [True, False, True, False]
    mixed = _batch(has)
    lab = [0, 2]
    only = {k: (v[lab] if isinstance(v, torch.Tensor) else [v[i] for i in lab]) for k, v in mixed.items()}
    for loss in (YoloDetLoss(), SegCELoss()):
        full, sub = loss(view(slice(None)), None, mixed), loss(view(lab), None, only)
        assert set(full) == set(sub)
        for k in full:
            assert torch.isfinite(full[k]) and float(full[k].detach()) > 0, k
            assert torch.allclose(full[k], sub[k], rtol=1e-5, atol=1e-6), k
        grads = torch.autograd.grad(sum(full.values()), [*leaves.values(), seg], allow_unused=True)
        for g in grads:
            if g is not None:
                assert g[[1, 3]].abs().sum() == 0
