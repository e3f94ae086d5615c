"""Losses: hard task losses, distillation losses and the classic KD zoo.

Every module below this package is imported once here, so each loss's
``@register(name)`` line is its only registration.
"""
import importlib
import pkgutil

from mtkd.losses.base import Loss, available, build_loss, register  # noqa: F401


def _discover() -> None:
    for info in pkgutil.walk_packages(__path__, prefix=__name__ + "."):
        importlib.import_module(info.name)


_discover()
