"""Adversarial training and distillation as losses: ``adv_kd``, ``pgd_at``, ``trades``.

They plug into the generic trainer, which has no adversarial code of its own:

1. ``pre_step(batch, student, teacher)`` crafts ``x'`` with PGD
   (:func:`mtkd.adversarial.attacks.perturb`, in 0..1 pixels with the run's
   normalisation from ``bind_input``) on the unwrapped models and returns the
   batch with ``"adv_images"``. The student crafts in eval mode by default
   (``bn_eval: true``: BatchNorm statistics untouched by the attack, dropout
   off, as RSLAD, AdaAD and TRADES do); ``bn_eval: false`` crafts in train
   mode, as ARD's code does.
2. They declare ``"adv_split"``: the trainer runs *one* student forward on
   ``cat([images, adv_images])`` and splits it; ``student_out`` is the clean
   half, ``student_out["adv"]`` the adversarial one. BatchNorm thus normalises
   clean and adversarial images together (and DDP sees one pass), unlike
   reference code that forwards them separately. With ``"adv_teacher"`` the
   teacher's forward is split too (``teacher_out["adv"]``).
3. ``forward`` returns the named terms; ``aux_step`` logs the attack's cost as
   ``attack_ms`` (wall time of crafting) and ``attack_passes`` (forward +
   backward passes through a model: steps x models in the objective, plus the
   reference forwards), e.g. ``train/extra/adv_kd/attack_ms`` in
   ``results.csv``.

At most one of them per run (a ConfigError otherwise). Gradients of the
attack are taken with respect to the perturbation only (no ``.grad`` on any
parameter); the teacher is never updated.

Notation: "KL(S(x') || T(x))" follows the papers' code,
``F.kl_div(log_softmax(s), softmax(t))`` = ``sum_c p_t log(p_t / p_s)``:
the teacher's distribution is the target. Reduction: batchmean (sum over
classes, mean over images). At temperature ``T`` a term is ``T^2 *
KL(softmax(t/T) || softmax(s/T))``. ARD's published code averages over
classes too (``nn.KLDivLoss()`` default), a factor ``1/C`` this module does
not copy.

``adv_kd`` (classification logits)
----------------------------------
Options: ``source`` (``student``/``teacher``: whose output the attack
maximises), ``objective`` (``ce``: CE against the labels; ``kl``: the KL of
the source at ``x'`` to the teacher's target), ``target`` (``clean``: the
teacher's output on ``x``; ``adv``: on ``x'``, differentiated through during
the attack), ``eps``, ``steps``, ``step_size``, ``random_start``
(``uniform``/``normal``/``none``), ``T``, and the weights of the terms::

    w_adv   * T^2 KL(S(x') || T(target))    target = x or x'
    w_clean * T^2 KL(S(x)  || T(x))
    w_ce    * CE(S(x), y)

``black_box: true`` keeps the teacher a black box, as for a surrogate
distilled from a model's outputs (``benchmarks/transfer``): the attack
never differentiates through the teacher and never reads the labels
(objective ``ce`` targets the teacher's clean prediction, objective ``kl``
the teacher's clean output), and the teacher is only queried, on ``x``
and, with target ``adv``, on ``x'``: Papernot et al.'s (AsiaCCS 2017)
substitute training, which queries the black box at points the
substitute's own gradient finds.

``preset`` fills every option not given explicitly:

=========  ======  =====  ======  ====  =====  =======  ====  ==============
preset     source  obj.   target  T     w_adv  w_clean  w_ce  random start
=========  ======  =====  ======  ====  =====  =======  ====  ==============
ard        student ce     clean   30    1.0    0        0     uniform
rslad      student kl     clean   1     5/6    1/6      0     uniform
adaad      student kl     adv     1     1.0    0        0     normal (0.001)
kd_adv     teacher ce     adv     1     1.0    1.0      0     uniform
=========  ======  =====  ======  ====  =====  =======  ====  ==============

All: eps 8/255, 10 steps of 2/255. ARD (Goldblum et al., AAAI 2020) is
``a T^2 KL(S(x')||T(x)) + (1 - a) CE(S(x), y)``: ``a`` is ``w_adv`` with
``w_ce = 1 - a``; its code's defaults are ``a = 1, T = 30``. RSLAD (Zi et al.,
ICCV 2021): ``5/6 KL(S(x')||T(x)) + 1/6 KL(S(x)||T(x))``, ``x'`` maximising
``KL(S(x')||T(x))``. AdaAD (Huang et al., CVPR 2023): the teacher queried at
the adversarial point, ``x'`` maximising ``KL(S(x')||T(x'))``. ``kd_adv``
(the project's seed design): ``x'`` crafted on the teacher's CE, loss
``KL(S(x)||T(x)) + KL(S(x')||T(x'))``. Without a preset the defaults are
source student, objective kl, target clean, T 1, w_adv 1, w_clean 0, w_ce 0.

``adv_kd`` with ``output: multitask`` distils a detection + segmentation
student on adversarial inputs: ``x'`` maximises the student's multi-task
objective (:func:`mtkd.adversarial.attacks.attack_multitask`'s: seg CE +
``yolo_det``, against the labels where a sample has them, else the
teacher's predictions; ``source: teacher`` crafts on the teacher), and the
adversarial term is ``seg_kl`` (at ``T``) + ``det_mse`` between the
student's output at ``x'`` and the teacher's at the target; ``w_clean``
adds the same pair on clean inputs (``w_ce`` must stay 0 there: the hard
losses live in ``loss.det``/``loss.seg``). ``seg_kd`` and ``det_kd``
(``{name, weight, **options}``) replace either term's loss or its settings,
e.g. ``det_kd: {w_box: 0.1, w_obj: 10, w_cls: 10}`` (the weights of the
small testbed's ``kd.yaml``); ``weight: 0`` drops the term. Presets and
``objective: kl`` are classification-only.

Baselines
---------
* ``pgd_at`` (Madry et al., ICLR 2018): ``CE(S(x'), y)``, ``x'`` = PGD on
  the student's CE. Needs no teacher. (The clean half of the forward is
  computed but unused, except by BatchNorm's batch statistics.) With
  ``output: multitask`` it trains a detection + segmentation model: ``x'``
  maximises the student's multi-task objective (as ``adv_kd``'s, against the
  labels where a sample has them, else the student's own clean predictions)
  and the terms are the hard losses on ``x'``: ``w_det * yolo_det`` and
  ``w_seg * seg_ce``. The clean hard losses stay in ``loss.det``/``loss.seg``,
  so the run trains on clean and adversarial inputs together.
* ``trades`` (Zhang et al., ICML 2019): ``CE(S(x), y) + beta KL(S(x') ||
  S(x))`` (beta 6), ``x'`` maximising that KL from a 0.001 Gaussian start;
  the gradient flows through both halves, as in TRADES. Needs no teacher.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mtkd.adversarial.attacks import (AttackSpec, logits_of, make_attack, multitask_targets, perturb,
                                      seg_objective)
from mtkd.errors import ConfigError
from mtkd.losses._common import seg_det_terms, sub_loss
from mtkd.losses._functional import soft_kl
from mtkd.losses.base import Loss, build_loss, register

Objective = Callable[[torch.Tensor, int], torch.Tensor]

#: The options a preset fills (see the module doc's table).
PRESETS: Dict[str, Dict[str, Any]] = {
    "ard": {"source": "student", "objective": "ce", "target": "clean", "T": 30.0, "w_adv": 1.0, "w_clean": 0.0,
            "w_ce": 0.0, "random_start": "uniform"},
    "rslad": {"source": "student", "objective": "kl", "target": "clean", "T": 1.0, "w_adv": 5 / 6,
              "w_clean": 1 / 6, "w_ce": 0.0, "random_start": "uniform"},
    "adaad": {"source": "student", "objective": "kl", "target": "adv", "T": 1.0, "w_adv": 1.0, "w_clean": 0.0,
              "w_ce": 0.0, "random_start": "normal"},
    "kd_adv": {"source": "teacher", "objective": "ce", "target": "adv", "T": 1.0, "w_adv": 1.0, "w_clean": 1.0,
               "w_ce": 0.0, "random_start": "uniform"},
}
#: Defaults without a preset; the attack's defaults are shared by every preset.
DEFAULTS: Dict[str, Any] = {"source": "student", "objective": "kl", "target": "clean", "T": 1.0, "w_adv": 1.0,
                            "w_clean": 0.0, "w_ce": 0.0, "random_start": "uniform", "eps": 8 / 255, "steps": 10,
                            "step_size": 2 / 255, "bn_eval": True, "output": "logits", "black_box": False}


def kl_to(student: torch.Tensor, target: torch.Tensor, T: float = 1.0, reduction: str = "batchmean") -> torch.Tensor:
    """``T^2 KL(softmax(target/T) || softmax(student/T))`` over dim 1 (``target`` is not detached here)."""
    return soft_kl(student, target, T, reduction=reduction) * (T * T)


def _labels(batch: Dict[str, Any], loss: str) -> torch.Tensor:
    labels = batch.get("labels")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        raise ConfigError(f"loss {loss!r}: needs batch['labels'] as a (B,) class-index tensor (a classification "
                          "batch)")
    return labels


def _adv_half(out: Dict[str, Any], who: str, loss: str) -> Dict[str, Any]:
    adv = out.get("adv")
    if adv is None:
        raise ConfigError(f"loss {loss!r}: the {who} output has no adversarial half ('adv'); it is made by the "
                          "trainer's split forward after pre_step")
    return adv


def multitask_objective(images: torch.Tensor, batch: Dict[str, Any], source: nn.Module, reference: nn.Module,
                        steps: int, loss: str) -> Tuple[Objective, int, int, Optional[torch.Tensor]]:
    """The multi-task attack's objective on ``source``: seg CE (:func:`seg_objective`) + ``yolo_det``.

    Targets: the labels where a sample has them, else ``reference``'s clean
    predictions (:func:`multitask_targets`). Returns ``(objective, models per
    step, reference forwards, valid pixels)`` as ``_Crafting._objective``.
    """
    from mtkd.adversarial.attacks import _content
    from mtkd.losses.det_hard import YoloDetLoss

    with torch.no_grad():
        clean = source(images)
        ref = clean if source is reference else reference(images)
    targets = multitask_targets(ref, batch, use_labels=True)
    use_seg = clean.get("seg") is not None and "seg" in targets
    use_det = clean.get("det") is not None and "boxes" in targets
    if not (use_seg or use_det):
        raise ConfigError(f"loss {loss} (multitask): the models have no seg or det output to attack")
    det_loss = YoloDetLoss() if use_det else None

    def objective(x: torch.Tensor, step: int) -> torch.Tensor:
        out = source(x)
        total = x.new_zeros(())
        if use_seg:
            total = total + seg_objective(out["seg"], targets["seg"], step, steps)
        if use_det:
            b = {"boxes": targets["boxes"], "labels": targets["labels"], "images": x,
                 "has_det": torch.ones(x.shape[0], dtype=torch.bool)}
            total = total + sum(det_loss(out, None, b).values())
        return total

    refs = 1 if source is reference else 2
    return objective, 1, refs, _content(batch, images.shape[-2:], images.device)


class _Crafting(Loss):
    """Shared part: the attack's options, ``bind_input``, timing, ``aux_step`` logging."""

    requires = frozenset({"adv_split"})

    def __init__(self, name: str, eps: Any, steps: int, step_size: Any, random_start: Any, bn_eval: bool):
        super().__init__()
        self.loss_name = name
        self.attack: AttackSpec = make_attack("pgd", eps, steps, step_size, random_start, key=f"loss {name}")
        self.bn_eval = bool(bn_eval)
        self.mean: Optional[Sequence[float]] = None
        self.std: Optional[Sequence[float]] = None
        self._stats: Dict[str, float] = {}

    def bind_input(self, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]) -> None:
        self.mean = None if mean is None else [float(v) for v in mean]
        self.std = None if std is None else [float(v) for v in std]

    def _objective(self, images: torch.Tensor, batch: Dict[str, Any], student: nn.Module,
                   teacher: Optional[nn.Module]) -> Tuple[Objective, int, int, Optional[torch.Tensor]]:
        """``(objective, models per step, reference forwards, valid pixels)``."""
        raise NotImplementedError  # pragma: no cover

    def pre_step(self, batch: Dict[str, Any], student: nn.Module, teacher: Optional[nn.Module]) -> Dict[str, Any]:
        start = time.perf_counter()
        images = batch["images"].detach()
        was_training = student.training
        if self.bn_eval:
            student.eval()
        try:
            with torch.enable_grad():
                objective, per_step, refs, valid = self._objective(images, batch, student, teacher)
                adv = perturb(objective, images, self.attack, self.mean, self.std, valid=valid)
        finally:
            student.train(was_training)
        self._stats = {"attack_ms": 1000.0 * (time.perf_counter() - start),
                       "attack_passes": float(refs + per_step * self.attack.steps)}
        return {**batch, "adv_images": adv}

    def aux_step(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                 batch: Dict[str, Any]) -> Dict[str, float]:
        return dict(self._stats)


