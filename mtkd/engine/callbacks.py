"""Trainer callbacks: hooks for code that follows a run (benchmarks, tools) without reaching into the trainer.

A callback is any object with some of the hooks of :class:`Callback`
(missing hooks are skipped); pass a list of them as
``Trainer(cfg, callbacks=[...])`` or ``train(cfg, callbacks=[...])``. Each
hook gets the trainer first; callbacks read it (``epoch``, 0-based,
``step``, ``train_wall``, ``best_epoch``, ``model``, ``cfg``, ...) and do
not change it, except to end the run with
:meth:`~mtkd.engine.trainer.Trainer.request_stop`. Time spent in
``on_step_end`` is not counted as training time.

Under DDP ``on_epoch_start``, ``on_step_end`` and ``on_epoch_end`` run on
every rank, ``on_validation_end`` and ``on_train_end`` on rank 0, which
alone validates and writes files.

Built-in callbacks, which the trainer puts before the given ones:

* :class:`EarlyStopping` (installed when ``train.patience`` is set): ends
  the run ``patience`` epochs after the best val score.
* :class:`Plots` (installed when ``train.plots`` is true): draws
  ``val_pred.png`` after each validation and ``curves.png`` after training.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional

from mtkd.errors import writing


class Callback:
    """The hooks, in the order the trainer calls them; every one does nothing here."""

    def on_epoch_start(self, trainer: Any) -> None:
        """Before the first batch of epoch ``trainer.epoch``."""

    def on_step_end(self, trainer: Any, logs: Optional[Dict[str, float]]) -> None:
        """After a training step: its logged loss terms, or ``None`` when it was skipped
        (non-finite loss with ``train.nonfinite: skip``)."""

    def on_validation_end(self, trainer: Any, metrics: Dict[str, float]) -> None:
        """After validating epoch ``trainer.epoch`` (and saving ``best.pt`` when it improved), before
        the epoch is logged and ``last.pt`` saved."""

    def on_epoch_end(self, trainer: Any, means: Dict[str, float]) -> None:
        """After epoch ``trainer.epoch`` is trained, validated, logged and saved: the epoch's mean loss terms."""

    def on_train_end(self, trainer: Any) -> None:
        """Rank 0, after the last epoch (the stop line printed, ``results.csv`` closed), before the test
        report; also when a resumed run had no epoch left to train."""


HOOKS = tuple(name for name in vars(Callback) if name.startswith("on_"))


def implements(callback: Any, hook: str) -> bool:
    """Whether ``callback`` has ``hook`` (the do-nothing hooks of :class:`Callback` do not count)."""
    fn = getattr(callback, hook, None)
    return callable(fn) and getattr(type(callback), hook, None) is not getattr(Callback, hook)


class CallbackList:
    """The run's callbacks: ``callbacks.call("on_step_end", trainer, logs)`` calls that hook on each, in order."""

    def __init__(self, callbacks: Iterable[Any] = ()):
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            if not any(callable(getattr(cb, name, None)) for name in HOOKS):
                raise TypeError(f"callback {cb!r} has none of the hooks {', '.join(HOOKS)}")

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    def has(self, hook: str) -> bool:
        """Whether any callback implements ``hook`` (:func:`implements`)."""
        return any(implements(cb, hook) for cb in self.callbacks)

    def call(self, hook: str, trainer: Any, *args: Any) -> None:
        if hook not in HOOKS:
            raise ValueError(f"unknown callback hook {hook!r}; known: {', '.join(HOOKS)}")
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if callable(fn):
                fn(trainer, *args)


class EarlyStopping(Callback):
    """End the run once ``patience`` epochs have passed since the best val score.

    At the end of each epoch, on rank 0 (the rank that validates and so
    keeps ``trainer.best_epoch`` current), a run whose best epoch
    (``trainer.best_epoch``, 1-based, 0 before the first validation) lies
    ``patience`` or more epochs back is asked to stop
    (``trainer.request_stop("early_stopping", ...)``); every rank stops
    then. The best epoch is the trainer's, checkpointed in ``last.pt``, so a
    resumed run counts from the same epoch; the callback itself keeps no
    state.
    """

    def __init__(self, patience: int):
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience: expected an int >= 1, got {patience!r}")
        self.patience = patience

    def on_epoch_end(self, trainer: Any, means: Dict[str, float]) -> None:
        if not trainer.dist.is_main:
            return
        best = trainer.best_epoch
        if best > 0 and trainer.epoch + 1 - best >= self.patience:
            trainer.request_stop("early_stopping", f"no val improvement for {self.patience} epochs")


class Plots(Callback):
    """``val_pred.png`` (the task's ``draw_val`` on the val set with the evaluated weights) after
    each validation, and ``curves.png`` (:func:`mtkd.engine.plots.plot_loss_curves` of
    ``results.csv``) once after training, both in the run folder.

    ``val_pred.png`` is drawn at the end of a validated epoch, once the epoch
    is logged and ``last.pt`` saved; ``curves.png`` only once, as
    matplotlib takes seconds, and only when the run has logged an epoch.
    matplotlib is imported then, not before.
    """

    def __init__(self) -> None:
        self._validated = False

    def on_validation_end(self, trainer: Any, metrics: Dict[str, float]) -> None:
        self._validated = True

    def on_epoch_end(self, trainer: Any, means: Dict[str, float]) -> None:
        if not self._validated:
            return
        self._validated = False
        path = trainer.out / "val_pred.png"
        with writing(path):
            trainer.task.draw_val(trainer.eval_model, trainer.val_ds, path, trainer.cfg, trainer.device)

    def on_train_end(self, trainer: Any) -> None:
        if not trainer.logger.history:
            return
        from mtkd.engine.plots import plot_loss_curves

        path = trainer.out / "curves.png"
        with writing(path):
            plot_loss_curves(trainer.logger.csv_path, path)
