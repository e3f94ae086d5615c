"""Mixup as losses: ``mixup_kd`` (function matching) and ``mixup_ce`` (mixup training).

Both make ``batch["adv_images"]`` in ``pre_step``: each image mixed with
another one of the batch (a random permutation ``perm``), ``x_mix = lam * x +
(1 - lam) * x[perm]``, one ``lam ~ Beta(a, a)`` per image (``mix_alpha`` a;
1, the default, is uniform). Mixing normalised images equals mixing pixels,
so no normalisation is needed. ``perm`` and ``lam`` are kept in the batch
(``mix_perm``, ``mix_lam``). The losses declare ``adv_split``
(:mod:`mtkd.losses.base`): the trainer runs one student forward on
``cat([x, x_mix])`` and hands the mixed half over as ``student_out["adv"]``.
At most one loss that makes ``adv_images`` per run.

``mixup_kd``
------------
Beyer, Zhai, Royer, Markeeva, Anil & Kolesnikov, "Knowledge distillation: A
good teacher is patient and consistent", CVPR 2022,
https://arxiv.org/abs/2106.05237

The paper's "function matching": student and teacher see the *same* input,
and that input is a mixup of two training images, so the student matches the
teacher's function between the images too, not only at them. It needs no
labels and never differentiates through the teacher (declares
``adv_teacher``: the teacher's forward on ``cat([x, x_mix])`` runs under
``no_grad``, it is only queried), so it also trains a surrogate of a
black-box model (``benchmarks/transfer``)::

    w_mix   * T^2 KL(S(x_mix) || T(x_mix))
    w_clean * T^2 KL(S(x)     || T(x))

(batchmean, as ``st``). The paper's setting is ``w_clean 0`` at ``T 1`` with
long schedules; ``w_clean 1`` keeps plain KD on the images themselves and
adds the mixed queries to it. Works on classification logits (``output``,
default ``logits``); per-pixel logits (``seg``) are flattened as ``st`` does
(no VOID masking: a mixed image has no labels).

``output: multitask`` distils a detection + segmentation student: each term
is ``seg_kl`` (at ``T``) + ``det_mse`` between the student's and the
teacher's outputs, as ``adv_kd``'s multi-task terms; ``seg_kd`` and
``det_kd`` (``{name, weight, **options}``) replace either loss or its
settings (``weight: 0`` drops it). On the mixed half the batch's masks are
left out, so every pixel of a mixed image counts (a mixture has no labels
and no void). Use ``w_clean: 0`` when ``loss.det``/``loss.seg`` already
distil the clean images.

``mixup_ce``
------------
Zhang, Cisse, Dauphin & Lopez-Paz, "mixup: Beyond Empirical Risk
Minimization", ICLR 2018, https://arxiv.org/abs/1710.09412

Mixup training on labels, no teacher: ``w_mix * (lam CE(S(x_mix), y) + (1 -
lam) CE(S(x_mix), y[perm]))``, the mean over images. The clean CE stays with
the ``ce`` loss, so ``[ce, mixup_ce]`` trains on clean and mixed images
together, as ``mixup_kd`` does with a teacher: the label-only counterpart of
function matching.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mtkd.errors import ConfigError
from mtkd.losses._common import need_teacher, seg_det_terms, sub_loss
from mtkd.losses.adversarial import kl_to
from mtkd.losses.base import Loss, register
from mtkd.losses.zoo._adapt import flatten_pixels, get_output


class _Mixing(Loss):
    """``pre_step`` mixes the batch (module doc); subclasses compute the terms."""

    requires = frozenset({"adv_split"})

    def __init__(self, name: str, w_mix: float, mix_alpha: float):
        super().__init__()
        self.name = name
        if float(mix_alpha) <= 0:
            raise ConfigError(f"loss {name}.mix_alpha: must be > 0, got {mix_alpha}")
        if float(w_mix) < 0:
            raise ConfigError(f"loss {name}.w_mix: must be >= 0, got {w_mix}")
        self.w_mix, self.mix_alpha = float(w_mix), float(mix_alpha)

    def pre_step(self, batch: Dict[str, Any], student: nn.Module, teacher: Optional[nn.Module]) -> Dict[str, Any]:
        images = batch["images"]
        n = images.shape[0]
        perm = torch.randperm(n, device=images.device)
        if self.mix_alpha == 1.0:
            lam = torch.rand(n, device=images.device)
        else:
            a = torch.full((n,), self.mix_alpha, device=images.device)
            lam = torch.distributions.Beta(a, a).sample()
        shaped = lam.to(images.dtype).view(n, *([1] * (images.dim() - 1)))
        batch = dict(batch)
        batch["adv_images"] = (shaped * images + (1 - shaped) * images[perm]).detach()
        batch["mix_perm"], batch["mix_lam"] = perm, lam
        return batch

    def _mixed(self, out: Dict[str, Any], who: str) -> Dict[str, Any]:
        mixed = out.get("adv")
        if mixed is None:
            raise ConfigError(f"loss {self.name!r}: the {who} output has no mixed half ('adv'); it is made by the "
                              "trainer's split forward after pre_step")
        return mixed


@register("mixup_kd")
class MixupKDLoss(_Mixing):
    """Function matching on mixed images plus (``w_clean``) KD on the images themselves (module doc)."""

    requires = frozenset({"teacher", "adv_split", "adv_teacher"})

    def __init__(self, T: float = 1.0, w_mix: float = 1.0, w_clean: float = 1.0, mix_alpha: float = 1.0,
                 output: str = "logits", seg_kd: Optional[Mapping[str, Any]] = None,
                 det_kd: Optional[Mapping[str, Any]] = None):
        super().__init__("mixup_kd", w_mix, mix_alpha)
        if float(T) <= 0:
            raise ConfigError(f"loss mixup_kd.T: must be > 0, got {T}")
        if float(w_clean) < 0:
            raise ConfigError(f"loss mixup_kd.w_clean: must be >= 0, got {w_clean}")
        self.T, self.w_clean, self.output = float(T), float(w_clean), str(output)
        self.multitask = self.output == "multitask"
        if not self.multitask and (seg_kd is not None or det_kd is not None):
            raise ConfigError("loss mixup_kd.seg_kd/det_kd: only with output multitask")
        if self.multitask:
            self.seg_kd, self.seg_w = sub_loss("mixup_kd", "seg_kd", seg_kd, {"name": "seg_kl", "T": self.T})
            self.det_kd, self.det_w = sub_loss("mixup_kd", "det_kd", det_kd, {"name": "det_mse"})

    def _multitask_term(self, s: Dict[str, Any], t: Dict[str, Any], batch: Dict[str, Any]) -> torch.Tensor:
        pairs = (("seg", self.seg_kd, self.seg_w), ("det", self.det_kd, self.det_w))
        terms = seg_det_terms(pairs, s, t, batch)
        if not terms:
            raise ConfigError("loss mixup_kd (multitask): student and teacher share no seg or det output")
        return sum(terms.values())

    def _term(self, s: Dict[str, Any], t: Dict[str, Any], batch: Dict[str, Any]) -> torch.Tensor:
        if self.multitask:
            return self._multitask_term(s, t, batch)
        ls = get_output(s, self.output, "mixup_kd")
        lt = get_output(t, self.output, "mixup_kd").detach()
        if ls.shape != lt.shape:
            raise ConfigError(f"loss 'mixup_kd': key {self.output!r}: student {tuple(ls.shape)} and teacher "
                              f"{tuple(lt.shape)} logits differ in shape")
        return kl_to(flatten_pixels(ls), flatten_pixels(lt), self.T)

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        teacher_out = need_teacher("mixup_kd", teacher_out)
        terms: Dict[str, torch.Tensor] = {}
        if self.w_mix > 0:
            unlabelled = {k: v for k, v in batch.items() if k != "masks"}
            terms["mix"] = self.w_mix * self._term(self._mixed(student_out, "student"),
                                                   self._mixed(teacher_out, "teacher"), unlabelled)
        if self.w_clean > 0 or not terms:
            terms["clean"] = self.w_clean * self._term(student_out, teacher_out, batch)
        return terms


@register("mixup_ce")
class MixupCELoss(_Mixing):
    """Mixup training: CE of the mixed images against both labels, weighted by ``lam`` (module doc)."""

    def __init__(self, w_mix: float = 1.0, mix_alpha: float = 1.0):
        super().__init__("mixup_ce", w_mix, mix_alpha)

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> torch.Tensor:
        logits = get_output(self._mixed(student_out, "student"), "logits", "mixup_ce")
        labels = batch.get("labels")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
            raise ConfigError("loss 'mixup_ce': needs batch['labels'] as a (B,) class-index tensor "
                              "(a classification batch)")
        perm, lam = batch["mix_perm"], batch["mix_lam"].to(logits.dtype)
        ce = lam * F.cross_entropy(logits, labels, reduction="none") + \
            (1 - lam) * F.cross_entropy(logits, labels[perm], reduction="none")
        return self.w_mix * ce.mean()
