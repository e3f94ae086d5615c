"""Tasks: one package per kind of learning problem, above the core packages and the engine.

* :mod:`mtkd.tasks.multitask` - detection + segmentation (task ``multitask``);
* :mod:`mtkd.tasks.classify` - ImageFolder classification (task ``classify``).

Each package holds its task object (``task.py``, registered by the config's
``task`` name in :data:`mtkd.registry.TASKS`), its evaluation, metrics,
prediction and drawing. The trainer reaches a task only through that registry
(:func:`mtkd.engine.tasks.get_task`), never by importing these packages.
"""
