#!/usr/bin/env python
"""Distil into an Ultralytics YOLO detector: ``python tools/distill_yolo.py key=value ...``.

Same arguments as ``mtkd yolo`` (see :mod:`mtkd.yolo.cli`), ``--offline`` included, e.g.::

    python tools/distill_yolo.py model=yolo11n.yaml teacher=runs/detect/t/weights/best.pt \
        data=data.yaml epochs=50 imgsz=640 batch=16 device=0 kd_feat=1.0
"""
import sys

from mtkd.cli import main

if __name__ == "__main__":
    sys.exit(main(["yolo", *sys.argv[1:]]))
