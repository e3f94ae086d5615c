"""BSS: distillation on boundary supporting samples.

Heo et al., "Knowledge Distillation with Adversarial Samples Supporting
Decision Boundary", AAAI 2019, https://arxiv.org/pdf/1805.05532.pdf

Reference (AberHu/Knowledge-Distillation-Zoo ``kd_losses/bss.py`` and
``train_bss.py``, after bhheo/BSS_distillation):

* ``BSS(T)(attacked_out_s, attacked_out_t)``: batchmean
  ``KL(softmax(t/T) || softmax(s/T))`` on the adversarial samples, **without**
  the usual T^2 factor (the reference leaves it commented out).
* ``BSSAttacker(step_alpha, num_steps, eps=1e-4).attack(model, img, target,
  attack_class)``: ``num_steps`` iterations of
  ``x += a_b * (p_target - p_attack + eps) * g / ||g||`` with
  ``g = d sum(p_attack - p_target) / dx`` (softmax scores of the teacher),
  ``a_b = step_alpha`` while sample b is still classified as its target and 0
  once it crossed (the loop stops when none is), ``||g||`` the per-sample L2
  norm, and the result clamped to [-2.5, 2.5] after every step.
* Sample and class selection (``train_bss.py``): attack the samples that both
  models classify correctly; when more than ``attack_size``, keep those with
  the largest ``sum_{c != target} (p_t - p_s)^2``; the attack class is drawn
  from the teacher's non-top classes with probability proportional to their
  teacher scores (the second-best class when the draw finds none).

Conventions and deviations:

* The attacker takes the gradient with ``torch.autograd.grad`` with respect
  to the image only, so it never touches the teacher's ``.grad``
  (the reference calls ``backward`` on a frozen teacher).
* ``||g||`` is clamped at 1e-12 so a zero gradient gives no step rather
  than NaN.
* ``clamp`` (default the reference's ``(-2.5, 2.5)``, which suits
  mean/std-normalised images) is a keyword argument of the attacker.
* The reference's schedule for the loss weight (0 for 10 epochs, then linear
  decay) is not part of the loss; use the trainer's weight for it.

The adapter is classification only (ConfigError without ``"logits"``). It is
bound to the student and teacher (``bind``) because it runs the teacher for
the attack and both models on the adversarial samples; the student's pass on
them carries gradient, the teacher's does not.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mtkd.errors import ConfigError
from mtkd.losses._common import need_teacher
from mtkd.losses._functional import soft_kl
from mtkd.losses.base import Loss, register
from mtkd.losses.zoo._adapt import zero_like_graph
from mtkd.losses.zoo.sobolev import classification_inputs


class BSS(nn.Module):
    """Tensor core: batchmean KL at temperature ``T``, no T^2 factor."""

    def __init__(self, T: float):
        super().__init__()
        self.T = float(T)

    def forward(self, attacked_out_s: torch.Tensor, attacked_out_t: torch.Tensor) -> torch.Tensor:
        return soft_kl(attacked_out_s, attacked_out_t, self.T, reduction="batchmean")


class BSSAttacker:
    """Iterative attack that pushes samples toward the ``attack_class`` boundary."""

    def __init__(self, step_alpha: float, num_steps: int, eps: float = 1e-4,
                 clamp: Tuple[float, float] = (-2.5, 2.5)):
        self.step_alpha = float(step_alpha)
        self.num_steps = int(num_steps)
        self.eps = float(eps)
        self.clamp = (float(clamp[0]), float(clamp[1]))

    def attack(self, model: Callable[[torch.Tensor], torch.Tensor], img: torch.Tensor,
               target: torch.Tensor, attack_class: torch.Tensor) -> torch.Tensor:
        """``model`` maps images to logits; returns the detached adversarial images."""
        x = img.detach().clone()
        for _ in range(self.num_steps):
            x.requires_grad_(True)
            with torch.enable_grad():
                output = model(x)
                score = F.softmax(output, dim=1)
                score_target = score.gather(1, target.unsqueeze(1))
                score_attack = score.gather(1, attack_class.unsqueeze(1))
                g = torch.autograd.grad((score_attack - score_target).sum(), x)[0]
            x = x.detach()
            alpha = self.step_alpha * (target == output.argmax(1)).to(x.dtype)
            if alpha.sum() == 0:
                break
            alpha = alpha.view(-1, 1, 1, 1)
            pert = (score_target - score_attack).detach().view(-1, 1, 1, 1)
            norm = g.pow(2).sum(dim=(1, 2, 3), keepdim=True).sqrt().clamp(min=1e-12)
            x = torch.clamp(x + alpha * (pert + self.eps) * g / norm, *self.clamp)
        return x.detach()


def select_attack(out_s: torch.Tensor, out_t: torch.Tensor, target: torch.Tensor,
                  attack_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(indices of the samples to attack, their attack classes), as ``train_bss.py``."""
    out_s, out_t = out_s.detach(), out_t.detach()
    flag = (out_s.argmax(1) == target) & (out_t.argmax(1) == target)
    idx = flag.nonzero().view(-1)
    if idx.numel() == 0:
        return idx, idx
    if idx.numel() > attack_size:
        diff = (F.softmax(out_t[idx], 1) - F.softmax(out_s[idx], 1)) ** 2
        score = diff.sum(dim=1) - diff.gather(1, target[idx].unsqueeze(1)).view(-1)
        idx = idx[score.sort(descending=True)[1][:attack_size]]
    class_score, class_idx = F.softmax(out_t[idx], 1).sort(dim=1, descending=True)
    class_score, class_idx = class_score[:, 1:], class_idx[:, 1:]
    draw = class_score.sum(dim=1) * torch.rand(idx.numel(), device=out_t.device)
    # First class whose cumulative score reaches the draw; argmax of an all-False row is 0,
    # the second-best class, which is also the reference's fallback.
    pick = (class_score.cumsum(dim=1) >= draw.unsqueeze(1)).to(torch.uint8).argmax(dim=1)
    return idx, class_idx.gather(1, pick.unsqueeze(1)).view(-1)


