"""Evaluate a classifier on a loader: ``top1``, ``top5`` and the mean cross-entropy ``loss``; with an
attack, also ``robust_top1``, the top-1 on the attacked images."""
from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from mtkd.adversarial.attacks import AttackSpec, attack_classifier, make_attack
from mtkd.errors import ConfigError
from mtkd.tasks.classify.metrics import TopK


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Mapping[str, Any]], dataset: Any, device: torch.device,
             max_batches: Optional[int] = None, attack: Optional[AttackSpec] = None,
             mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
             seed: int = 0) -> Dict[str, float]:
    """:class:`~mtkd.tasks.classify.metrics.TopK` metrics of ``model`` on the batches of ``loader``
    (``images``, ``labels``) drawn from ``dataset`` (its ``classes`` give k).

    ``max_batches`` stops after that many batches. The model runs in eval mode
    under ``no_grad``; its previous mode is restored. No evaluated sample
    (an empty split or ``eval.max_batches`` 0) is a ConfigError. With
    ``attack``, each batch is also attacked against its labels (0..1 pixels
    through ``mean``/``std``; random starts drawn from ``seed``, so repeated
    evaluations of one model agree) and ``robust_top1`` is the top-1 on the
    attacked images.
    """
    was_training = model.training
    model.eval()
    metric = TopK(len(dataset.classes))
    robust = TopK(len(dataset.classes)) if attack is not None else None
    generator = torch.Generator(device=device).manual_seed(seed) if attack is not None else None
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            images, labels = batch["images"].to(device), batch["labels"].to(device)
            metric.update(model(images)["logits"], labels)
            if robust is not None:
                with torch.enable_grad():
                    adv = attack_classifier(model, images, attack, labels, mean, std, generator)
                robust.update(model(adv)["logits"], labels)
    finally:
        model.train(was_training)
    if metric.n == 0:
        raise ConfigError("eval: no samples were evaluated (empty split or eval.max_batches = 0)")
    out = metric.compute()
    if robust is not None:
        out["robust_top1"] = robust.compute()["top1"]
    return out


def eval_attack(cfg: Mapping[str, Any]) -> Optional[AttackSpec]:
    """The attack of ``eval.attack`` (``{name, eps, steps, step_size, random_start}``), or None."""
    spec = cfg.get("attack")
    if spec is None:
        return None
    if not isinstance(spec, Mapping) or "eps" not in spec:
        raise ConfigError(f"eval.attack: expected a mapping such as {{name: pgd, eps: 4/255, steps: 10}}, got {spec!r}")
    unknown = set(spec) - {"name", "eps", "steps", "step_size", "random_start"}
    if unknown:
        raise ConfigError(f"eval.attack: unknown key(s) {', '.join(sorted(unknown))}; "
                          "known: name, eps, steps, step_size, random_start")
    return make_attack(str(spec.get("name", "pgd")), spec["eps"], spec.get("steps"), spec.get("step_size"),
                       spec.get("random_start"), key="eval.attack")
