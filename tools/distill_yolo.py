#!/usr/bin/env python
"""Distil into an Ultralytics YOLO detector: ``python tools/distill_yolo.py key=value ...``.

Same arguments as ``mtkd yolo train`` (see :mod:`mtkd.yolo.cli`), e.g.::

    python tools/distill_yolo.py model=yolo11n.yaml teacher=runs/detect/t/weights/best.pt \
        data=data.yaml epochs=50 imgsz=640 batch=16 device=0 kd_feat=1.0
"""
import sys

import mtkd  # noqa: F401  (offline switches before Ultralytics is imported)
from mtkd.yolo.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