@register("bss")
class BSSLoss(Loss):
    """Adapter: attack, then :class:`BSS` on both models' logits for the
    adversarial samples (0, still connected to the graph, when no sample is
    correctly classified by both). Defaults as the reference's
    ``train_bss.py``: ``T=3``, ``attack_size=32``, ``step_alpha=0.3``,
    ``num_steps=10``, ``eps=1e-4``."""

    requires = frozenset({"teacher", "labels"})

    def __init__(self, T: float = 3.0, attack_size: int = 32, step_alpha: float = 0.3,
                 num_steps: int = 10, eps: float = 1e-4, clamp: Tuple[float, float] = (-2.5, 2.5)):
        super().__init__()
        if int(attack_size) < 1:
            raise ConfigError(f"loss 'bss': attack_size: must be >= 1, got {attack_size}")
        self.attack_size = int(attack_size)
        self.core = BSS(T)
        self.attacker = BSSAttacker(step_alpha, num_steps, eps, tuple(clamp))
        self._models: List[nn.Module] = []

    def bind(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        self._models = [student, teacher] if teacher is not None else []

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> torch.Tensor:
        teacher_out = need_teacher("bss", teacher_out)
        out_s, out_t, target = classification_inputs(student_out, teacher_out, batch, "bss")
        if not self._models:
            raise ConfigError("loss 'bss': not bound to a student and a teacher (the trainer calls bind)")
        student, teacher = self._models
        idx, attack_class = select_attack(out_s, out_t, target, self.attack_size)
        if idx.numel() == 0:
            return zero_like_graph(out_s)

        def teacher_logits(x: torch.Tensor) -> torch.Tensor:
            return teacher(x)["logits"]

        images = batch["images"].detach()[idx]
        attacked = self.attacker.attack(teacher_logits, images, target[idx], attack_class)
        with torch.no_grad():
            attacked_t = teacher_logits(attacked)
        attacked_s = student(attacked)["logits"]
        return self.core(attacked_s, attacked_t)
