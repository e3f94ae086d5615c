"""``mixup_kd``: function matching, the teacher queried on mixed images.

Beyer, Zhai, Royer, Markeeva, Anil & Kolesnikov, "Knowledge distillation: A
good teacher is patient and consistent", CVPR 2022,
https://arxiv.org/abs/2106.05237

The paper's "function matching": student and teacher see the *same* input,
and that input is a mixup of two training images, so the student matches the
teacher's function between the images too, not only at them. It needs no
labels and never differentiates through the teacher (it is only queried), so
it also trains a surrogate of a black-box model (``benchmarks/transfer``).

``pre_step`` mixes each image with another one of the batch (a random
permutation): ``x_mix = lam * x + (1 - lam) * x[perm]``, one ``lam ~ Beta(a,
a)`` per image (``mix_alpha`` a, 1: uniform). Mixing normalised images equals
mixing pixels, so no normalisation is needed. The loss declares
``adv_split`` and ``adv_teacher`` (:mod:`mtkd.losses.base`): the trainer runs
one student forward and one teacher forward on ``cat([x, x_mix])`` (under
``no_grad`` for the teacher), and::

    w_mix   * T^2 KL(S(x_mix) || T(x_mix))
    w_clean * T^2 KL(S(x)     || T(x))

(batchmean, as ``st``). The paper's setting is ``w_clean 0`` at ``T 1`` with
long schedules; ``w_clean 1`` keeps plain KD on the images themselves and
adds the mixed queries to it. Works on classification logits (``output``,
default ``logits``); per-pixel logits (``seg``) are flattened as ``st`` does
(no VOID masking: a mixed image has no labels). At most one loss that makes
``adv_images`` per run.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from mtkd.errors import ConfigError
from mtkd.losses._common import need_teacher
from mtkd.losses.adversarial import kl_to
from mtkd.losses.base import Loss, register
from mtkd.losses.zoo._adapt import flatten_pixels, get_output


@register("mixup_kd")
class MixupKDLoss(Loss):
    """Function matching on mixed images plus (``w_clean``) KD on the images themselves (module doc)."""

    requires = frozenset({"teacher", "adv_split", "adv_teacher"})

    def __init__(self, T: float = 1.0, w_mix: float = 1.0, w_clean: float = 1.0, mix_alpha: float = 1.0,
                 output: str = "logits"):
        super().__init__()
        if float(T) <= 0:
            raise ConfigError(f"loss mixup_kd.T: must be > 0, got {T}")
        if float(mix_alpha) <= 0:
            raise ConfigError(f"loss mixup_kd.mix_alpha: must be > 0, got {mix_alpha}")
        for key, value in (("w_mix", w_mix), ("w_clean", w_clean)):
            if float(value) < 0:
                raise ConfigError(f"loss mixup_kd.{key}: must be >= 0, got {value}")
        self.T, self.w_mix, self.w_clean = float(T), float(w_mix), float(w_clean)
        self.mix_alpha, self.output = float(mix_alpha), str(output)

    def pre_step(self, batch: Dict[str, Any], student: nn.Module, teacher: Optional[nn.Module]) -> Dict[str, Any]:
        images = batch["images"]
        n = images.shape[0]
        perm = torch.randperm(n, device=images.device)
        if self.mix_alpha == 1.0:
            lam = torch.rand(n, device=images.device)
        else:
            a = torch.full((n,), self.mix_alpha, device=images.device)
            lam = torch.distributions.Beta(a, a).sample()
        lam = lam.to(images.dtype).view(n, *([1] * (images.dim() - 1)))
        batch = dict(batch)
        batch["adv_images"] = (lam * images + (1 - lam) * images[perm]).detach()
        return batch

    def _term(self, s: Dict[str, Any], t: Dict[str, Any]) -> torch.Tensor:
        ls = get_output(s, self.output, "mixup_kd")
        lt = get_output(t, self.output, "mixup_kd").detach()
        if ls.shape != lt.shape:
            raise ConfigError(f"loss 'mixup_kd': key {self.output!r}: student {tuple(ls.shape)} and teacher "
                              f"{tuple(lt.shape)} logits differ in shape")
        return kl_to(flatten_pixels(ls), flatten_pixels(lt), self.T)

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        teacher_out = need_teacher("mixup_kd", teacher_out)
        s_mix, t_mix = student_out.get("adv"), teacher_out.get("adv")
        if s_mix is None or t_mix is None:
            raise ConfigError("loss 'mixup_kd': the outputs have no mixed half ('adv'); it is made by the "
                              "trainer's split forward after pre_step")
        terms: Dict[str, torch.Tensor] = {}
        if self.w_mix > 0:
            terms["mix"] = self.w_mix * self._term(s_mix, t_mix)
        if self.w_clean > 0 or not terms:
            terms["clean"] = self.w_clean * self._term(student_out, teacher_out)
        return terms
