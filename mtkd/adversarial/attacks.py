"""L-inf FGSM and PGD for mtkd's classifiers and multi-task models.

Written here (the core is about 30 lines) rather than taken from a library:

* mtkd's models return dicts, and the multi-task attack maximises the task's
  own losses (segmentation cross-entropy, the YOLO detection loss); the
  common attack library, torchattacks, is classification-only;
* models take *normalised* inputs while the threat model is stated in 0..1
  pixels, so the attack un-normalises around the model call with the run's
  own mean/std;
* no dependency conflicts or weight: torchattacks pins an old ``requests``,
  and adversarial-robustness-toolbox is large.

Conventions
-----------
* Images come in and go out normalised, as batches carry them:
  ``x_norm = (x - mean) / std`` with ``x`` in [0, 1] (``mean``/``std``
  ``None``: the images are 0..1 pixels already). The perturbation ``delta``
  lives in pixel space and the attacked batch is ``x_norm + delta / std``, so
  a zero perturbation returns the input exactly.
* Constraint: ``|delta|_inf <= eps`` and ``x + delta`` in [0, 1] (a pixel
  already outside that range, from rounding, is never pushed further out).
  Pixels outside ``valid`` (letterbox padding) are never changed.
* PGD (Madry et al., ICLR 2018): ``delta`` starts at 0 (``random_start``
  ``"none"``/``False``), uniform in [-eps, eps] (``"uniform"``/``True``, the
  default) or Gaussian with std 0.001 (``"normal"``, the start of TRADES and
  AdaAD); then ``steps`` times ``delta += step_size * sign(grad)`` followed
  by the projection. Default step size ``2.5 * eps / steps`` (Madry's rule:
  2/255 for 8/255 and 10 steps).
* FGSM (Goodfellow et al., ICLR 2015): one step of ``eps`` from the clean
  image; with a random start (Wong et al., ICLR 2020) a uniform start and a
  step of ``1.25 * eps``.
* A step size above ``2.5 * eps`` is refused (:class:`ConfigError`), as are
  ``eps <= 0`` and unknown attack names.
* The objective is any ``f(x_norm, step) -> scalar`` to maximise, so one core
  serves every use: CE against labels, KL against a teacher, the multi-task
  loss. Gradients are taken with ``torch.autograd.grad`` with respect to the
  perturbation only: no parameter gets a ``.grad``.
* Untargeted: against the labels, or against the model's own clean
  predictions when there are none (``labels=None`` / ``use_labels=False``).
* The caller chooses the model's mode (evaluation attacks run in eval mode).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from mtkd.errors import ConfigError
from mtkd.structures import VOID

ATTACKS = ("fgsm", "pgd")
STARTS = ("none", "uniform", "normal")
#: Standard deviation of the ``"normal"`` random start (TRADES, AdaAD).
NORMAL_START_STD = 0.001
#: The largest step size accepted, as a multiple of eps.
MAX_STEP_RATIO = 2.5

Objective = Callable[[torch.Tensor, int], torch.Tensor]
Number = Union[float, int, str]


@dataclass(frozen=True)
class AttackSpec:
    """A validated L-inf attack (build it with :func:`make_attack`); sizes in 0..1 pixels."""

    name: str
    eps: float
    steps: int
    step_size: float
    random_start: str

    def describe(self) -> str:
        return (f"{self.name} eps={self.eps:.5g} steps={self.steps} step_size={self.step_size:.5g} "
                f"start={self.random_start}")


def parse_eps(value: Number, key: str = "eps") -> float:
    """A size in 0..1 pixels from a number or a string such as ``"8/255"`` or ``"0.03"``."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a number such as 8/255, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(Fraction(str(value).strip()))
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"{key}: expected a number such as 8/255 or 0.03, got {value!r}") from None


def _start(value: Any, key: str) -> str:
    if value is True:
        return "uniform"
    if value is False or value is None:
        return "none"
    if value in STARTS:
        return str(value)
    raise ConfigError(f"{key}: expected true, false or one of {', '.join(STARTS)}, got {value!r}")


