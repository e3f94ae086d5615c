"""A synthetic, offline ImageFolder whose classes differ in texture, not colour.

Each class is one (orientation, spatial frequency) pair of a sinusoidal
grating. Every image draws, independently of its class:

* two random colours; the grating's luminance blends between them, so colour
  and mean brightness carry no class information;
* the grating's phase, a +-30 % jitter of the class's frequency and an
  orientation jitter of +-30 % of the gap between neighbouring orientations;
* a random rectangular window (40-90 % of each side) where the texture shows,
  a flat background elsewhere, and Gaussian pixel noise (sigma 0.12).

Classes are laid out on an ``n_orient x n_freq`` grid (``n_orient =
ceil(sqrt(n_classes))``), so neighbouring classes are close in orientation or
frequency and telling them apart takes fine texture analysis under noise:
accuracy grows with model capacity rather than saturating at once.
Class names are ``class00``, ``class01``, ...; a ``labels.txt`` (``index
name`` per line) is written beside the splits for ``predict``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image

from mtkd.errors import ConfigError


def _class_params(n_classes: int) -> list:
    n_orient = math.ceil(math.sqrt(n_classes))
    n_freq = math.ceil(n_classes / n_orient)
    params = []
    for k in range(n_classes):
        o, f = k % n_orient, k // n_orient
        theta = math.pi * o / n_orient
        cycles = 3.0 * (1.6 ** f)  # cycles across the image side
        params.append((theta, cycles, math.pi / n_orient))
    return params


def render_texture(rng: np.random.Generator, imgsz: int, theta: float, cycles: float,
                   theta_gap: float) -> np.ndarray:
    """One HxWx3 uint8 image of the texture class ``(theta, cycles)``."""
    theta = theta + rng.uniform(-0.3, 0.3) * theta_gap
    freq = cycles * rng.uniform(0.7, 1.3) / imgsz
    yy, xx = np.mgrid[0:imgsz, 0:imgsz].astype(np.float64)
    grating = np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) + rng.uniform(0, 2 * np.pi))
    window = np.zeros((imgsz, imgsz))
    h, w = (int(imgsz * rng.uniform(0.4, 0.9)) for _ in range(2))
    y0, x0 = rng.integers(0, imgsz - h + 1), rng.integers(0, imgsz - w + 1)
    window[y0:y0 + h, x0:x0 + w] = 1.0
    lum = 0.5 + 0.4 * grating * window + rng.normal(0.0, 0.12, size=(imgsz, imgsz))
    lum = np.clip(lum, 0.0, 1.0)[..., None]
    c0, c1 = rng.uniform(0, 1, size=3), rng.uniform(0, 1, size=3)
    rgb = (1 - lum) * c0 + lum * c1
    return (rgb * 255).round().astype(np.uint8)


def make_synthetic_imagefolder(out: Union[str, Path], n_classes: int = 4, n_per_class: int = 16,
                               imgsz: int = 64, seed: int = 0, n_val_per_class: Optional[int] = None) -> Path:
    """Write ``out/train/<class>/*.png`` (``n_per_class`` each),
    ``out/val/<class>/*.png`` (``n_val_per_class``, default
    ``max(1, n_per_class // 4)``) and ``out/labels.txt``; returns ``out``.
    Deterministic in ``seed``."""
    if n_classes < 2:
        raise ConfigError(f"n_classes: need at least 2 classes, got {n_classes}")
    if n_per_class < 1 or imgsz < 8:
        raise ConfigError(f"n_per_class/imgsz: need n_per_class >= 1 and imgsz >= 8, got {n_per_class}, {imgsz}")
    out = Path(out)
    n_val = max(1, n_per_class // 4) if n_val_per_class is None else int(n_val_per_class)
    rng = np.random.default_rng(seed)
    params = _class_params(n_classes)
    names = [f"class{k:02d}" for k in range(n_classes)]
    for split, count in (("train", n_per_class), ("val", n_val)):
        for k, name in enumerate(names):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = render_texture(rng, imgsz, *params[k])
                Image.fromarray(img).save(folder / f"{name}_{i:04d}.png")
    (out / "labels.txt").write_text("".join(f"{k} {n}\n" for k, n in enumerate(names)))
    return out
