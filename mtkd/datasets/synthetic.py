"""A small, capacity-bound synthetic detection + segmentation set in three layouts.

Why it looks like this: on an easy 6-class shapes task a tiny student beat a
big teacher (measured), so distillation had nothing to transfer. Here the
classes are 4 shapes x 3 textures (:data:`SYNTHETIC_CLASSES`), so telling
them apart needs fine shape and texture cues:

  * shapes circle / square / triangle / cross, randomly rotated; textures
    solid / stripes (random period and angle) / checker (random period);
  * both colours of an object are random, so colour never gives the class;
  * object sizes log-uniform from 8 px to 45 % of the shorter image side;
    2-8 objects, smaller ones painted over larger ones, every object keeping
    at least 40 % of its pixels visible;
  * a cluttered background: smooth colour noise, pixel noise, distractor
    strokes, elongated ellipses and irregular blobs drawn with the same
    colour distribution (they are background, mask 0);
  * image sides drawn independently from ``imgsz`` (non-square), JPEG q=90.

Every image is written once and its bytes are copied into all requested
layouts, so the loaders must agree on it:

  * ``out/voc``: VOC tree with ``classes.txt``; boxes 1-based
    (``xmin = x1 + 1``, ``xmax = x2``).
  * ``out/coco``: ``images/<split>/`` and ``annotations/instances_<split>.json``;
    most objects are polygons, about 15 % compressed RLE and 10 % uncompressed
    RLE; category ids are class index + 1.
  * ``out/yolo``: ``data.yaml`` with absolute paths, ``images|labels|masks/<split>/``.

Boxes are the full (amodal) extent of each object's rasterised polygon;
masks are the visible semantics. Polygons are rasterised with pycocotools
here and in the COCO loader, and painted in decreasing pixel area with ties in
annotation order, so the COCO masks equal the VOC/YOLO PNGs pixel for pixel.

Partial labels: in the *train* split, a ``det_missing`` fraction of images has
no detection labels (no VOC XML and not in ``ImageSets/Main``; COCO
annotations without ``bbox``; no YOLO label txt and listed under
``mtkd_no_det`` in data.yaml) and a disjoint ``seg_missing`` fraction has no
segmentation labels (no PNG and not in ``ImageSets/Segmentation``; COCO
annotations without ``segmentation``; no YOLO mask PNG).

Each image (pixels, objects, segmentation encodings) is drawn from its own
generator seeded by ``(seed, split, i)``, so it does not depend on the other
arguments; which train images lose labels depends on ``seed``, ``n_train``
and the two fractions. Same arguments, same bytes.
"""
from __future__ import annotations

import io
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import yaml
from PIL import Image
from pycocotools import mask as mask_utils

from mtkd.datasets.coco import decode_rle
from mtkd.errors import ConfigError

SHAPES = ("circle", "square", "triangle", "cross")
TEXTURES = ("solid", "stripes", "checker")
#: Class names, shape-major: ``circle_solid, circle_stripes, ..., cross_checker``.
SYNTHETIC_CLASSES: List[str] = [f"{s}_{t}" for s in SHAPES for t in TEXTURES]
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}

#: ``make_synthetic`` arguments of the two benchmark testbeds (``mtkd make-synthetic --testbed NAME``).
#: ``large``: 96-160 px images, all 12 classes, 2-8 objects, full clutter, a third of the
#: training masks missing; the models of its presets are far from their plateau after
#: 1500 CPU steps. ``small``: 64-px square images, 8 classes (4 shapes, solid or striped),
#: 1-3 objects of 14-38 px, 30 % of the clutter, and 12x the images, so that the
#: ``*_small`` presets learn the task in minutes on a CPU
#: (benchmarks/README.md has the measurements behind each choice).
TESTBEDS: Dict[str, Dict] = {
    "large": {"n_train": 320, "n_val": 80, "n_test": 160, "imgsz": (96, 160), "seg_missing": 0.33},
    "small": {"n_train": 4000, "n_val": 500, "n_test": 500, "imgsz": (64, 64), "objects": (1, 3),
              "min_size": 14.0, "max_size": 0.6, "clutter": 0.3,
              "classes": [f"{s}_{t}" for s in SHAPES for t in ("solid", "stripes")]},
}
_MIN_VISIBLE = 0.4