def make_attack(name: str, eps: Number, steps: Optional[int] = None, step_size: Optional[Number] = None,
                random_start: Any = None, key: str = "attack") -> AttackSpec:
    """Validate an attack's settings (module doc for the defaults); ``key`` names them in errors."""
    if name not in ATTACKS:
        raise ConfigError(f"{key}: unknown attack {name!r}; known: {', '.join(ATTACKS)}")
    eps_f = parse_eps(eps, f"{key}.eps")
    if not math.isfinite(eps_f) or eps_f <= 0:
        raise ConfigError(f"{key}.eps: must be > 0 (a size in 0..1 pixels, e.g. 8/255), got {eps_f:g}")
    if name == "fgsm":
        if steps not in (None, 1):
            raise ConfigError(f"{key}.steps: fgsm takes exactly one step, got {steps}")
        n = 1
        start = _start(False if random_start is None else random_start, f"{key}.random_start")
        default_step = 1.25 * eps_f if start != "none" else eps_f
    else:
        n = 10 if steps is None else steps
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"{key}.steps: expected an integer >= 0, got {steps!r}")
        start = _start(True if random_start is None else random_start, f"{key}.random_start")
        default_step = MAX_STEP_RATIO * eps_f / max(n, 1)
    size = default_step if step_size is None else parse_eps(step_size, f"{key}.step_size")
    if not math.isfinite(size) or size <= 0:
        raise ConfigError(f"{key}.step_size: must be > 0, got {size:g}")
    if size > MAX_STEP_RATIO * eps_f * (1 + 1e-9):
        raise ConfigError(f"{key}.step_size: {size:.5g} is more than {MAX_STEP_RATIO} x eps ({eps_f:.5g}); "
                          "larger steps only bounce off the eps-ball")
    return AttackSpec(name, eps_f, int(n), float(size), start)


def _channels(values: Optional[Sequence[float]], like: torch.Tensor, default: float) -> torch.Tensor:
    if values is None:
        return torch.full((1, 1, 1, 1), default, dtype=like.dtype, device=like.device)
    t = torch.as_tensor(values, dtype=like.dtype, device=like.device).reshape(1, -1, 1, 1)
    if t.shape[1] not in (1, like.shape[1]):
        raise ConfigError(f"data.mean/std: {t.shape[1]} values for images with {like.shape[1]} channels")
    return t


