"""Detection + segmentation: the ``multitask`` task, its evaluation, metrics, prediction and drawing.

Modules: :mod:`~mtkd.tasks.multitask.task` (:class:`MultiTaskTask`),
:mod:`~mtkd.tasks.multitask.evaluation` (scores in original image pixels),
:mod:`~mtkd.tasks.multitask.metrics` (COCO/VOC mAP, mIoU),
:mod:`~mtkd.tasks.multitask.predict` (the inference path and ``mtkd predict``),
:mod:`~mtkd.tasks.multitask.plots` (drawing predictions). Importing the
package imports none of them.
"""
