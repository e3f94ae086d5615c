#!/usr/bin/env python
"""Benchmark: distillation on unlabeled images (the student sees labels for 10% of the images).

What it measures: how much of the gap between a student trained on 10% of the
labels (``plain``) and one trained on all of them (``plain_all``) a teacher
closes by supervising the other 90% of the images without their labels
(``kd``), compared with the classic baseline of training on the teacher's
thresholded hard pseudo-labels (``pseudo``).

Protocol (small testbed by default: ``data/small``, ``mtkd/configs/small/``):

* **Splits.** The student's training split (the student config's
  ``data.train``, ``train``) is cut by a fixed permutation of its sorted ids,
  seeded by ``--split-seed`` (default 0), into ``train_l10`` (the labelled
  ``--labeled-fraction``, default 0.1, rounded, at least one id) and
  ``train_u90`` (the rest; the names follow the fraction). Both are written
  into the student's VOC tree as ``ImageSets/Main/<name>.txt`` and
  ``ImageSets/Segmentation/<name>.txt`` (each holding the ids of the part that
  the source split's list of the same folder holds), **only when a file is
  missing or its content differs**; nothing else in the tree is touched.
* **Teacher.** Trained on labels disjoint from the student's set: a second
  synthetic set from another generator seed (``make_synthetic(<teacher-data>,
  seed=1, **TESTBEDS[testbed], formats=("voc",))``, written when missing to
  ``--teacher-data``, default ``<data>_teacher``), trained with the teacher
  config on that set's ``train`` split, ``best.pt`` chosen on that set's own
  ``val`` split, into the folder of ``--teacher-ckpt`` (default
  ``runs/<testbed>/teacher_disjoint/best.pt``; an existing checkpoint is
  reused as is). No label of the student's set reaches it. Its ``teacher``
  record is the checkpoint evaluated on the student's TEST split (as in
  ``benchmarks/kd_gain``).
* **Roles** (students, over ``--seeds``, default 0 1 2):

  - ``plain``: the student config on ``data.train=train_l10`` (labels only);
  - ``kd``: the KD config with ``teacher.ckpt`` = the teacher,
    ``data.train=train_l10``, ``data.unlabeled=train_u90`` and
    ``data.unlabeled_ratio=--unlabeled-ratio`` (default 0.5): the teacher's
    soft targets on every image, the labels on the 10%;
  - ``pseudo``: the student config on ``<out>/pseudo_voc``, a VOC tree whose
    ``train`` split is the 10% real labels plus the teacher's hard
    pseudo-labels of the 90%: the teacher is run once over the ``train_u90``
    images (eval transform, the teacher config's ``eval.iou``/``max_det``
    NMS, boxes and logits mapped back to original pixels as the evaluator
    does); detections with score >= ``--pseudo-conf`` are kept as boxes,
    and each pixel gets the teacher's arg-max class where its softmax
    maximum is >= ``--pseudo-pixel-conf`` (0.5), else void (255). The box
    threshold ``auto`` (the default) is the one of :data:`CONF_GRID` whose
    teacher detections have the best F1 on the VAL split's labels (IoU >=
    0.5, same class; :func:`choose_box_conf`): the score scale of a
    detector's ``cls x obj`` product is not a probability, and a fixed 0.5
    can keep a fraction of the objects, teaching the student that the rest
    are background. Boxes are
    rounded to 0.01 px; one that is then empty (no VOC file can hold it) is
    dropped. ``JPEGImages`` is a symlink to the student's; the real labels
    (the 10% and the ``val``/``test`` splits, so students are still selected
    and scored on the real val/test labels) are symlinked file by file.
    ``pseudo_voc/pseudo.json`` records the teacher's SHA-256, the thresholds
    (and the val F1 of every candidate), the splits and counts (boxes per image, void share, pixel accuracy of the
    confident pixels against the withheld labels); the tree is rebuilt only
    when one of those inputs changed;
  - ``plain_all``: the student config on every label (``data.train=train``),
    the upper reference.
* **Equal budgets.** Every student trains ``--steps`` optimizer steps
  (default: the student config's ``train.epochs`` x steps per epoch of the
  FULL training set at its ``train.batch``, i.e. what ``plain_all`` does at
  the config's epochs) through ``train.max_steps``, with ``train.epochs`` =
  ceil(steps / steps per epoch of the role's own loader), so the LR schedule
  ends exactly at the budget. The warm-up is the same number of steps for
  every role (the config's ``warmup_epochs`` of the full set, passed as
  ``train.warmup_epochs`` in each role's epochs), and ``train.val_every`` is
  the number of the role's epochs closest to ``--val-steps`` (250) steps,
  at least 1 (an epoch of ``kd`` is one pass over the labelled images at
  their share of each batch). Records carry ``steps`` as run and the
  planned ``budget_steps``.
* **Verdicts** (``results.md``'s lines, the JSON's ``derived`` and
  ``summary``), per metric (mAP50-95, mAP50, mIoU), on the TEST split:
  the gap between the median ``plain`` and the median ``plain_all``, the
  fraction of it closed by the median ``kd`` and by the median ``pseudo``,
  the worst ``kd`` seed against the best ``plain`` seed, and the median
  ``kd`` against the median ``pseudo``. Targets, judged on mAP50-95 and
  mIoU (mAP50 is reported only): KD closes >= 50% of the gap; the worst KD
  seed is above the best plain seed; the median KD is >= the median pseudo;
  each MET / NOT MET.

Runs go ``--jobs`` at a time (default 2 on 2+ cores), one torch thread each,
seed-major so the roles interleave, each into ``<out>/runs/<role>_s<seed>``;
records go to ``<out>/results.json`` as they finish and a (role, seed)
already there is skipped, so the benchmark resumes across sittings
(``--force`` re-runs). A sitting whose steps, split, ratio, ``--set``
overrides or teacher (SHA-256) differ from the stored runs' stops with an
error instead of mixing them; one whose pseudo-label thresholds differ
re-runs the ``pseudo`` role only.

    python benchmarks/kd_unlabeled/run.py                     # small testbed -> benchmarks/kd_unlabeled/
    python benchmarks/kd_unlabeled/run.py --seeds 0           # one seed first; later sittings add the rest
    python benchmarks/kd_unlabeled/run.py --teacher-ckpt runs/small/teacher_disjoint/best.pt --steps 3000

The teacher's set can also be written by hand beforehand (the same call)::

    mtkd make-synthetic --testbed small --seed 1 --formats voc --out data/small_teacher

Tiny check (seconds; a random teacher, whose pseudo-labels at 0.5 are empty:
only the plumbing runs; ``tests/test_bench_kd_unlabeled.py`` biases its heads
so that boxes and masks are written)::

    mtkd make-synthetic --testbed small --n-train 20 --n-val 4 --n-test 4 --formats voc --out /tmp/unl
    python -c "from benchmarks.common import random_checkpoint as r; \\
        r('/tmp/unl_t.pt', {'preset': 'teacher_small'}, open('/tmp/unl/voc/classes.txt').read().split())"
    python benchmarks/kd_unlabeled/run.py --data /tmp/unl --teacher-ckpt /tmp/unl_t.pt --out /tmp/unl_out \\
        --steps 2 --seeds 0 --jobs 1 --set train.batch=4
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (TESTBEDS, Results, add_common_args, data_overrides, default_jobs,  # noqa: E402
                               ensure_testbed_data, extra_overrides, gap_closed, make_record, median_of,
                               run_config, run_jobs, testbed_paths)
from benchmarks.kd_gain.run import file_sha256, teacher_record  # noqa: E402

NAME = "kd_unlabeled"
ROLES = ("plain", "kd", "pseudo", "plain_all")
"""Student roles, in the order they are planned for each seed."""
TEACHER_DATA_SEED = 1
"""Generator seed of the teacher's synthetic set (the student's set uses 0)."""
TARGET_GAP = 0.5
"""The median KD must close at least this fraction of the plain -> plain_all gap."""
TARGET_METRICS = ("map50_95", "miou")
"""Metrics the targets are judged on (mAP50 is reported beside them)."""
METRIC_NAMES = {"map50_95": "mAP50-95", "map50": "mAP50", "miou": "mIoU"}
VAL_STEPS = 250
VOID = 255
CHECKED = ("steps", "labeled_fraction", "split_seed", "unlabeled_ratio", "pseudo_conf", "pseudo_pixel_conf",
           "overrides")
#: Box-score thresholds ``--pseudo-conf auto`` chooses from.
CONF_GRID = tuple(round(0.05 * k, 2) for k in range(1, 19))


def _conf_arg(text: str) -> Any:
    """``--pseudo-conf``: ``auto`` or a number in (0, 1]."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value