@register("adv_kd")
class AdvKDLoss(_Crafting):
    """Adversarial distillation: KL to the teacher on clean and attacked inputs (ARD, RSLAD, AdaAD, kd_adv presets).

    The module doc gives the options; ``options`` holds the resolved settings."""

    def __init__(self, preset: Optional[str] = None, source: Optional[str] = None, objective: Optional[str] = None,
                 target: Optional[str] = None, T: Optional[float] = None, w_adv: Optional[float] = None,
                 w_clean: Optional[float] = None, w_ce: Optional[float] = None, eps: Any = None,
                 steps: Optional[int] = None, step_size: Any = None, random_start: Any = None,
                 bn_eval: Optional[bool] = None, output: Optional[str] = None,
                 seg_kd: Optional[Mapping[str, Any]] = None, det_kd: Optional[Mapping[str, Any]] = None,
                 black_box: Optional[bool] = None):
        if preset is not None and preset not in PRESETS:
            raise ConfigError(f"loss adv_kd: unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        given = {"source": source, "objective": objective, "target": target, "T": T, "w_adv": w_adv,
                 "w_clean": w_clean, "w_ce": w_ce, "eps": eps, "steps": steps, "step_size": step_size,
                 "random_start": random_start, "bn_eval": bn_eval, "output": output,
                 "black_box": black_box}
        opts = {**DEFAULTS, **(PRESETS[preset] if preset else {})}
        if output == "multitask" and objective is None:
            opts["objective"] = "ce"
        opts.update({k: v for k, v in given.items() if v is not None})
        for key, allowed in (("source", ("student", "teacher")), ("objective", ("ce", "kl")),
                             ("target", ("clean", "adv")), ("output", ("logits", "multitask"))):
            if opts[key] not in allowed:
                raise ConfigError(f"loss adv_kd.{key}: expected one of {', '.join(allowed)}, got {opts[key]!r}")
        if opts["objective"] == "kl" and opts["source"] == "teacher" and opts["target"] == "adv":
            raise ConfigError("loss adv_kd: objective kl with source teacher and target adv compares the teacher "
                              "with itself at x' (always 0); use target clean or source student")
        if opts["output"] == "multitask" and (preset is not None or opts["objective"] != "ce"):
            raise ConfigError("loss adv_kd: output multitask crafts on the multi-task loss (objective ce) and takes "
                              "no preset")
        if opts["output"] == "multitask" and opts["w_ce"]:
            raise ConfigError("loss adv_kd.w_ce: not used with output multitask (the hard losses live in "
                              "loss.det/loss.seg)")
        opts["black_box"] = bool(opts["black_box"])
        if opts["black_box"] and (opts["output"] != "logits" or opts["source"] != "student" or opts["w_ce"]):
            raise ConfigError("loss adv_kd.black_box: needs output logits, source student and w_ce 0 (the teacher "
                              "is only queried and the labels are never read)")
        for key in ("w_adv", "w_clean", "w_ce"):
            opts[key] = float(opts[key])
            if opts[key] < 0:
                raise ConfigError(f"loss adv_kd.{key}: must be >= 0, got {opts[key]}")
        if opts["w_adv"] + opts["w_clean"] + opts["w_ce"] <= 0:
            raise ConfigError("loss adv_kd: w_adv, w_clean and w_ce are all 0")
        opts["T"] = float(opts["T"])
        if opts["T"] <= 0:
            raise ConfigError(f"loss adv_kd.T: must be > 0, got {opts['T']}")
        super().__init__("adv_kd", opts["eps"], opts["steps"], opts["step_size"], opts["random_start"],
                         opts["bn_eval"])
        opts.update(eps=self.attack.eps, steps=self.attack.steps, step_size=self.attack.step_size,
                    random_start=self.attack.random_start, preset=preset)
        self.options = opts
        req = {"teacher", "adv_split"}
        if opts["target"] == "adv":
            req.add("adv_teacher")
        self.requires = frozenset(req)
        if opts["output"] != "multitask" and (seg_kd is not None or det_kd is not None):
            raise ConfigError("loss adv_kd.seg_kd/det_kd: only with output multitask")
        if opts["output"] == "multitask":
            self.seg_kd, self.seg_w = sub_loss("adv_kd", "seg_kd", seg_kd, {"name": "seg_kl", "T": opts["T"]})
            self.det_kd, self.det_w = sub_loss("adv_kd", "det_kd", det_kd, {"name": "det_mse"})

    # -- the attack ---------------------------------------------------------------------------
    def _objective(self, images: torch.Tensor, batch: Dict[str, Any], student: nn.Module,
                   teacher: Optional[nn.Module]) -> Tuple[Objective, int, int, Optional[torch.Tensor]]:
        if teacher is None:
            raise ConfigError("loss 'adv_kd': needs a teacher (set a teacher model in the config)")
        o = self.options
        source = student if o["source"] == "student" else teacher
        if o["output"] == "multitask":
            return self._multitask_objective(images, batch, source, teacher)
        if o["objective"] == "ce":
            labels = batch.get("labels")
            if o["black_box"]:
                with torch.no_grad():
                    labels = logits_of(teacher(images)).argmax(1)
            elif not isinstance(labels, torch.Tensor) or labels.dim() != 1:
                with torch.no_grad():
                    labels = logits_of(source(images)).argmax(1)
            labels = labels.to(images.device)

            def ce(x: torch.Tensor, step: int) -> torch.Tensor:
                return F.cross_entropy(logits_of(source(x)).float(), labels, reduction="sum")

            return ce, 1, int(o["black_box"]), None
        if o["target"] == "clean" or o["black_box"]:
            with torch.no_grad():
                ref = logits_of(teacher(images)).detach()

            def kl_clean(x: torch.Tensor, step: int) -> torch.Tensor:
                return kl_to(logits_of(source(x)), ref, reduction="sum")

            return kl_clean, 1, 1, None

        def kl_adv(x: torch.Tensor, step: int) -> torch.Tensor:  # AdaAD: both models at x'
            return kl_to(logits_of(student(x)), logits_of(teacher(x)), reduction="sum")

        return kl_adv, 2, 0, None

    def _multitask_objective(self, images: torch.Tensor, batch: Dict[str, Any], source: nn.Module,
                             teacher: nn.Module) -> Tuple[Objective, int, int, Optional[torch.Tensor]]:
        return multitask_objective(images, batch, source, teacher, self.attack.steps, "adv_kd")

    # -- the loss -----------------------------------------------------------------------------
    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        if teacher_out is None:
            raise ConfigError("loss 'adv_kd': needs a teacher (set a teacher model in the config)")
        o = self.options
        s_adv = _adv_half(student_out, "student", "adv_kd")
        t_tgt = _adv_half(teacher_out, "teacher", "adv_kd") if o["target"] == "adv" else teacher_out
        if o["output"] == "multitask":
            return self._multitask_terms(student_out, s_adv, teacher_out, t_tgt, batch)
        out: Dict[str, torch.Tensor] = {}
        if o["w_adv"] > 0:
            out["adv"] = o["w_adv"] * kl_to(logits_of(s_adv), logits_of(t_tgt).detach(), o["T"])
        if o["w_clean"] > 0:
            out["clean"] = o["w_clean"] * kl_to(logits_of(student_out), logits_of(teacher_out).detach(), o["T"])
        if o["w_ce"] > 0:
            logits = logits_of(student_out)
            out["ce"] = o["w_ce"] * F.cross_entropy(logits.float(), _labels(batch, "adv_kd").to(logits.device))
        return out

    def _multitask_terms(self, s_clean: Dict[str, Any], s_adv: Dict[str, Any], t_clean: Dict[str, Any],
                         t_tgt: Dict[str, Any], batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        o = self.options
        out: Dict[str, torch.Tensor] = {}
        for tag, w, s, t in (("adv", o["w_adv"], s_adv, t_tgt), ("clean", o["w_clean"], s_clean, t_clean)):
            if w <= 0:
                continue
            pairs = (("seg", self.seg_kd, self.seg_w), ("det", self.det_kd, self.det_w))
            for task, v in seg_det_terms(pairs, s, t, batch).items():
                out[f"{tag}_{task}"] = w * v
        if not out:
            raise ConfigError("loss adv_kd (multitask): student and teacher share no seg or det output")
        return out


@register("pgd_at")
class PGDATLoss(_Crafting):
    """Madry's adversarial training: ``CE(S(x'), y)``, ``x'`` = PGD on the student's CE; with
    ``output: multitask`` the hard detection and segmentation losses on ``x'`` (module doc)."""

    def __init__(self, eps: Any = 8 / 255, steps: int = 10, step_size: Any = None, random_start: Any = "uniform",
                 bn_eval: bool = True, output: str = "logits", w_det: float = 1.0, w_seg: float = 1.0):
        super().__init__("pgd_at", eps, steps, step_size, random_start, bn_eval)
        if output not in ("logits", "multitask"):
            raise ConfigError(f"loss pgd_at.output: expected one of logits, multitask, got {output!r}")
        self.output = output
        self.w_det, self.w_seg = float(w_det), float(w_seg)
        if output == "multitask":
            if self.w_det < 0 or self.w_seg < 0 or self.w_det + self.w_seg <= 0:
                raise ConfigError(f"loss pgd_at.w_det/w_seg: must be >= 0 and not both 0, got {w_det}, {w_seg}")
            self.det_hard = build_loss("yolo_det", "loss pgd_at (yolo_det)")
            self.seg_hard = build_loss("seg_ce", "loss pgd_at (seg_ce)")

    def _objective(self, images: torch.Tensor, batch: Dict[str, Any], student: nn.Module,
                   teacher: Optional[nn.Module]) -> Tuple[Objective, int, int, Optional[torch.Tensor]]:
        if self.output == "multitask":
            return multitask_objective(images, batch, student, student, self.attack.steps, "pgd_at")
        labels = _labels(batch, "pgd_at").to(images.device)

        def ce(x: torch.Tensor, step: int) -> torch.Tensor:
            return F.cross_entropy(logits_of(student(x)).float(), labels, reduction="sum")

        return ce, 1, 0, None

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> Any:
        adv = _adv_half(student_out, "student", "pgd_at")
        if self.output == "multitask":
            out: Dict[str, torch.Tensor] = {}
            if self.w_det > 0 and adv.get("det") is not None:
                out["det"] = self.w_det * sum(self.det_hard(adv, None, batch).values())
            if self.w_seg > 0 and adv.get("seg") is not None:
                out["seg"] = self.w_seg * sum(self.seg_hard(adv, None, batch).values())
            if not out:
                raise ConfigError("loss pgd_at (multitask): the student has no det or seg output")
            return out
        logits = logits_of(adv)
        return F.cross_entropy(logits.float(), _labels(batch, "pgd_at").to(logits.device))


@register("trades")
class TradesLoss(_Crafting):
    """TRADES: ``CE(S(x), y) + beta KL(S(x') || S(x))`` (module doc); terms ``ce`` and ``kl``."""

    def __init__(self, beta: float = 6.0, eps: Any = 8 / 255, steps: int = 10, step_size: Any = None,
                 random_start: Any = "normal", bn_eval: bool = True):
        super().__init__("trades", eps, steps, step_size, random_start, bn_eval)
        if beta < 0:
            raise ConfigError(f"loss trades.beta: must be >= 0, got {beta}")
        self.beta = float(beta)

    def _objective(self, images: torch.Tensor, batch: Dict[str, Any], student: nn.Module,
                   teacher: Optional[nn.Module]) -> Tuple[Objective, int, int, Optional[torch.Tensor]]:
        with torch.no_grad():
            ref = logits_of(student(images)).detach()

        def kl(x: torch.Tensor, step: int) -> torch.Tensor:
            return kl_to(logits_of(student(x)), ref, reduction="sum")

        return kl, 1, 1, None

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        clean = logits_of(student_out)
        adv = logits_of(_adv_half(student_out, "student", "trades"))
        labels = _labels(batch, "trades").to(clean.device)
        return {"ce": F.cross_entropy(clean.float(), labels), "kl": self.beta * kl_to(adv, clean)}
