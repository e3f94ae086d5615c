"""Trainer callbacks: hooks for code that follows a run (benchmarks, tools) without reaching into the trainer.

A callback is any object with some of the hooks of :class:`Callback`
(missing hooks are skipped); pass a list of them as
``Trainer(cfg, callbacks=[...])`` or ``train(cfg, callbacks=[...])``. Each
hook gets the trainer first; callbacks read it (``epoch``, 0-based,
``step``, ``train_wall``, ``model``, ``cfg``, ...) and do not change it.
Time spent in ``on_step_end`` is not counted as training time.

Under DDP ``on_epoch_start``, ``on_step_end`` and ``on_epoch_end`` run on
every rank, ``on_validation_end`` on rank 0, which alone validates.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional


class Callback:
    """The hooks, in the order the trainer calls them; every one does nothing here."""

    def on_epoch_start(self, trainer: Any) -> None:
        """Before the first batch of epoch ``trainer.epoch``."""

    def on_step_end(self, trainer: Any, logs: Optional[Dict[str, float]]) -> None:
        """After a training step: its logged loss terms, or ``None`` when it was skipped
        (non-finite loss with ``train.nonfinite: skip``)."""

    def on_validation_end(self, trainer: Any, metrics: Dict[str, float]) -> None:
        """After validating epoch ``trainer.epoch`` (and saving ``best.pt`` when it improved)."""

    def on_epoch_end(self, trainer: Any, means: Dict[str, float]) -> None:
        """After epoch ``trainer.epoch`` is trained, validated, logged and saved: the epoch's mean loss terms."""


HOOKS = tuple(name for name in vars(Callback) if name.startswith("on_"))


class CallbackList:
    """The run's callbacks: ``callbacks.call("on_step_end", trainer, logs)`` calls that hook on each, in order."""

    def __init__(self, callbacks: Iterable[Any] = ()):
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            if not any(callable(getattr(cb, name, None)) for name in HOOKS):
                raise TypeError(f"callback {cb!r} has none of the hooks {', '.join(HOOKS)}")

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    def call(self, hook: str, trainer: Any, *args: Any) -> None:
        if hook not in HOOKS:
            raise ValueError(f"unknown callback hook {hook!r}; known: {', '.join(HOOKS)}")
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if callable(fn):
                fn(trainer, *args)