def _random_start(spec: AttackSpec, like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    if spec.random_start == "uniform":
        u = torch.rand(like.shape, generator=generator, device=like.device, dtype=like.dtype)
        return (2 * u - 1) * spec.eps
    if spec.random_start == "normal":
        return NORMAL_START_STD * torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    return torch.zeros_like(like)


def perturb(objective: Objective, images: torch.Tensor, spec: AttackSpec,
            mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
            valid: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The attacked (normalised) images: ``spec`` applied to ``objective(x_norm, step)``.

    ``images`` (B,C,H,W) normalised with ``mean``/``std``; ``valid`` (B,H,W)
    or (B,1,H,W), true where pixels may change. Returns a detached tensor.
    """
    images = images.detach()
    s = _channels(std, images, 1.0)
    x = images * s + _channels(mean, images, 0.0)       # 0..1 pixels
    lo, hi = x.clamp(max=0.0), x.clamp(min=1.0)           # [0, 1], widened for pixels already outside
    keep = None
    if valid is not None:
        keep = torch.as_tensor(valid, device=images.device)
        keep = (keep[:, None] if keep.dim() == 3 else keep).to(images.dtype)

    def project(delta: torch.Tensor) -> torch.Tensor:
        delta = delta.clamp(-spec.eps, spec.eps)
        delta = torch.clamp(x + delta, min=lo, max=hi) - x
        return delta if keep is None else delta * keep

    delta = project(_random_start(spec, images, generator))
    for step in range(spec.steps):
        delta.requires_grad_(True)
        loss = objective(images + delta / s, step)
        grad = None
        if loss.requires_grad:
            grad = torch.autograd.grad(loss, delta, allow_unused=True)[0]
        delta = delta.detach()
        if grad is not None:
            delta = project(delta + spec.step_size * grad.sign())
    return (images + delta / s).detach()


# -- classifiers ---------------------------------------------------------------------------
def logits_of(out: Any) -> torch.Tensor:
    """A classifier's logits: ``out["logits"]`` for mtkd's classifiers, or ``out`` itself."""
    if isinstance(out, Mapping):
        if out.get("logits") is None:
            raise ConfigError("attack: the model output has no 'logits' (not a classifier)")
        return out["logits"]
    return out


def attack_classifier(model: nn.Module, images: torch.Tensor, spec: AttackSpec,
                      labels: Optional[torch.Tensor] = None, mean: Optional[Sequence[float]] = None,
                      std: Optional[Sequence[float]] = None,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Untargeted attack maximising the summed CE against ``labels`` (default: the clean predictions)."""
    images = images.detach()
    if labels is None:
        with torch.no_grad():
            labels = logits_of(model(images)).argmax(1)
    labels = labels.to(images.device)

    def objective(x: torch.Tensor, step: int) -> torch.Tensor:
        return F.cross_entropy(logits_of(model(x)).float(), labels, reduction="sum")

    return perturb(objective, images, spec, mean, std, generator=generator)


# -- multi-task models ---------------------------------------------------------------------------
def seg_objective(logits: torch.Tensor, target: torch.Tensor, step: int, steps: int,
                  segpgd: bool = False) -> torch.Tensor:
    """Pixel CE of ``logits`` (B,K,H,W) against ``target`` (B,H,W; VOID ignored), mean over valid pixels.

    ``segpgd``: SegPGD's weighting (Gu et al., ECCV 2022): correctly classified
    pixels weigh ``1 - lam``, wrong ones ``lam``, ``lam = (t - 1) / (2 T)`` at
    step ``t = 1..T``, so early steps push the still-correct pixels.
    """
    valid = target != VOID
    n = valid.sum()
    if not bool(n > 0):
        return 0.0 * logits.sum()
    ce = F.cross_entropy(logits.float(), target, ignore_index=VOID, reduction="none")  # 0 on VOID
    if segpgd:
        lam = step / (2.0 * max(steps, 1))
        correct = (logits.argmax(1) == target) & valid
        ce = ce * torch.where(correct, 1.0 - lam, lam)
    return ce.sum() / n


def _content(batch: Mapping[str, Any], size: Sequence[int], device: torch.device) -> Optional[torch.Tensor]:
    from mtkd.losses.distill.common import letterbox_content

    content = letterbox_content(batch, tuple(size))
    return None if content is None else content.to(device)


def multitask_targets(clean: Mapping[str, Any], batch: Mapping[str, Any], use_labels: bool = True,
                      det_conf: float = 0.25, iou: float = 0.6, max_det: int = 100) -> Dict[str, Any]:
    """What an untargeted multi-task attack moves away from, per sample.

    ``seg``: (B,H,W) masks: the sample's labels where it has them (and
    ``use_labels``), else the clean prediction with letterbox padding VOID.
    ``boxes``/``labels``: the sample's boxes where it has them, else the clean
    detections scoring above ``det_conf`` (after NMS at ``iou``).
    """
    images = batch["images"]
    b, device = images.shape[0], images.device
    out: Dict[str, Any] = {}
    seg = clean.get("seg")
    if seg is not None:
        target = seg.argmax(1)
        content = _content(batch, target.shape[-2:], device)
        if content is not None:
            target = torch.where(content, target, torch.full_like(target, VOID))
        masks, has_seg = batch.get("masks"), batch.get("has_seg")
        if use_labels and masks is not None:
            own = torch.ones(b, dtype=torch.bool, device=device) if has_seg is None else \
                torch.as_tensor(has_seg, dtype=torch.bool, device=device).reshape(-1)
            target = torch.where(own[:, None, None], masks.to(device=device, dtype=torch.long), target)
        out["seg"] = target
    det = clean.get("det")
    if det is not None:
        from mtkd.heads.decode import decode

        decoded = decode(det, det_conf, iou, max_det)
        has_det = batch.get("has_det")
        boxes, labels = [], []
        for i in range(b):
            own = use_labels and batch.get("boxes") is not None and (has_det is None or bool(has_det[i]))
            if own:
                boxes.append(batch["boxes"][i].to(device).float().reshape(-1, 4))
                labels.append(batch["labels"][i].to(device).long().reshape(-1))
            else:
                boxes.append(decoded[i]["boxes"].to(device).float())
                labels.append(decoded[i]["labels"].to(device).long())
        out["boxes"], out["labels"] = boxes, labels
    return out


def attack_multitask(model: nn.Module, batch: Mapping[str, Any], spec: AttackSpec,
                     mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None, *,
                     seg: bool = True, det: bool = True, segpgd: bool = False, use_labels: bool = True,
                     det_conf: float = 0.25, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Attack a detection + segmentation model through the sum of its task losses.

    Maximised: segmentation CE (:func:`seg_objective`, SegPGD-weighted with
    ``segpgd``) when ``seg`` and the model has a seg head, plus the hard
    detection loss (``yolo_det``: box, DFL, class and objectness terms) when
    ``det`` and it has a det head; targets from :func:`multitask_targets`.
    Letterbox padding (from ``batch["letterbox"]`` and ``orig_sizes``) is
    left untouched.
    """
    from mtkd.losses.det_hard import YoloDetLoss

    images = batch["images"].detach()
    with torch.no_grad():
        clean = model(images)
    use_seg = seg and clean.get("seg") is not None
    use_det = det and clean.get("det") is not None
    if not (use_seg or use_det):
        raise ConfigError("attack: nothing to attack: the model has no seg/det output for the terms switched on")
    targets = multitask_targets(clean, batch, use_labels=use_labels, det_conf=det_conf)
    det_loss = YoloDetLoss() if use_det else None
    det_batch = None
    if use_det:
        det_batch = {"boxes": targets["boxes"], "labels": targets["labels"],
                     "has_det": torch.ones(images.shape[0], dtype=torch.bool)}

    def objective(x: torch.Tensor, step: int) -> torch.Tensor:
        out = model(x)
        total = x.new_zeros(())
        if use_seg:
            total = total + seg_objective(out["seg"], targets["seg"], step, spec.steps, segpgd)
        if use_det:
            total = total + sum(det_loss(out, None, {**det_batch, "images": x}).values())
        return total

    valid = _content(batch, images.shape[-2:], images.device)
    return perturb(objective, images, spec, mean, std, valid=valid, generator=generator)


def is_classification_batch(batch: Mapping[str, Any]) -> bool:
    """A classification batch has ``labels`` as one (B,) tensor; a multi-task batch has lists."""
    labels = batch.get("labels")
    return isinstance(labels, torch.Tensor) and labels.dim() == 1 and "masks" not in batch


def attack_batch(model: nn.Module, batch: Mapping[str, Any], spec: AttackSpec,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None, *,
                 use_labels: bool = True, generator: Optional[torch.Generator] = None,
                 **multitask: Any) -> torch.Tensor:
    """Attacked images of a collated batch: :func:`attack_classifier` for a classification batch,
    else :func:`attack_multitask` (``multitask``: its keyword options)."""
    if is_classification_batch(batch):
        labels = batch["labels"] if use_labels else None
        return attack_classifier(model, batch["images"], spec, labels, mean, std, generator=generator)
    return attack_multitask(model, batch, spec, mean, std, use_labels=use_labels, generator=generator,
                            **multitask)


def sign_noise(images: torch.Tensor, eps: float, mean: Optional[Sequence[float]] = None,
               std: Optional[Sequence[float]] = None, valid: Optional[torch.Tensor] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random ``+-eps`` sign noise (the same L-inf norm as an attack's step), projected like an attack:
    the baseline a transfer attack must beat."""
    spec = AttackSpec("noise", float(eps), 1, float(eps), "none")
    u = torch.rand(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    direction = torch.where(u < 0.5, -1.0, 1.0).to(images.dtype)

    def objective(x: torch.Tensor, step: int) -> torch.Tensor:
        return (x * direction).sum()  # its gradient's sign is the random direction

    return perturb(objective, images, spec, mean, std, valid=valid, generator=generator)


def list_of(values: Union[str, Sequence[Number]], key: str = "eps") -> List[float]:
    """Sizes from ``"4/255,8/255"`` or a sequence."""
    items = values.split(",") if isinstance(values, str) else list(values)
    out = [parse_eps(v, key) for v in items if str(v).strip()]
    if not out:
        raise ConfigError(f"{key}: expected one or more sizes such as 4/255,8/255")
    return out
