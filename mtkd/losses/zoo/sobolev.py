"""Sobolev: matching the input gradients of the target-class logit.

Czarnecki et al., "Sobolev Training for Neural Networks", NeurIPS 2017,
https://arxiv.org/pdf/1706.04859.pdf; Srinivas & Fleuret, "Knowledge Transfer
with Jacobian Matching", ICML 2018, http://de.arxiv.org/pdf/1803.00443

Reference (AberHu/Knowledge-Distillation-Zoo ``kd_losses/sobolev.py``),
``Sobolev()(out_s, out_t, img, target)``: for each model, the gradient of the
ground-truth class's logit ``out[b, target[b]]`` with respect to the input
image, flattened per sample and L2-normalised; the loss is ``mse`` (mean over
B x 3HW) between the student's and the detached teacher's normalised
gradients. The student's gradient is taken with ``create_graph=True`` so the
loss trains the student (double backward). ``img`` must require grad before
both forwards (the reference sets ``img.requires_grad = True``).

The teacher's gradient is detached, so it is taken without
``create_graph`` (same value, less memory). Classification only: the adapter
raises ConfigError when the outputs have no ``"logits"``.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import grad

from mtkd.errors import ConfigError
from mtkd.losses._common import need_teacher
from mtkd.losses.base import Loss, register


def target_logit_grad(out: torch.Tensor, inputs: torch.Tensor, target: torch.Tensor,
                      create_graph: bool) -> torch.Tensor:
    """d out[b, target[b]] / d inputs, summed over the batch (per-sample
    gradients, since samples do not interact)."""
    picked = torch.gather(out, 1, target.view(-1, 1))
    return grad(outputs=picked, inputs=inputs, grad_outputs=torch.ones_like(picked),
                create_graph=create_graph, retain_graph=True)[0]


class Sobolev(nn.Module):
    """Tensor core: MSE of the L2-normalised input gradients of the target logit."""

    def forward(self, out_s: torch.Tensor, out_t: torch.Tensor, img: torch.Tensor,
                target: torch.Tensor) -> torch.Tensor:
        grad_s = target_logit_grad(out_s, img, target, create_graph=True)
        grad_t = target_logit_grad(out_t, img, target, create_graph=False)
        norm_s = F.normalize(grad_s.reshape(grad_s.shape[0], -1), p=2, dim=1)
        norm_t = F.normalize(grad_t.reshape(grad_t.shape[0], -1), p=2, dim=1)
        return F.mse_loss(norm_s, norm_t.detach())


def classification_inputs(student_out: Dict[str, Any], teacher_out: Dict[str, Any],
                          batch: Dict[str, Any], loss: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(student logits, teacher logits with graph, labels (B,)) or ConfigError."""
    if student_out.get("logits") is None or teacher_out.get("logits") is None:
        raise ConfigError(f"loss {loss!r}: classification only: the model outputs have no 'logits'")
    labels = batch.get("labels")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        raise ConfigError(f"loss {loss!r}: classification only: batch['labels'] must be a (B,) tensor")
    return student_out["logits"], teacher_out["logits"], labels.to(student_out["logits"].device)


def check_graph(t: torch.Tensor, what: str, loss: str) -> None:
    """ConfigError when ``t`` carries no autograd graph (a declared hook was not honoured)."""
    if not t.requires_grad:
        raise ConfigError(f"loss {loss!r}: {what} has no autograd graph; the trainer must honour "
                          f"the loss's requires {{'input_grad', 'teacher_grad'}}")


@register("sobolev")
class SobolevLoss(Loss):
    """Adapter: :class:`Sobolev` on ``out["logits"]``, ``batch["images"]`` and
    ``batch["labels"]`` (classification only)."""

    requires = frozenset({"teacher", "teacher_grad", "input_grad", "labels"})

    def __init__(self) -> None:
        super().__init__()
        self.core = Sobolev()

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> torch.Tensor:
        teacher_out = need_teacher("sobolev", teacher_out)
        out_s, out_t, target = classification_inputs(student_out, teacher_out, batch, "sobolev")
        img = batch["images"]
        check_graph(img, "batch['images']", "sobolev")
        check_graph(out_t, "the teacher's logits", "sobolev")
        return self.core(out_s, out_t, img, target)