def _palette() -> List[int]:
    """VOC's colour map (index -> RGB), with 255 white."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    pal[255 * 3 : 256 * 3] = [255, 255, 255]
    return pal


_PALETTE = _palette()


def _shape_polygon(shape: str, cx: float, cy: float, size: float, angle: float) -> np.ndarray:
    """(K, 2) float polygon of a shape of diameter ``size`` rotated by ``angle``."""
    r = size / 2
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    elif shape == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * (r / math.sqrt(2)) * 1.25
    elif shape == "triangle":
        t = np.array([-np.pi / 2, np.pi / 6, 5 * np.pi / 6])
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    else:  # cross: 12 points, arm half-width r/3
        a, b = r, r / 3
        pts = np.array(
            [[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b], [-a, b], [-a, -b], [-b, -b]]
        )
    c, s = math.cos(angle), math.sin(angle)
    rot = pts @ np.array([[c, s], [-s, c]])
    return rot + np.array([cx, cy])


def _rasterise(poly: np.ndarray, h: int, w: int) -> np.ndarray:
    rle = mask_utils.frPyObjects([poly.reshape(-1).tolist()], h, w)
    return decode_rle(mask_utils.merge(rle)).astype(bool)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, 3).astype(np.float32)


def _two_colours(rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    c1 = _random_colour(rng)
    for _ in range(20):
        c2 = _random_colour(rng)
        if np.abs(c1 - c2).sum() > 150:
            break
    return c1, c2


def _texture(kind: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """(h, w) bool pattern: True where the second colour goes."""
    if kind == "solid":
        return np.zeros((h, w), bool)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    u = xx * math.cos(angle) + yy * math.sin(angle)
    period = rng.uniform(3.0, 6.0)
    if kind == "stripes":
        return (u % period) < period / 2
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    q = period / 2
    return ((np.floor(u / q) + np.floor(v / q)) % 2).astype(bool)


def _background(h: int, w: int, rng: np.random.Generator, clutter: float = 1.0) -> np.ndarray:
    """Smooth colour noise, an optional faint texture and distractor shapes.

    ``clutter`` scales the number of distractors (strokes, ellipses, blobs):
    1 draws 3-8 strokes, 1-3 ellipses and 1-3 blobs, 0 none; the random
    draws are the same whatever ``clutter`` is, so only the drawing changes.
    """
    grid = rng.uniform(0, 255, (rng.integers(2, 6), rng.integers(2, 6), 3)).astype(np.float32)
    img = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    if rng.random() < 0.5:  # a faint background texture
        pattern = _texture(str(rng.choice(["stripes", "checker"])), h, w, rng)
        img += pattern[..., None] * rng.uniform(-40, 40, 3).astype(np.float32)
    img = np.ascontiguousarray(img.clip(0, 255))
    def keep(i: int, n: int) -> bool:  # the first round(clutter * n) distractors of a kind are drawn
        return i < round(clutter * n)

    n = int(rng.integers(3, 9))
    for i in range(n):  # strokes
        pts = rng.uniform([0, 0], [w, h], (rng.integers(2, 5), 2)).astype(np.int32)
        colour, thick = _random_colour(rng).tolist(), int(rng.integers(1, 4))
        if keep(i, n):
            cv2.polylines(img, [pts], False, colour, thick, cv2.LINE_AA)
    n = int(rng.integers(1, 4))
    for i in range(n):  # elongated ellipses
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        a = float(rng.uniform(4, 0.25 * min(h, w)))
        axes = (int(a), max(1, int(a / rng.uniform(2.0, 4.0))))
        angle, colour = float(rng.uniform(0, 180)), _random_colour(rng).tolist()
        if keep(i, n):
            cv2.ellipse(img, centre, axes, angle, 0, 360, colour, -1)
    n = int(rng.integers(1, 4))
    for i in range(n):  # irregular blobs
        k = int(rng.integers(5, 8))
        t = np.sort(rng.uniform(0, 2 * np.pi, k))
        rad = rng.uniform(3, 0.15 * min(h, w), k)
        c = rng.uniform([0, 0], [w, h])
        pts = (c + np.stack([np.cos(t), np.sin(t)], 1) * rad[:, None]).astype(np.int32)
        colour = _random_colour(rng).tolist()
        if keep(i, n):
            cv2.fillPoly(img, [pts], colour)
    return img


def _paint_order(masks: Sequence[np.ndarray]) -> List[int]:
    areas = [int(m.sum()) for m in masks]
    return sorted(range(len(masks)), key=lambda k: -areas[k])


def _visible_ok(masks: Sequence[np.ndarray]) -> bool:
    inst = np.full(masks[0].shape, -1, np.int32)
    for k in _paint_order(masks):
        inst[masks[k]] = k
    return all((inst == k).sum() >= _MIN_VISIBLE * m.sum() for k, m in enumerate(masks))


def _draw_image(rng: np.random.Generator, imgsz: Tuple[int, int], classes: Sequence[int] = tuple(range(12)),
                objects: Tuple[int, int] = (2, 8), min_size: float = 8.0, max_size: float = 0.45,
                clutter: float = 1.0):
    """One image: (rgb uint8, semantic mask uint8, objects in paint order).

    ``classes`` are indices into :data:`SYNTHETIC_CLASSES` that may be drawn;
    an object's ``cls`` is its position in ``classes``.
    """
    h, w = (int(v) for v in rng.integers(imgsz[0], imgsz[1] + 1, 2))
    img = _background(h, w, rng, clutter)
    n = int(rng.integers(objects[0], objects[1] + 1))
    max_px = max_size * min(h, w)
    sizes = sorted(np.exp(rng.uniform(math.log(min_size), math.log(max_px), n)), reverse=True)
    placed: List[Dict] = []
    for size in sizes:
        cls = int(rng.integers(len(classes)))
        kind = classes[cls]
        shape = SHAPES[kind // len(TEXTURES)]
        for _ in range(50 if len(placed) < 2 else 6):  # insist on the first two
            cx = rng.uniform(size / 2, w - size / 2)
            cy = rng.uniform(size / 2, h - size / 2)
            poly = _shape_polygon(shape, cx, cy, size, rng.uniform(0, 2 * np.pi))
            m = _rasterise(poly, h, w)
            if m.sum() < 16 or not _visible_ok([o["mask"] for o in placed] + [m]):
                continue
            placed.append({"cls": cls, "kind": kind, "poly": poly, "mask": m})
            break
    placed = [placed[k] for k in _paint_order([o["mask"] for o in placed])]
    sem = np.zeros((h, w), np.uint8)
    for obj in placed:
        c1, c2 = _two_colours(rng)
        pattern = _texture(TEXTURES[obj["kind"] % len(TEXTURES)], h, w, rng)
        colour = np.where(pattern[..., None], c2, c1)
        img[obj["mask"]] = colour[obj["mask"]]
        sem[obj["mask"]] = obj["cls"] + 1
        ys, xs = np.nonzero(obj["mask"])
        obj["box"] = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    img = img + rng.normal(0, 6, img.shape).astype(np.float32)
    return np.ascontiguousarray(img.clip(0, 255).astype(np.uint8)), sem, placed


def _uncompressed_rle(mask: np.ndarray) -> Dict:
    flat = np.asarray(mask, np.uint8).reshape(-1, order="F")
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], change])).tolist()
    return {"size": list(mask.shape), "counts": [int(c) for c in counts]}


def _encode(img: np.ndarray, sem: np.ndarray) -> Tuple[bytes, bytes]:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    png = io.BytesIO()
    p = Image.fromarray(sem, mode="P")
    p.putpalette(_PALETTE)
    p.save(png, format="PNG")
    return buf.getvalue(), png.getvalue()


def _voc_xml(img_id: str, h: int, w: int, objects: Sequence[Dict], names: Sequence[str]) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = f"{img_id}.jpg"
    size = ET.SubElement(root, "size")
    for key, value in (("width", w), ("height", h), ("depth", 3)):
        ET.SubElement(size, key).text = str(value)
    for obj in objects:
        el = ET.SubElement(root, "object")
        ET.SubElement(el, "name").text = names[obj["cls"]]
        ET.SubElement(el, "difficult").text = "0"
        bb = ET.SubElement(el, "bndbox")
        x1, y1, x2, y2 = obj["box"]
        for key, value in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(bb, key).text = str(value)
    return ET.tostring(root)


def make_synthetic(
    out_dir: str | Path,
    n_train: int = 200,
    n_val: int = 50,
    n_test: int = 0,
    imgsz: Tuple[int, int] = (96, 160),
    seed: int = 0,
    seg_missing: float = 0.0,
    det_missing: float = 0.0,
    formats: Sequence[str] = ("voc", "coco", "yolo"),
    classes: Optional[Sequence[str]] = None,
    objects: Tuple[int, int] = (2, 8),
    min_size: float = 8.0,
    max_size: float = 0.45,
    clutter: float = 1.0,
) -> Dict[str, Path]:
    """Write the synthetic set; return ``{"voc": root, "coco": root, "yolo": data.yaml}``.

    Args:
        out_dir: output folder (created); layouts go to ``voc/``, ``coco/``, ``yolo/``.
        n_train, n_val, n_test: images per split (a split with 0 is not written).
        imgsz: ``(min, max)`` of each image side, drawn independently.
        seed: everything is a function of it.
        seg_missing, det_missing: fractions of *train* images without
            segmentation / detection labels (disjoint sets; sum <= 1).
        formats: any of ``"voc"``, ``"coco"``, ``"yolo"``.
        classes: names from :data:`SYNTHETIC_CLASSES` to draw (default all
            12), in that order; the written class list is this subset.
        objects: ``(min, max)`` objects per image.
        min_size, max_size: object diameters are log-uniform from
            ``min_size`` pixels to ``max_size`` times the shorter side.
        clutter: scales the number of background distractors (1 = all, 0 = none).
    """
    unknown = set(formats) - {"voc", "coco", "yolo"}
    if unknown:
        raise ConfigError(f"formats: unknown format(s) {sorted(unknown)} (use voc, coco, yolo)")
    if not (0 <= seg_missing <= 1 and 0 <= det_missing <= 1 and seg_missing + det_missing <= 1):
        raise ConfigError("seg_missing/det_missing: fractions in [0, 1] whose sum is at most 1")
    lo, hi = (int(v) for v in imgsz)
    if not 32 <= lo <= hi:
        raise ConfigError(f"imgsz: need 32 <= min <= max, got {imgsz!r}")
    names = list(SYNTHETIC_CLASSES) if classes is None else list(classes)
    unknown_cls = [c for c in names if c not in SYNTHETIC_CLASSES]
    if unknown_cls or not names or len(set(names)) != len(names):
        raise ConfigError(f"classes: expected distinct names from {SYNTHETIC_CLASSES}, got {names!r}")
    if not (1 <= int(objects[0]) <= int(objects[1])):
        raise ConfigError(f"objects: need 1 <= min <= max, got {objects!r}")
    if not (4 <= min_size < max_size * lo and 0 < max_size <= 1):
        raise ConfigError(f"min_size/max_size: need 4 <= min_size < max_size * {lo} and 0 < max_size <= 1, "
                          f"got {min_size!r}, {max_size!r}")
    if not 0 <= clutter <= 1:
        raise ConfigError(f"clutter: must be in [0, 1], got {clutter!r}")
    draw = {"classes": tuple(SYNTHETIC_CLASSES.index(c) for c in names), "objects": (int(objects[0]), int(objects[1])),
            "min_size": float(min_size), "max_size": float(max_size), "clutter": float(clutter)}
    out = Path(out_dir).resolve()
    roots = {"voc": out / "voc", "coco": out / "coco", "yolo": out / "yolo"}
    counts = {s: n for s, n in (("train", n_train), ("val", n_val), ("test", n_test)) if n > 0}
    for fmt in formats:
        roots[fmt].mkdir(parents=True, exist_ok=True)
    if "voc" in formats:
        for sub in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Main", "ImageSets/Segmentation"):
            (roots["voc"] / sub).mkdir(parents=True, exist_ok=True)
        (roots["voc"] / "classes.txt").write_text("\n".join(names) + "\n")
    no_det: Dict[str, List[str]] = {}
    for split, n in counts.items():
        order = np.random.default_rng([seed, _SPLIT_CODES[split], 10**6]).permutation(n)
        n_det_missing = round(det_missing * n) if split == "train" else 0
        n_seg_missing = round(seg_missing * n) if split == "train" else 0
        det_off = set(order[:n_det_missing].tolist())
        seg_off = set(order[n_det_missing : n_det_missing + n_seg_missing].tolist())
        _write_split(roots, formats, split, n, (lo, hi), seed, det_off, seg_off, no_det, draw, names)
    if "yolo" in formats:
        data = {
            "path": str(roots["yolo"]),
            **{split: f"images/{split}" for split in counts},
            "names": names,
        }
        if no_det:
            data["mtkd_no_det"] = no_det
        yaml_path = roots["yolo"] / "data.yaml"
        yaml_path.write_text(yaml.safe_dump(data, sort_keys=False))
        roots["yolo"] = yaml_path
    return {fmt: roots[fmt] for fmt in ("voc", "coco", "yolo") if fmt in formats}


def _write_split(
    roots: Dict[str, Path],
    formats: Sequence[str],
    split: str,
    n: int,
    imgsz: Tuple[int, int],
    seed: int,
    det_off: set,
    seg_off: set,
    no_det: Dict[str, List[str]],
    draw: Dict,
    names: Sequence[str],
) -> None:
    voc, coco, yolo = ("voc" in formats), ("coco" in formats), ("yolo" in formats)
    if coco:
        (roots["coco"] / "images" / split).mkdir(parents=True, exist_ok=True)
        (roots["coco"] / "annotations").mkdir(parents=True, exist_ok=True)
    if yolo:
        for sub in ("images", "labels", "masks"):
            (roots["yolo"] / sub / split).mkdir(parents=True, exist_ok=True)
    main_ids, seg_ids, images, anns = [], [], [], []
    for i in range(n):
        rng = np.random.default_rng([seed, _SPLIT_CODES[split], i])
        img, sem, objects = _draw_image(rng, imgsz, **draw)
        h, w = sem.shape
        img_id = f"{split}_{i:05d}"
        has_det, has_seg = i not in det_off, i not in seg_off
        jpg, png = _encode(img, sem)
        if voc:
            (roots["voc"] / "JPEGImages" / f"{img_id}.jpg").write_bytes(jpg)
            if has_det:
                main_ids.append(img_id)
                (roots["voc"] / "Annotations" / f"{img_id}.xml").write_bytes(_voc_xml(img_id, h, w, objects, names))
            if has_seg:
                seg_ids.append(img_id)
                (roots["voc"] / "SegmentationClass" / f"{img_id}.png").write_bytes(png)
        if coco:
            (roots["coco"] / "images" / split / f"{img_id}.jpg").write_bytes(jpg)
            images.append({"id": i + 1, "file_name": f"{img_id}.jpg", "height": h, "width": w})
            for obj in objects:
                ann = {"id": len(anns) + 1, "image_id": i + 1, "category_id": obj["cls"] + 1, "iscrowd": 0}
                ann["area"] = int(obj["mask"].sum())
                if has_det:
                    x1, y1, x2, y2 = obj["box"]
                    ann["bbox"] = [x1, y1, x2 - x1, y2 - y1]
                if has_seg:
                    kind = rng.random()
                    if kind < 0.15:
                        rle = mask_utils.encode(np.asfortranarray(obj["mask"].astype(np.uint8)))
                        ann["segmentation"] = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
                    elif kind < 0.25:
                        ann["segmentation"] = _uncompressed_rle(obj["mask"])
                    else:
                        ann["segmentation"] = [obj["poly"].reshape(-1).tolist()]
                anns.append(ann)
        if yolo:
            (roots["yolo"] / "images" / split / f"{img_id}.jpg").write_bytes(jpg)
            if has_det:
                lines = []
                for obj in objects:
                    x1, y1, x2, y2 = obj["box"]
                    cx, cy, bw, bh = (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h
                    lines.append(f"{obj['cls']} {cx:.8f} {cy:.8f} {bw:.8f} {bh:.8f}")
                (roots["yolo"] / "labels" / split / f"{img_id}.txt").write_text("\n".join(lines) + "\n")
            else:
                no_det.setdefault(split, []).append(img_id)
            if has_seg:
                (roots["yolo"] / "masks" / split / f"{img_id}.png").write_bytes(png)
    if voc:
        (roots["voc"] / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{k}\n" for k in main_ids))
        (roots["voc"] / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{k}\n" for k in seg_ids))
    if coco:
        cats = [{"id": k + 1, "name": name, "supercategory": name.split("_")[0]} for k, name in enumerate(names)]
        data = {"images": images, "annotations": anns, "categories": cats}
        (roots["coco"] / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
