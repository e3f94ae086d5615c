"""Evaluate a classifier on a loader: ``top1``, ``top5`` and the mean cross-entropy ``loss``."""
from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Optional

import torch
from torch import nn

from mtkd.errors import ConfigError
from mtkd.tasks.classify.metrics import TopK


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Mapping[str, Any]], dataset: Any, device: torch.device,
             max_batches: Optional[int] = None) -> Dict[str, float]:
    """:class:`~mtkd.tasks.classify.metrics.TopK` metrics of ``model`` on the batches of ``loader``
    (``images``, ``labels``) drawn from ``dataset`` (its ``classes`` give k).

    ``max_batches`` stops after that many batches. The model runs in eval mode
    under ``no_grad``; its previous mode is restored. No evaluated sample
    (an empty split or ``eval.max_batches`` 0) is a ConfigError.
    """
    was_training = model.training
    model.eval()
    metric = TopK(len(dataset.classes))
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            images, labels = batch["images"].to(device), batch["labels"].to(device)
            metric.update(model(images)["logits"], labels)
    finally:
        model.train(was_training)
    if metric.n == 0:
        raise ConfigError("eval: no samples were evaluated (empty split or eval.max_batches = 0)")
    return metric.compute()
