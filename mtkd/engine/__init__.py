"""Training engine: config, trainer, checkpoints, EMA, DDP, logging, tasks.

Public entry points: :func:`mtkd.engine.config.load_config`,
:class:`mtkd.engine.trainer.Trainer` / :func:`mtkd.engine.trainer.train`,
:func:`mtkd.engine.trainer.evaluate_checkpoint`,
:func:`mtkd.engine.trainer.predict_checkpoint`,
:func:`mtkd.engine.checkpoint.load_checkpoint`, and the task registry
:func:`mtkd.engine.tasks.register_task` / :func:`mtkd.engine.tasks.get_task`.
Submodules are imported on use (``import mtkd.engine`` stays light).
"""
