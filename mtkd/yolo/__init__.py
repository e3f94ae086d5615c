"""mtkd's plug-in to Ultralytics YOLO: output-level and neck-feature distillation.

* :mod:`mtkd.yolo.adapter`: Ultralytics ``Detect`` output -> :class:`mtkd.structures.DetOutput`.
* :mod:`mtkd.yolo.losses`: the ``kd_*`` keys -> mtkd's registered distillation losses.
* :mod:`mtkd.yolo.teacher`: ``kd_teacher`` -> a frozen teacher (YOLO detection ``.pt`` or mtkd checkpoint).
* :mod:`mtkd.yolo.trainer`: ``KDDetectionTrainer``, a ``DetectionTrainer`` subclass.
* :mod:`mtkd.yolo.prune`: ``mtkd yolo prune``, channel pruning into a stock Ultralytics checkpoint.
* :mod:`mtkd.yolo.cli`: ``main(argv)`` for ``mtkd yolo train|prune key=value ...``.

Nothing here is imported eagerly, so ``import mtkd.yolo`` stays cheap.
"""