"""Budget keys that must match the stored runs' for a sitting to add to them."""


def log(msg: str) -> None:
    print(f"[{NAME}] {msg}", flush=True)


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, default_out=str(ROOT / "benchmarks" / NAME), default_data=None, seeds=(0, 1, 2))
    p.add_argument("--testbed", choices=sorted(TESTBEDS), default="small",
                   help="small: the 64-px testbed whose models train in minutes (default); large: the 128-px one")
    p.add_argument("--teacher-data", default=None,
                   help="the teacher's labelled set, disjoint from --data; written (generator seed 1, the testbed's "
                        "sizes) when missing and the teacher must be trained (default <data>_teacher)")
    p.add_argument("--teacher-ckpt", default=None,
                   help="teacher checkpoint, reused when it exists, else trained on --teacher-data into its folder "
                        "(default runs/<testbed>/teacher_disjoint/best.pt)")
    p.add_argument("--teacher-config", default=None, help="default: the testbed's teacher config")
    p.add_argument("--student-config", default=None, help="default: the testbed's student config")
    p.add_argument("--kd-config", default=None, help="default: the testbed's KD config")
    p.add_argument("--labeled-fraction", type=float, default=0.1,
                   help="share of the training images whose labels the students see (default 0.1)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the labelled/unlabelled permutation (0)")
    p.add_argument("--unlabeled-ratio", type=float, default=0.5,
                   help="kd: data.unlabeled_ratio, the unlabelled share of each batch (default 0.5)")
    p.add_argument("--pseudo-conf", type=_conf_arg, default="auto",
                   help="pseudo: keep detections with score >= this; 'auto' (default) takes the threshold of "
                        "the grid 0.05, 0.10, ..., 0.90 whose detections have the best F1 against the VAL "
                        "labels (IoU >= 0.5, same class)")
    p.add_argument("--pseudo-pixel-conf", type=float, default=0.5,
                   help="pseudo: label the pixels whose softmax maximum is >= this, void elsewhere (default 0.5)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps of every student (default: the student config's epochs x steps per "
                        "epoch of the full training set)")
    p.add_argument("--val-steps", type=int, default=VAL_STEPS,
                   help=f"validate about every this many steps (default {VAL_STEPS})")
    p.add_argument("--jobs", type=int, default=default_jobs(),
                   help="runs at a time, one torch thread each (default 2 with 2+ cores, else 1)")
    p.add_argument("--force", action="store_true",
                   help="re-run (role, seed) pairs already in results.json, and ignore differing stored settings")
    args = p.parse_args(argv)
    tb = testbed_paths(args.testbed, ROOT)
    args.data = args.data or tb["data"]
    args.teacher_data = args.teacher_data or str(args.data).rstrip("/\\") + "_teacher"
    args.teacher_ckpt = args.teacher_ckpt or f"runs/{args.testbed}/teacher_disjoint/best.pt"
    args.teacher_config = args.teacher_config or tb["teacher"]
    args.student_config = args.student_config or tb["student"]
    args.kd_config = args.kd_config or tb["kd"]
    if not 0.0 < args.labeled_fraction < 1.0:
        p.error(f"--labeled-fraction: must be in (0, 1), got {args.labeled_fraction}")
    if not 0.0 < args.pseudo_pixel_conf <= 1.0:
        p.error(f"--pseudo-pixel-conf: must be in (0, 1], got {args.pseudo_pixel_conf}")
    if args.steps is not None and args.steps < 1:
        p.error("--steps: must be at least 1")
    if args.val_steps < 1:
        p.error("--val-steps: must be at least 1")
    return args


