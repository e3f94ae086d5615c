"""Losses: hard task losses, distillation losses and the classic KD zoo.

Each loss module registers its loss with one ``@register(name)`` line in
:data:`mtkd.registry.LOSSES`, which imports every module below this package
on its first lookup (:func:`build_loss`, :func:`available`).
"""
from mtkd.losses.base import Loss, available, build_loss, register  # noqa: F401
