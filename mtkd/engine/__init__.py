"""Training engine: config, trainer, EMA, DDP, logging, the task interface and registry.

Public entry points: :func:`mtkd.engine.config.load_config`,
:class:`mtkd.engine.trainer.Trainer` / :func:`mtkd.engine.trainer.train`,
:func:`mtkd.engine.trainer.evaluate_checkpoint`,
:func:`mtkd.engine.trainer.predict_checkpoint`, and the task registry
:func:`mtkd.engine.tasks.register_task` / :func:`mtkd.engine.tasks.get_task`.
The tasks themselves (data, models, evaluation, prediction, drawing) live in
:mod:`mtkd.tasks`. Checkpoint files are read and written by :mod:`mtkd.checkpoint`.
Submodules are imported on use (``import mtkd.engine`` stays light).
"""