# -- splits -------------------------------------------------------------------------------------
def split_names(source: str, fraction: float) -> Tuple[str, str]:
    """``("train_l10", "train_u90")`` for ``source="train"``, ``fraction=0.1``."""
    pct = round(fraction * 100, 6)
    return f"{source}_l{pct:g}", f"{source}_u{100 - pct:g}"


def split_ids(ids: Sequence[str], fraction: float, seed: int) -> Tuple[List[str], List[str]]:
    """``(labelled, unlabelled)`` ids, each sorted: a permutation of the sorted ids seeded by ``seed``,
    its first ``round(fraction * n)`` (clamped to 1..n-1) labelled."""
    from mtkd.errors import ConfigError

    ids = sorted(set(ids))
    n = len(ids)
    if n < 2:
        raise ConfigError(f"the training split has {n} image(s); a labelled/unlabelled cut needs at least 2")
    k = min(max(int(round(fraction * n)), 1), n - 1)
    order = np.random.default_rng(int(seed)).permutation(n)
    return sorted(ids[i] for i in order[:k]), sorted(ids[i] for i in order[k:])


def _write_if_changed(path: Path, text: str) -> bool:
    if path.is_file() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return True


def read_split_lists(voc_root: Path, split: str) -> Dict[str, Optional[List[str]]]:
    """``{"Main": ids or None, "Segmentation": ids or None}`` of a VOC split (None: no such list file)."""
    from mtkd.datasets.voc import read_id_list

    out: Dict[str, Optional[List[str]]] = {}
    for sub in ("Main", "Segmentation"):
        path = voc_root / "ImageSets" / sub / f"{split}.txt"
        out[sub] = read_id_list(path) if path.is_file() else None
    return out


def write_splits(voc_root: str | Path, source: str, fraction: float, seed: int) -> Dict[str, Any]:
    """Cut VOC split ``source`` into labelled / unlabelled split files (see the module docstring).

    Returns ``{"labeled": name, "unlabeled": name, "labeled_ids", "unlabeled_ids", "written": [paths]}``;
    a file whose content is already right is not rewritten (and not listed).
    """
    from mtkd.errors import DataError

    root = Path(voc_root)
    lists = read_split_lists(root, source)
    if all(v is None for v in lists.values()):
        raise DataError(f"{root / 'ImageSets' / 'Main' / f'{source}.txt'}: split file not found "
                        f"(nor ImageSets/Segmentation/{source}.txt)")
    ids = sorted(set().union(*(set(v) for v in lists.values() if v is not None)))
    labeled, unlabeled = split_ids(ids, fraction, seed)
    names = split_names(source, fraction)
    written: List[str] = []
    for sub, src in lists.items():
        if src is None:
            continue
        have = set(src)
        for name, part in zip(names, (labeled, unlabeled)):
            path = root / "ImageSets" / sub / f"{name}.txt"
            if _write_if_changed(path, "".join(f"{i}\n" for i in part if i in have)):
                written.append(str(path))
    return {"labeled": names[0], "unlabeled": names[1], "labeled_ids": labeled, "unlabeled_ids": unlabeled,
            "written": written}


