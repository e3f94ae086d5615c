"""benchmarks/kd_unlabeled: pseudo-label thresholding, the split writer, verdicts and one tiny end-to-end run."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mtkd  # noqa: F401  (offline switches first)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _load():
    spec = importlib.util.spec_from_file_location("bench_kd_unlabeled", ROOT / "benchmarks" / "kd_unlabeled" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ku = _load()


# -- pseudo-labels ------------------------------------------------------------------------------
def test_threshold_pseudo_keeps_confident_boxes_and_pixels() -> None:
    boxes = torch.tensor([[1.0, 2.0, 10.0, 12.0],       # 0.9: kept
                          [0.004, 0.0, 5.126, 6.0],      # 0.5: kept (>=), rounded to 0.01 px
                          [3.0, 3.0, 9.0, 9.0],          # 0.49: dropped
                          [4.0, 4.0, 4.001, 8.0]])       # 0.95 but empty once rounded: dropped
    scores = torch.tensor([0.9, 0.5, 0.49, 0.95])
    labels = torch.tensor([2, 0, 1, 1])
    # 3 channels (background + 2 classes) on a 2x2 image
    logits = torch.zeros(3, 2, 2)
    logits[2, 0, 0] = 5.0          # class 1 (mask value 2), confident
    logits[0, 0, 1] = 5.0          # background, confident
    logits[1, 1, 0] = 0.5          # class 0 leads but softmax max ~0.45 < 0.5: void
    # (1, 1): uniform, max 1/3: void
    b, lab, mask = ku.threshold_pseudo(boxes, scores, labels, logits, 0.5)
    assert b.dtype == np.float32 and lab.dtype == np.int64 and mask.dtype == np.uint8
    np.testing.assert_allclose(b, [[1.0, 2.0, 10.0, 12.0], [0.0, 0.0, 5.13, 6.0]], atol=1e-5)
    assert lab.tolist() == [2, 0]
    assert mask.tolist() == [[2, 0], [255, 255]]
    # a lower threshold labels every pixel with its arg-max; a higher one keeps no box
    assert ku.threshold_pseudo(boxes, scores, labels, logits, 0.3)[2].tolist() == [[2, 0], [1, 0]]
    b, lab, _ = ku.threshold_pseudo(boxes, scores, labels, None, 0.99)
    assert b.shape == (0, 4) and lab.shape == (0,)
    # numpy inputs work too, and no seg head gives no mask
    b, lab, mask = ku.threshold_pseudo(boxes.numpy(), scores.numpy(), labels.numpy(), None, 0.5)
    assert len(b) == 2 and mask is None


def test_voc_xml_reads_back_as_the_same_boxes(tmp_path: Path) -> None:
    from mtkd.datasets.voc import parse_voc_xml

    path = tmp_path / "a.xml"
    path.write_bytes(ku.voc_xml("a", 48, 64, np.array([[0.0, 1.5, 63.99, 48.0]], np.float32), np.array([1]),
                                ["x", "y"]))
    size, objects = parse_voc_xml(path)
    assert size == (48, 64)
    assert objects[0]["name"] == "y" and objects[0]["box"] == pytest.approx([0.0, 1.5, 63.99, 48.0], abs=1e-6)
    path.write_bytes(ku.voc_xml("a", 48, 64, np.zeros((0, 4)), np.zeros(0), ["x"]))
    assert parse_voc_xml(path) == ((48, 64), [])


# -- splits and budgets -------------------------------------------------------------------------
def _fake_voc(root: Path, n: int, no_seg: int = 0) -> list:
    ids = [f"train_{i:05d}" for i in range(n)]
    for sub, part in (("Main", ids), ("Segmentation", ids[no_seg:])):
        (root / "ImageSets" / sub).mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / sub / "train.txt").write_text("".join(f"{i}\n" for i in part))
    return ids


def _ids(path: Path) -> list:
    return path.read_text().split()


def test_write_splits_is_deterministic_disjoint_and_sized(tmp_path: Path) -> None:
    ids = _fake_voc(tmp_path, 50, no_seg=3)
    assert ku.split_names("train", 0.1) == ("train_l10", "train_u90")
    assert ku.split_names("train", 0.25) == ("train_l25", "train_u75")
    s = ku.write_splits(tmp_path, "train", 0.1, 0)
    assert (s["labeled"], s["unlabeled"]) == ("train_l10", "train_u90")
    assert len(s["written"]) == 4
    lab, unl = s["labeled_ids"], s["unlabeled_ids"]
    assert len(lab) == 5 and len(unl) == 45 and not set(lab) & set(unl) and sorted(lab + unl) == ids
    main = tmp_path / "ImageSets" / "Main"
    seg = tmp_path / "ImageSets" / "Segmentation"
    assert _ids(main / "train_l10.txt") == lab and _ids(main / "train_u90.txt") == unl
    assert _ids(seg / "train_l10.txt") + _ids(seg / "train_u90.txt") == [i for i in lab + unl if i not in ids[:3]]
    # the same call writes nothing and cuts the same way; another seed cuts otherwise
    again = ku.write_splits(tmp_path, "train", 0.1, 0)
    assert again["written"] == [] and again["labeled_ids"] == lab
    other = ku.split_ids(ids, 0.1, 1)
    assert other[0] != lab and len(other[0]) == 5
    # a file changed by hand is rewritten, only that one
    (main / "train_l10.txt").write_text("train_00000\n")
    assert ku.write_splits(tmp_path, "train", 0.1, 0)["written"] == [str(main / "train_l10.txt")]
    assert _ids(main / "train_l10.txt") == lab
    # at least one id on each side
    assert [len(p) for p in ku.split_ids(ids[:3], 0.01, 0)] == [1, 2]
    assert [len(p) for p in ku.split_ids(ids[:3], 0.99, 0)] == [2, 1]


def test_budget_overrides_end_the_schedule_at_the_step_budget() -> None:
    assert ku.loader_steps(4000, 16) == 250 and ku.loader_steps(400, 16) == 25 and ku.loader_steps(2, 4) == 1
    assert ku.mixed_steps(400, 3600, 16, 0.5) == 50  # 8 labelled images per batch
    ov = ku.budget_overrides(3000, 25, 125, 250)
    assert ov == ["train.epochs=120", "train.max_steps=3000", "train.val_every=10", "train.warmup_epochs=5.0"]
    assert ku.budget_overrides(3000, 250, 125, 250)[0::2] == ["train.epochs=12", "train.val_every=1"]
    assert ku.budget_overrides(7, 3, 0, 250) == ["train.epochs=3", "train.max_steps=7", "train.val_every=83",
                                                 "train.warmup_epochs=0.0"]


def _rec(role: str, seed: int, m5095: float, m50: float, miou: float) -> dict:
    return {"role": role, "seed": seed, "map50_95": m5095, "map50": m50, "miou": miou}


def test_verdicts_gap_closed_targets() -> None:
    runs = [_rec("teacher", 0, 0.6, 0.9, 0.8)]
    for s in range(3):
        runs += [_rec("plain", s, 0.20 + 0.01 * s, 0.4, 0.30 + 0.01 * s),
                 _rec("plain_all", s, 0.40, 0.7, 0.61),
                 _rec("kd", s, 0.35 + 0.01 * s, 0.6, 0.50),
                 _rec("pseudo", s, 0.30, 0.5, 0.52)]
    lines, summary = ku.verdicts(runs)
    assert summary["gap"]["map50_95"] == pytest.approx(0.19)
    assert summary["closed"]["kd"]["map50_95"] == pytest.approx((0.36 - 0.21) / 0.19)
    assert summary["closed"]["pseudo"]["miou"] == pytest.approx((0.52 - 0.31) / 0.30)
    assert summary["worst_kd_above_best_plain"] == {"map50_95": True, "map50": True, "miou": True}
    assert summary["kd_ge_pseudo"] == {"map50_95": True, "map50": True, "miou": False}
    t = summary["targets"]
    assert t["kd closes >= 50% of the gap"] is True
    assert t["worst kd seed above best plain seed"] is True
    assert t["median kd >= median pseudo"] is False  # mIoU: 0.50 < 0.52
    assert any(line.startswith("mIoU: gap") and "kd < pseudo" in line for line in lines)
    assert "target: median kd >= median pseudo on mAP50-95 and mIoU: NOT MET" in lines
    # before the references exist nothing is judged
    lines, summary = ku.verdicts([r for r in runs if r["role"] != "plain_all"])
    assert summary["targets"] == {} and "not yet measurable" in lines[-1]
    # kd still missing: targets wait
    lines, summary = ku.verdicts([r for r in runs if r["role"] != "kd"])
    assert summary["targets"]["kd closes >= 50% of the gap"] is None
    # no gap to close (plain_all not above plain) with kd measured: NOT MET, not "not measurable"
    flat = [dict(r, miou=0.31) if r["role"] == "plain_all" else r for r in runs]
    lines, summary = ku.verdicts(flat)
    assert summary["closed"]["kd"]["miou"] is None and summary["targets"]["kd closes >= 50% of the gap"] is False
    assert any(line.startswith("mIoU: gap") and "closed by median kd n/a (no gap)" in line for line in lines)


# -- end to end ---------------------------------------------------------------------------------
def _teacher_with_confident_heads(path: Path, classes: list) -> Path:
    """A random teacher_small checkpoint whose heads are biased so that thresholded pseudo-labels
    hold boxes and both labelled and void pixels (a random init scores ~1e-5)."""
    from benchmarks.common import random_checkpoint

    random_checkpoint(path, {"preset": "teacher_small"}, classes)
    ck = torch.load(path, weights_only=True)
    sd = ck["model"]
    for k in list(sd):
        if k.startswith("det_head.obj_pred.") and k.endswith(".bias"):
            sd[k].fill_(4.0)
        elif k.startswith("det_head.cls_branch.") and k.endswith(".2.bias"):
            sd[k].fill_(-6.0)
            sd[k][0], sd[k][3] = 0.5, 0.0
    sd["seg_head.classifier.bias"].zero_()
    sd["seg_head.classifier.bias"][0] = 2.6  # background prob ~0.5 over 13 channels
    torch.save(ck, path)
    return path


@pytest.mark.slow
def test_kd_unlabeled_tiny_end_to_end(tmp_path: Path) -> None:
    from mtkd.datasets import make_synthetic
    from mtkd.datasets.voc import parse_voc_xml

    make_synthetic(tmp_path / "d", n_train=20, n_val=4, n_test=4, imgsz=(64, 64), formats=("voc",))
    voc = tmp_path / "d" / "voc"
    classes = (voc / "classes.txt").read_text().split()
    ckpt = _teacher_with_confident_heads(tmp_path / "teacher.pt", classes)
    out = tmp_path / "out"
    argv = ["--data", str(tmp_path / "d"), "--teacher-ckpt", str(ckpt), "--out", str(out), "--steps", "2",
            "--seeds", "0", "--jobs", "1", "--set", "train.batch=4", "--set", "data.imgsz=64"]
    payload = ku.main(argv)

    # splits: 10% / 90% of the 20 training ids, disjoint
    train_ids = _ids(voc / "ImageSets" / "Main" / "train.txt")
    for sub in ("Main", "Segmentation"):
        lab = _ids(voc / "ImageSets" / sub / "train_l10.txt")
        unl = _ids(voc / "ImageSets" / sub / "train_u90.txt")
        assert len(lab) == 2 and len(unl) == 18 and not set(lab) & set(unl) and sorted(lab + unl) == train_ids

    # records: the four roles and the teacher, finite metrics, students at the step budget
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(payload, default=str))
    runs = {r["role"]: r for r in saved["runs"]}
    assert set(runs) == {"teacher", "plain", "kd", "pseudo", "plain_all"}
    for role, r in runs.items():
        assert all(isinstance(r[m], float) and math.isfinite(r[m]) for m in ("map50_95", "map50", "miou")), role
    assert saved["budget"]["steps"] == 2
    for role in ("plain", "kd", "pseudo", "plain_all"):
        assert runs[role]["steps"] == runs[role]["budget_steps"] == 2, role
    assert runs["plain"]["train_images"] == runs["kd"]["train_images"] == 2
    assert runs["pseudo"]["train_images"] == runs["plain_all"]["train_images"] == 20
    assert saved["derived"] and "target:" in (out / "results.md").read_text()

    # the pseudo tree: real labels for the 10% and val/test, teacher's labels for the 90%
    pv = out / "pseudo_voc"
    nc = len(classes)
    assert (pv / "classes.txt").read_text().split() == classes
    assert sorted(_ids(pv / "ImageSets" / "Main" / "train.txt")) == train_ids
    for split in ("val", "test"):
        assert _ids(pv / "ImageSets" / "Main" / f"{split}.txt") == _ids(voc / "ImageSets" / "Main" / f"{split}.txt")
    lab = set(_ids(voc / "ImageSets" / "Main" / "train_l10.txt"))
    n_boxes, values = 0, set()
    for img_id in _ids(voc / "ImageSets" / "Main" / "train_u90.txt"):
        xml, png = pv / "Annotations" / f"{img_id}.xml", pv / "SegmentationClass" / f"{img_id}.png"
        assert not xml.is_symlink() and not png.is_symlink()
        (h, w), objects = parse_voc_xml(xml)
        for o in objects:
            x1, y1, x2, y2 = o["box"]
            assert o["name"] in classes
            assert -1e-3 <= x1 < x2 <= w + 1e-3 and -1e-3 <= y1 < y2 <= h + 1e-3
        n_boxes += len(objects)
        with Image.open(png) as im:
            assert im.mode == "P" and im.size == (w, h)
            values |= set(np.unique(np.array(im)).tolist())
    assert n_boxes > 0
    assert values <= set(range(nc + 1)) | {255} and 255 in values and len(values) > 1
    for img_id in lab:
        assert (pv / "Annotations" / f"{img_id}.xml").resolve() == (voc / "Annotations" / f"{img_id}.xml").resolve()
    info = json.loads((pv / "pseudo.json").read_text())
    assert info["images"] == 18 and info["boxes"] == n_boxes and 0 < info["void_fraction"] < 1
    assert saved["pseudo_labels"]["boxes"] == n_boxes

    # a second sitting runs nothing again and reuses the pseudo tree
    stamp = (out / "runs" / "kd_s0" / "test_metrics.json").stat().st_mtime_ns
    tree = (pv / "pseudo.json").stat().st_mtime_ns
    again = ku.main(argv)
    assert [(r["role"], r["seed"]) for r in again["runs"]] == [(r["role"], r["seed"]) for r in saved["runs"]]
    assert (out / "runs" / "kd_s0" / "test_metrics.json").stat().st_mtime_ns == stamp
    assert (pv / "pseudo.json").stat().st_mtime_ns == tree
    assert saved["budget"]["pseudo_conf"] == "auto" and len(info["val_f1_by_conf"]) == len(ku.CONF_GRID)
    assert info["pseudo_conf"] in ku.CONF_GRID
    # other pseudo-label settings redo the pseudo role only
    kd_stamp = (out / "runs" / "kd_s0" / "test_metrics.json").stat().st_mtime_ns
    redone = ku.main(argv + ["--pseudo-conf", "0.4"])
    assert sorted((r["role"], r["seed"]) for r in redone["runs"]) == sorted((r["role"], r["seed"]) for r in saved["runs"])
    assert (out / "runs" / "kd_s0" / "test_metrics.json").stat().st_mtime_ns == kd_stamp
    assert json.loads((pv / "pseudo.json").read_text())["pseudo_conf"] == 0.4
    assert redone["budget"]["pseudo_conf"] == 0.4
    with pytest.raises(SystemExit, match="unlabeled_ratio"):
        ku.main(argv + ["--pseudo-conf", "0.4", "--unlabeled-ratio", "0.25"])


def test_f1_by_threshold_matches_greedily_by_score_and_class() -> None:
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], np.float32)
    scores = np.array([0.9, 0.8, 0.3, 0.6], np.float32)
    labels = np.array([0, 0, 1, 0])
    truth = (np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32), np.array([0, 1]))
    f1 = ku.f1_by_threshold([(boxes, scores, labels)], [truth], [0.2, 0.5, 0.85, 0.95])
    # 0.2: 4 kept, 2 hits (the duplicate and the far box miss); 0.5: 3 kept, 1 hit; 0.85: 1 kept, 1 hit
    assert f1 == pytest.approx({0.2: 2 * 2 / (4 + 2), 0.5: 2 * 1 / (3 + 2), 0.85: 2 * 1 / (1 + 2), 0.95: 0.0})
    wrong_class = ku.f1_by_threshold([(boxes[:1], scores[:1], np.array([1]))], [truth], [0.5])
    assert wrong_class == {0.5: 0.0}
    assert ku.f1_by_threshold([(np.zeros((0, 4)), np.zeros(0), np.zeros(0))], [truth], [0.5]) == {0.5: 0.0}


def test_pseudo_conf_argument() -> None:
    assert ku._conf_arg("auto") == "auto" and ku._conf_arg("0.25") == 0.25
    for bad in ("0", "1.5", "high"):
        with pytest.raises(Exception, match="auto|\\(0, 1\\]"):
            ku._conf_arg(bad)