# -- pseudo-labels ------------------------------------------------------------------------------
def threshold_pseudo(boxes: Any, scores: Any, labels: Any, seg_logits: Any, conf: float,
                     pixel_conf: Optional[float] = None) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Hard pseudo-labels of one image from the teacher's outputs in original pixels.

    Args:
        boxes, scores, labels: the detections after NMS, ``(N, 4)`` xyxy pixels,
            ``(N,)``, ``(N,)`` class indices ``0..nc-1`` (tensors or arrays).
        seg_logits: ``(nc + 1, h, w)`` logits (channel 0 background), or ``None``.
        conf: the box-score threshold.
        pixel_conf: the pixels' softmax threshold (default ``conf``).

    Returns ``(boxes (M, 4) float32, labels (M,) int64, mask (h, w) uint8 or None)``:
    the detections with score >= ``conf``, their boxes rounded to 0.01 px and
    those left with no width or height dropped; the mask holds the arg-max
    class (``0`` background, ``k + 1`` class ``k``) where the softmax maximum
    is >= ``pixel_conf`` and ``255`` (void) elsewhere.
    """
    import torch

    b = torch.as_tensor(np.asarray(boxes, np.float32) if not torch.is_tensor(boxes) else boxes).float().reshape(-1, 4)
    s = torch.as_tensor(scores).float().reshape(-1)
    lab = torch.as_tensor(labels).long().reshape(-1)
    keep = s >= conf
    b, lab = (b[keep].cpu() * 100).round() / 100, lab[keep].cpu()
    ok = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    mask = None
    if seg_logits is not None:
        prob = torch.as_tensor(seg_logits).float().softmax(0)
        pmax, arg = prob.max(0)
        mask = torch.where(pmax >= (conf if pixel_conf is None else pixel_conf), arg, torch.full_like(arg, VOID)).to(torch.uint8).cpu().numpy()
    return b[ok].numpy().astype(np.float32), lab[ok].numpy().astype(np.int64), mask


def teacher_config(ckpt: Path, data_ov: Sequence[str], extra: Sequence[str]) -> Dict[str, Any]:
    """The teacher checkpoint's own config with the benchmark's data and ``--set`` overrides
    (as :func:`benchmarks.kd_gain.run.teacher_record` builds it)."""
    from mtkd import checkpoint as ckpt_io
    from mtkd.engine.config import build_config

    own = dict(ckpt_io.load_checkpoint(ckpt)["config"])
    own.pop("out", None)
    return build_config(own, list(data_ov) + ["train.resume=null"] + list(extra))


def teacher_outputs(cfg: Dict[str, Any], ckpt: Path, images: Sequence[Tuple[str, Path]],
                    min_conf: float) -> Iterator[Tuple[str, int, int, Any, Any, Any, Any]]:
    """``(id, h, w, boxes, scores, labels, seg_logits)`` of the teacher on each image, in original pixels.

    Each image goes through the eval transform of the teacher's ``data``
    config, one at a time (sizes may differ), and the inference path
    :func:`mtkd.tasks.multitask.predict.predict_batch` (the usual NMS at
    ``eval.iou``/``max_det``, candidates from ``min(eval.conf, min_conf)``),
    which maps boxes and seg logits back to original pixels.
    """
    from mtkd.datasets.common import read_image
    from mtkd.datasets.transforms import build_transforms
    from mtkd.engine.trainer import load_model
    from mtkd.errors import MtkdError
    from mtkd.tasks.multitask.predict import eval_item, predict_batch

    _task, model, _classes, device = load_model(cfg, ckpt)
    d, e = cfg["data"], cfg["eval"]
    transform = build_transforms({"imgsz": d["imgsz"], "mean": d["mean"], "std": d["std"]}, train=False)
    for i, (img_id, path) in enumerate(images):
        image = read_image(path)
        h, w = image.shape[:2]
        item = eval_item(image, transform, img_id, i)
        pred = predict_batch(model, item["image"][None], [item["letterbox"]], [(h, w)],
                             min(float(e["conf"]), min_conf), e["iou"], e["max_det"], device)[0]
        if pred.boxes is None or pred.seg is None:
            raise MtkdError(f"{ckpt}: the teacher needs a detection and a segmentation head for pseudo-labels")
        yield img_id, h, w, pred.boxes, pred.scores, pred.labels, pred.seg_logits()


def teacher_predictions(cfg: Dict[str, Any], ckpt: Path, images: Sequence[Tuple[str, Path]], conf: float,
                        pixel_conf: Optional[float] = None
                        ) -> Iterator[Tuple[str, int, int, np.ndarray, np.ndarray, Optional[np.ndarray]]]:
    """``(id, h, w, boxes, labels, mask)`` hard pseudo-labels of each image (:func:`teacher_outputs`
    thresholded by :func:`threshold_pseudo`)."""
    for img_id, h, w, boxes, scores, labels, logits in teacher_outputs(cfg, ckpt, images, conf):
        yield (img_id, h, w) + threshold_pseudo(boxes, scores, labels, logits, conf, pixel_conf)


def f1_by_threshold(detections: Sequence[Tuple[Any, Any, Any]], truths: Sequence[Tuple[Any, Any]],
                    grid: Sequence[float], iou: float = 0.5) -> Dict[float, float]:
    """F1 of the detections kept at each score threshold of ``grid`` against the true boxes.

    ``detections[i] = (boxes (N, 4), scores (N,), labels (N,))`` and
    ``truths[i] = (boxes (M, 4), labels (M,))`` of image ``i``. Per image,
    detections are matched greedily in descending score to the unmatched
    true box of their class with the highest IoU >= ``iou``; as a
    detection's match depends only on higher-scored ones, one matching at
    the lowest threshold serves every threshold.
    """
    import torch
    from torchvision.ops import box_iou

    scores, hits, n_true = [], [], 0
    for (boxes, sc, lab), (t_boxes, t_lab) in zip(detections, truths):
        boxes, sc, lab = torch.as_tensor(boxes).float().reshape(-1, 4), torch.as_tensor(sc).float(), torch.as_tensor(lab)
        t_boxes, t_lab = torch.as_tensor(t_boxes).float().reshape(-1, 4), torch.as_tensor(t_lab)
        n_true += len(t_lab)
        ious = box_iou(boxes, t_boxes) if len(boxes) and len(t_boxes) else torch.zeros(len(boxes), len(t_boxes))
        ious[lab[:, None] != t_lab[None, :]] = 0.0
        taken = torch.zeros(len(t_lab), dtype=torch.bool)
        for j in torch.argsort(sc, descending=True).tolist():
            cand = ious[j].masked_fill(taken, 0.0)
            k = int(cand.argmax()) if len(cand) else -1
            hit = k >= 0 and float(cand[k]) >= iou
            if hit:
                taken[k] = True
            scores.append(float(sc[j]))
            hits.append(hit)
    out = {}
    for t in grid:
        kept = [h for s, h in zip(scores, hits) if s >= t]
        out[float(t)] = 2.0 * sum(kept) / max(len(kept) + n_true, 1)
    return out


def choose_box_conf(cfg: Dict[str, Any], ckpt: Path, voc_root: Path, split: str, classes: Sequence[str],
                    grid: Sequence[float] = CONF_GRID) -> Tuple[float, Dict[float, float]]:
    """``(threshold, {threshold: F1})``: the box-score threshold of ``grid`` whose teacher detections
    have the best F1 on the VOC ``split`` (the first of equals)."""
    from mtkd.datasets.voc import parse_voc_xml

    ids = read_split_lists(voc_root, split)["Main"] or []
    if not ids:
        from mtkd.errors import MtkdError

        raise MtkdError(f"{voc_root}: split {split!r} has no detection ids to choose --pseudo-conf on")
    index = {c: k for k, c in enumerate(classes)}
    images = [(i, voc_root / "JPEGImages" / f"{i}.jpg") for i in ids]
    dets, truths = [], []
    for img_id, _h, _w, boxes, scores, labels, _logits in teacher_outputs(cfg, ckpt, images, min(grid)):
        objs = parse_voc_xml(voc_root / "Annotations" / f"{img_id}.xml")[1]
        dets.append((boxes, scores, labels))
        truths.append((np.array([o["box"] for o in objs], np.float32).reshape(-1, 4),
                       np.array([index[o["name"]] for o in objs], np.int64)))
    f1 = f1_by_threshold(dets, truths, grid)
    best = max(f1, key=lambda t: (f1[t], -t))
    return best, f1


def voc_xml(img_id: str, h: int, w: int, boxes: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> bytes:
    """A VOC annotation: 0-based xyxy edges written as VOC's ``xmin = x1 + 1, ymin = y1 + 1, xmax = x2,
    ymax = y2`` (what :func:`mtkd.datasets.voc.parse_voc_xml` reads back)."""
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = f"{img_id}.jpg"
    size = ET.SubElement(root, "size")
    for key, value in (("width", w), ("height", h), ("depth", 3)):
        ET.SubElement(size, key).text = str(value)
    for (x1, y1, x2, y2), k in zip(np.asarray(boxes).tolist(), np.asarray(labels).tolist()):
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = classes[int(k)]
        ET.SubElement(obj, "difficult").text = "0"
        bb = ET.SubElement(obj, "bndbox")
        for key, value in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(bb, key).text = f"{value:.2f}"
    return ET.tostring(root)


def _link(src: Path, dst: Path) -> None:
    """Symlink ``dst`` -> ``src`` (absolute); a copy where symlinks are not allowed."""
    try:
        os.symlink(src.resolve(), dst)
    except OSError:
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)


def _ids_digest(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def build_pseudo_voc(dest: str | Path, src_root: str | Path, split: Dict[str, Any], eval_splits: Sequence[str],
                     ckpt: Path, digest: str, cfg: Dict[str, Any], conf: float, pixel_conf: float,
                     classes: Sequence[str], notes: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Write (or reuse) the ``pseudo`` role's VOC tree at ``dest``; returns its ``pseudo.json`` content.

    ``train`` = the labelled ids with their real labels + the unlabelled ids
    with the teacher's pseudo-labels; ``eval_splits`` (val, test) = the
    source tree's lists and labels. The tree is built next to ``dest`` and
    moved into place when complete, so an interrupted build leaves no
    half-written tree behind. ``notes`` (e.g. how ``conf`` was chosen) are
    recorded in ``pseudo.json`` beside the counts.
    """
    from PIL import Image

    from mtkd.tasks.multitask.plots import mask_palette
    from mtkd.errors import MtkdError

    dest, src = Path(dest), Path(src_root).resolve()
    key = {"teacher_sha256": digest, "pseudo_conf": conf, "pseudo_pixel_conf": pixel_conf, "source": str(src), "classes": list(classes),
           "labeled": split["labeled"], "labeled_ids": _ids_digest(split["labeled_ids"]),
           "unlabeled": split["unlabeled"], "unlabeled_ids": _ids_digest(split["unlabeled_ids"]),
           "eval_splits": list(eval_splits), "imgsz": cfg["data"]["imgsz"], "iou": cfg["eval"]["iou"],
           "max_det": cfg["eval"]["max_det"]}
    marker = dest / "pseudo.json"
    if marker.is_file():
        old = json.loads(marker.read_text())
        if {k: old.get(k) for k in key} == key:
            log(f"reusing the pseudo-labelled tree {dest}")
            return old
    if dest.exists() and not marker.is_file():
        raise MtkdError(f"{dest}: exists but is not a pseudo-label tree of this benchmark (no pseudo.json); "
                        "move it away or use another --out")
    log(f"writing the teacher's pseudo-labels (boxes >= {conf}, pixels >= {pixel_conf}) of {len(split['unlabeled_ids'])} images to {dest}")
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    for sub in ("Annotations", "SegmentationClass", "ImageSets/Main", "ImageSets/Segmentation"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    _link(src / "JPEGImages", tmp / "JPEGImages")
    (tmp / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
    # real labels: the labelled part of the source split and the evaluation splits
    source_lists = read_split_lists(src, split["source"])
    lists: Dict[str, Dict[str, List[str]]] = {"Main": {}, "Segmentation": {}}
    labeled = set(split["labeled_ids"])
    for sub, ext, folder in (("Main", "xml", "Annotations"), ("Segmentation", "png", "SegmentationClass")):
        real = sorted(labeled & set(source_lists[sub] or []))
        for name in eval_splits:
            ids = read_split_lists(src, name)[sub]
            if ids is not None:
                lists[sub][name] = ids
                real += ids
        for i in sorted(set(real)):
            _link(src / folder / f"{i}.{ext}", tmp / folder / f"{i}.{ext}")
        lists[sub]["train"] = sorted(labeled & set(source_lists[sub] or [])) + list(split["unlabeled_ids"])
    # pseudo-labels of the unlabelled part
    palette = mask_palette()
    images = [(i, src / "JPEGImages" / f"{i}.jpg") for i in split["unlabeled_ids"]]
    n_boxes, void, pixels, agree, judged, true_boxes = 0, 0, 0, 0, 0, 0
    truth = {sub: set(source_lists[sub] or []) for sub in source_lists}
    for img_id, h, w, boxes, labels, mask in teacher_predictions(cfg, ckpt, images, conf, pixel_conf):
        (tmp / "Annotations" / f"{img_id}.xml").write_bytes(voc_xml(img_id, h, w, boxes, labels, classes))
        png = Image.fromarray(mask)  # mode "L"; the palette makes it "P" with the indices kept
        png.putpalette(palette)
        png.save(tmp / "SegmentationClass" / f"{img_id}.png")
        n_boxes += len(boxes)
        void += int((mask == VOID).sum())
        pixels += mask.size
        if img_id in truth["Segmentation"]:  # diagnostics only: the withheld label is never trained on
            with Image.open(src / "SegmentationClass" / f"{img_id}.png") as im:
                real = np.array(im, dtype=np.uint8)
            sel = (mask != VOID) & (real != VOID)
            agree += int((mask[sel] == real[sel]).sum())
            judged += int(sel.sum())
        if img_id in truth["Main"]:
            from mtkd.datasets.voc import parse_voc_xml

            true_boxes += len(parse_voc_xml(src / "Annotations" / f"{img_id}.xml")[1])
    for sub, per in lists.items():
        for name, ids in per.items():
            (tmp / "ImageSets" / sub / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    n = max(len(images), 1)
    info = dict(key, source_split=split["source"], images=len(images), boxes=n_boxes, boxes_per_image=n_boxes / n,
                true_boxes_per_image=true_boxes / n if truth["Main"] else None,
                void_fraction=void / max(pixels, 1),
                confident_pixel_accuracy=agree / judged if judged else None, **(notes or {}))
    (tmp / "pseudo.json").write_text(json.dumps(info, indent=2) + "\n")
    if dest.exists():
        shutil.rmtree(dest)  # ours (has pseudo.json); rmtree unlinks the symlinks, never their targets
    os.replace(tmp, dest)
    return info


# -- the teacher --------------------------------------------------------------------------------
def ensure_teacher(args: argparse.Namespace, student_root: Path, classes: Sequence[str],
                   extra: List[str]) -> Path:
    """``--teacher-ckpt``, trained first on ``--teacher-data`` (written when missing) when it does not exist."""
    ckpt = Path(args.teacher_ckpt)
    if ckpt.is_file():
        return ckpt
    from mtkd.datasets.synthetic import TESTBEDS as SETS, make_synthetic
    from mtkd.datasets.voc import voc_classes
    from mtkd.engine.config import load_config

    tdata = Path(args.teacher_data)
    if not tdata.exists():
        log(f"writing the teacher's synthetic set (generator seed {TEACHER_DATA_SEED}) to {tdata} ...")
        make_synthetic(tdata, seed=TEACHER_DATA_SEED, formats=("voc",), **SETS[args.testbed])
    t_ov = data_overrides(tdata)
    tcfg = load_config(args.teacher_config, t_ov + extra)
    troot = Path(tcfg["data"]["root"])
    if troot.resolve() == student_root.resolve():
        raise SystemExit(f"[{NAME}] --teacher-data {tdata} is the students' tree: the teacher must not see "
                         "their labels")
    if tcfg["data"]["format"] == "voc" and voc_classes(troot) != list(classes):
        raise SystemExit(f"[{NAME}] --teacher-data {tdata} has classes {voc_classes(troot)}, the students' "
                         f"{list(classes)}")
    log(f"{ckpt} not found: training a teacher on {troot} into {ckpt.parent}")
    run_config(args.teacher_config, t_ov + extra, seed=0, out=ckpt.parent)
    return ckpt.parent / "best.pt"


# -- budgets ------------------------------------------------------------------------------------
def loader_steps(n: int, batch: int) -> int:
    """Batches per epoch of the plain train loader over ``n`` images (one process): the last
    incomplete batch is dropped when there is at least one full one."""
    return n // batch if n >= batch else math.ceil(n / batch)


def mixed_steps(n_labeled: int, n_unlabeled: int, batch: int, ratio: float) -> int:
    """Batches per epoch of the ``data.unlabeled`` train loader (one process)."""
    from mtkd.datasets.mixing import MixedBatchSampler

    return len(MixedBatchSampler(n_labeled, n_unlabeled, batch, ratio))


def budget_overrides(steps: int, per_epoch: int, warmup_steps: int, val_steps: int) -> List[str]:
    """``train.*`` overrides giving ``steps`` optimizer steps on a loader of ``per_epoch`` batches:
    the schedule ends at ``steps``, the warm-up lasts ``warmup_steps`` and validation comes about
    every ``val_steps`` steps."""
    return [f"train.epochs={math.ceil(steps / per_epoch)}", f"train.max_steps={int(steps)}",
            f"train.val_every={max(1, round(val_steps / per_epoch))}",
            f"train.warmup_epochs={float(warmup_steps) / per_epoch!r}"]


# -- verdicts -----------------------------------------------------------------------------------
def _values(runs: Sequence[Dict[str, Any]], role: str, key: str) -> List[float]:
    return [float(r[key]) for r in runs if r["role"] == role and isinstance(r.get(key), (int, float))]


def _f(v: Optional[float], spec: str = ".4f") -> str:
    return "n/a" if v is None else format(v, spec)


def verdicts(runs: Sequence[Dict[str, Any]]) -> Tuple[List[str], Dict[str, Any]]:
    """Derived lines and a machine-readable summary (see the module docstring)."""
    lines: List[str] = []
    summary: Dict[str, Any] = {"gap": {}, "closed": {"kd": {}, "pseudo": {}}, "worst_kd_above_best_plain": {},
                               "kd_ge_pseudo": {}, "targets": {}}
    med = {role: {m: median_of(list(runs), role, m) for m in METRIC_NAMES} for role in ("teacher",) + ROLES}
    if med["teacher"]["map50"] is not None:
        lines.append("teacher (labels disjoint from the students' set), on the students' test split: " +
                     ", ".join(f"{METRIC_NAMES[m]} {_f(med['teacher'][m])}" for m in METRIC_NAMES))
    if any(med[r][m] is None for r in ("plain", "plain_all") for m in METRIC_NAMES):
        lines.append("gap: not yet measurable (plain or plain_all runs missing)")
        return lines, summary
    for m, name in METRIC_NAMES.items():
        p, a, k, q = med["plain"][m], med["plain_all"][m], med["kd"][m], med["pseudo"][m]
        summary["gap"][m] = a - p
        parts = [f"{name}: gap median plain {p:.4f} -> median plain_all {a:.4f} = {a - p:+.4f}"]
        for role, v in (("kd", k), ("pseudo", q)):
            g = gap_closed(a, p, v) if v is not None else None
            summary["closed"][role][m] = g
            parts.append(f"closed by median {role} " + ("n/a (not run)" if v is None else
                                                         "n/a (no gap)" if g is None else f"{g:+.2f}"))
        kd_vals, plain_vals = _values(runs, "kd", m), _values(runs, "plain", m)
        if kd_vals:
            worst, best = min(kd_vals), max(plain_vals)
            summary["worst_kd_above_best_plain"][m] = worst > best
            parts.append(f"worst kd seed {worst:.4f} vs best plain seed {best:.4f} "
                         f"({'above' if worst > best else 'NOT above'})")
        if k is not None and q is not None:
            summary["kd_ge_pseudo"][m] = k >= q
            parts.append(f"median kd {k:.4f} vs median pseudo {q:.4f} ({'kd >= pseudo' if k >= q else 'kd < pseudo'})")
        lines.append("; ".join(parts))
    on = " and ".join(METRIC_NAMES[m] for m in TARGET_METRICS)

    def target(label: str, judged: Dict[str, Optional[bool]]) -> None:
        """MET when every target metric passes, NOT MET when one fails, else not yet measurable."""
        vals = [judged.get(m) for m in TARGET_METRICS]
        met = False if False in vals else None if None in vals else True
        summary["targets"][label] = met
        lines.append(f"target: {label} on {on}: {'not yet measurable' if met is None else 'MET' if met else 'NOT MET'}")

    # no gap (plain_all not above plain) with KD measured: the target cannot be met
    target(f"kd closes >= {TARGET_GAP:.0%} of the gap",
           {m: None if med["kd"][m] is None else (g is not None and g >= TARGET_GAP)
            for m, g in summary["closed"]["kd"].items()})
    target("worst kd seed above best plain seed", summary["worst_kd_above_best_plain"])
    target("median kd >= median pseudo", summary["kd_ge_pseudo"])
    return lines, summary


# -- main ---------------------------------------------------------------------------------------
#: Settings only the ``pseudo`` role depends on: when only these changed, its runs are redone.
PSEUDO_KEYS = ("pseudo_conf", "pseudo_pixel_conf")


def check_previous(path: Path, budget: Dict[str, Any], digest: str, force: bool) -> List[str]:
    """The roles whose stored runs used other pseudo-label settings (to be re-run); stops when the
    stored runs used other settings of every role or another teacher (unless ``force``)."""
    if force or not path.is_file():
        return []
    payload = json.loads(path.read_text())
    prev = payload.get("budget", {})
    stale = []
    for key in CHECKED:
        if key in prev and prev[key] != budget[key]:
            if key in PSEUDO_KEYS:
                log(f"{path}: its pseudo runs used {key}={prev[key]!r}, this sitting {budget[key]!r}: "
                    "re-running the pseudo role")
                stale = ["pseudo"]
                continue
            raise SystemExit(f"[{NAME}] {path}: its runs used {key}={prev[key]!r}, this sitting {budget[key]!r}; "
                             "use the same settings, another --out, or --force")
    if payload.get("teacher_sha256") not in (None, digest):
        raise SystemExit(f"[{NAME}] {path}: its runs used another teacher (SHA-256 {payload['teacher_sha256'][:12]}...,"
                         f" now {digest[:12]}...); use another --out or --force")
    return stale


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse(argv)
    import mtkd  # noqa: F401  (offline switches first)
    from mtkd.datasets.voc import voc_classes
    from mtkd.engine.config import load_config

    if args.data == TESTBEDS[args.testbed]["data"]:
        ensure_testbed_data(args.testbed, args.data)
    data_ov = data_overrides(args.data, args.format)
    extra = extra_overrides(args)
    scfg = load_config(args.student_config, data_ov + extra)
    d = scfg["data"]
    if d["format"] != "voc":
        raise SystemExit(f"[{NAME}] --data must be a VOC tree (split files are written into it), got {d['format']}")
    voc_root = Path(d["root"])
    classes = list(d["classes"] or voc_classes(voc_root))
    split = write_splits(voc_root, d["train"], args.labeled_fraction, args.split_seed)
    split["source"] = d["train"]
    for path in split["written"]:
        log(f"wrote {path}")
    n_l, n_u = len(split["labeled_ids"]), len(split["unlabeled_ids"])
    batch = int(scfg["train"]["batch"])
    full_per_epoch = loader_steps(n_l + n_u, batch)
    steps = int(args.steps or int(scfg["train"]["epochs"]) * full_per_epoch)
    warmup_steps = int(round(float(scfg["train"]["warmup_epochs"]) * full_per_epoch))

    ckpt = ensure_teacher(args, voc_root, classes, extra)
    digest = file_sha256(ckpt)
    budget = {"testbed": args.testbed, "steps": steps, "warmup_steps": warmup_steps, "val_steps": args.val_steps,
              "labeled_fraction": args.labeled_fraction, "split_seed": args.split_seed,
              "unlabeled_ratio": args.unlabeled_ratio, "pseudo_conf": args.pseudo_conf,
              "pseudo_pixel_conf": args.pseudo_pixel_conf, "seeds": args.seeds,
              "overrides": extra, "jobs": args.jobs}
    stale = check_previous(Path(args.out) / "results.json", budget, digest, args.force)
    splits_info = {"source": d["train"], "labeled": split["labeled"], "unlabeled": split["unlabeled"],
                   "n_labeled": n_l, "n_unlabeled": n_u, "split_seed": args.split_seed}
    res = Results(args.out, NAME, data=args.data, budget=budget, teacher=str(ckpt), teacher_sha256=digest,
                  teacher_data=args.teacher_data, splits=splits_info, kd_config=args.kd_config,
                  student_config=args.student_config)
    if args.force or not any(r["role"] == "teacher" for r in res.runs):
        res.payload["runs"] = [r for r in res.runs if r["role"] != "teacher"]
        res.add(teacher_record(ckpt, data_ov, extra))

    pseudo_root = Path(args.out) / "pseudo_voc"
    tcfg = teacher_config(ckpt, data_ov, extra)
    res.payload["runs"] = [r for r in res.runs if r["role"] not in stale]
    conf, f1 = args.pseudo_conf, None
    if conf == "auto":
        conf, f1 = choose_box_conf(tcfg, ckpt, voc_root, d["val"], classes)
        log(f"--pseudo-conf auto: {conf} (val F1 {f1[conf]:.3f}; 0.5 gives {f1.get(0.5, float('nan')):.3f})")
    notes = None if f1 is None else {"val_f1_by_conf": {str(t): round(v, 4) for t, v in f1.items()}}
    pseudo_info = build_pseudo_voc(pseudo_root, voc_root, split, [d["val"], d["test"]], ckpt, digest, tcfg,
                                   conf, args.pseudo_pixel_conf, classes, notes)
    res.write(pseudo_labels={k: v for k, v in pseudo_info.items() if k not in ("classes",)})

    teacher_ov = [f"teacher.ckpt={json.dumps(str(ckpt))}"]
    full, l_name, u_name = d["train"], split["labeled"], split["unlabeled"]
    plan = {
        "plain": (args.student_config, data_ov + [f"data.train={l_name}"], loader_steps(n_l, batch), n_l),
        "kd": (args.kd_config, data_ov + [f"data.train={l_name}", f"data.unlabeled={u_name}",
                                          f"data.unlabeled_ratio={args.unlabeled_ratio!r}"] + teacher_ov,
               mixed_steps(n_l, n_u, batch, args.unlabeled_ratio), n_l),
        "pseudo": (args.student_config, ["data.format=voc", f"data.root={json.dumps(str(pseudo_root))}",
                                         "data.train=train"], loader_steps(n_l + n_u, batch), n_l + n_u),
        "plain_all": (args.student_config, data_ov + [f"data.train={full}"], full_per_epoch, n_l + n_u),
    }

    def record(key: Tuple[str, int, Path, Dict[str, Any]], report: Optional[Dict[str, Any]], secs: float,
               error: Optional[Exception]) -> None:
        role, seed, out, more = key
        if error is not None:
            log(f"{role} seed {seed} failed: {error}")
            return
        res.add(make_record(role, seed, report, out=out, total_s=secs, **more))
        lines, summary = verdicts(res.runs)
        res.write(derived=lines, summary=summary)

    jobs = []
    for seed in args.seeds:
        for role in ROLES:
            if res.has(role, seed) and not args.force:
                continue
            config, ov, per_epoch, n_train = plan[role]
            b_ov = budget_overrides(steps, per_epoch, warmup_steps, args.val_steps)
            out = res.run_dir(role, seed)
            more = {"budget_steps": steps, "train_images": n_train, "steps_per_epoch": per_epoch,
                    "val_every": int(b_ov[2].split("=")[1])}
            jobs.append(((role, seed, out, more),
                         {"config": config, "overrides": ov + extra + b_ov, "seed": seed, "out": str(out),
                          "epochs": None}))
    log(f"{len(jobs)} runs of {steps} steps each ({n_l} labelled / {n_u} unlabelled images, batch {batch})")
    run_jobs(jobs, args.jobs, 1 if args.jobs > 1 else None, record, desc=NAME)

    lines, summary = verdicts(res.runs)
    return res.finish(lines, summary=summary)


if __name__ == "__main__":
    main()
