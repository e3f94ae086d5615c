"""Adversarial feature distillation: a discriminator tells teacher features
from (adapted) student features; the student learns to fool it."""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _sn

from mtkd.errors import ConfigError
from mtkd.losses._common import FeatureAdapters, need_teacher
from mtkd.losses.base import AuxGroup, Loss, register
from mtkd.losses.distill.common import model_device, pairs, widths

_LOSSES = ("lsgan", "hinge")


def patch_discriminator(in_channels: int, width: int, spectral_norm: bool) -> nn.Sequential:
    """A small PatchGAN-style critic: 3x3 conv (width) -> 3x3 stride-2 conv
    (2*width) -> 3x3 conv to one logit per patch, LeakyReLU(0.2) between,
    every conv spectrally normalised when ``spectral_norm``."""
    wrap = _sn if spectral_norm else (lambda m: m)
    return nn.Sequential(
        wrap(nn.Conv2d(in_channels, width, 3, 1, 1)), nn.LeakyReLU(0.2),
        wrap(nn.Conv2d(width, 2 * width, 3, 2, 1)), nn.LeakyReLU(0.2),
        wrap(nn.Conv2d(2 * width, 1, 3, 1, 1)),
    )


def d_loss(kind: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Discriminator objective on patch logits (real -> 1 / fake -> 0)."""
    if kind == "lsgan":
        return 0.5 * ((real - 1) ** 2).mean() + 0.5 * (fake ** 2).mean()
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def g_loss(kind: str, fake: torch.Tensor) -> torch.Tensor:
    """Generator (student) objective: make D call the fake real."""
    if kind == "lsgan":
        return 0.5 * ((fake - 1) ** 2).mean()
    return -fake.mean()


@register("feat_gan")
class FeatGAN(Loss):
    """Feature-level GAN distillation over neck levels.

    Teacher features are "real", student features "fake", as in Xu, Hsu and
    Huang, "Training Shallow and Thin Networks for Acceleration via
    Knowledge Distillation with Conditional Adversarial Networks" (ICLR-W
    2018) and the holistic adversarial distillation of Liu et al.,
    "Structured Knowledge Distillation for Semantic Segmentation" (CVPR
    2019), here applied to a detector's neck maps. Stabilised with LSGAN
    (Mao et al., ICCV 2017) or hinge loss (Lim & Ye, 2017), spectral
    normalisation (Miyato et al., ICLR 2018) and an optional R1 gradient
    penalty (Mescheder et al., ICML 2018).

    * For each name in ``feats``: a 1x1 ``LazyConv2d`` adapter maps the
      student map to the teacher's width (trained with the student), and a
      :func:`patch_discriminator` of width ``d_channels`` scores patches.
      Teacher maps are "real", adapted student maps "fake".
    * ``forward`` returns the generator term, averaged over levels: the
      student and its adapters are pushed to fool D. D's parameters get no
      gradient from it.
    * D is the auxiliary group ``disc`` (:meth:`aux_groups`): after the
      student's step, every ``d_every`` steps, the trainer steps it once on
      detached features with Adam(``lr_d``, betas (0.5, 0.999)); it is
      excluded from :meth:`student_parameters`. Its loss is averaged over
      levels, plus ``r1 / 2 * E|grad_real D|^2`` when ``r1>0``, in fp32.
    * D's weights live in ``state_dict``; the trainer checkpoints its
      optimizer and, under DDP, averages its gradients over ranks.
    * Adapters and discriminators are built by :meth:`bind` from the models'
      ``feat_channels``, or else at the first forward (the trainer's dry
      forward); build the optimizers and load checkpoints after that.
    """

    requires = frozenset({"teacher"})

    def __init__(self, feats: Sequence[str] = ("p3", "p4", "p5"), loss: str = "lsgan",
                 spectral_norm: bool = True, lr_d: float = 1e-4, d_channels: int = 64,
                 r1: float = 0.0, d_every: int = 1):
        super().__init__()
        if loss not in _LOSSES:
            raise ConfigError(f"loss feat_gan.loss: expected one of {list(_LOSSES)}, got {loss!r}")
        if isinstance(feats, str) or not feats:
            raise ConfigError("loss feat_gan.feats: expected a non-empty list of feature names")
        self.feats: List[str] = [str(f) for f in feats]
        self.kind, self.spectral_norm = loss, bool(spectral_norm)
        self.lr_d, self.d_channels, self.r1 = float(lr_d), int(d_channels), float(r1)
        if int(d_every) < 1:
            raise ConfigError(f"loss feat_gan.d_every: must be >= 1, got {d_every!r}")
        self.d_every = int(d_every)
        self.adapters = FeatureAdapters("feat_gan", always=True)
        self.disc = nn.ModuleDict()

    # -- set-up ---------------------------------------------------------------------
    def bind(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        if teacher is None:
            return
        t_ch = widths(teacher, "teacher", "feat_gan")
        device = model_device(student)
        self.adapters.build(self.feats, widths(student, "student", "feat_gan"), t_ch, device)
        for name in self.feats:
            self._disc(name, t_ch[name], device)

    def _disc(self, name: str, channels: int, device: torch.device) -> nn.Module:
        """The discriminator of level ``name``, made on first need with D's
        parameters frozen (only :meth:`aux_step` switches them on)."""
        if name not in self.disc:
            d = patch_discriminator(channels, self.d_channels, self.spectral_norm).to(device)
            self.disc[name] = d.requires_grad_(False)
        return self.disc[name]

    def student_parameters(self) -> Iterable[nn.Parameter]:
        return self.adapters.parameters()

    def aux_groups(self) -> List[AuxGroup]:
        return [AuxGroup("disc", self.disc, self.d_step, optimizer="adam", lr=self.lr_d, betas=(0.5, 0.999),
                         every=self.d_every, after=self._freeze_disc)]

    def _freeze_disc(self) -> None:
        self.disc.requires_grad_(False)

    # -- the generator term ------------------------------------------------------------
    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> torch.Tensor:
        teacher_out = need_teacher("feat_gan", teacher_out)
        terms = [g_loss(self.kind, self._disc(name, t.shape[1], t.device)(s.float()))
                 for name, s, t in pairs(student_out, teacher_out, self.feats, self.adapters)]
        return torch.stack(terms).mean()

    # -- the discriminator step -----------------------------------------------------------
    def d_step(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
               batch: Dict[str, Any]) -> Tuple[torch.Tensor, Dict[str, float]]:
        """D's objective on detached features, with D's parameters switched on (the ``disc``
        group's ``after`` switches them off); returns it and D's mean real / fake scores."""
        teacher_out = need_teacher("feat_gan", teacher_out)
        with torch.no_grad():
            fakes = {name: (s.float(), t.float())
                     for name, s, t in pairs(student_out, teacher_out, self.feats, self.adapters)}
        device_type = next(iter(fakes.values()))[1].device.type
        self.disc.requires_grad_(True)
        with torch.autocast(device_type, enabled=False):  # D trains in fp32 under any AMP context
            total, d_real, d_fake = self._d_loss(fakes)
        return total, {"d_loss": float(total.detach()), "d_real": d_real, "d_fake": d_fake}

    def _d_loss(self, fakes: Dict[str, Tuple[torch.Tensor, torch.Tensor]]
                ) -> Tuple[torch.Tensor, float, float]:
        """D's loss averaged over levels, and its mean real / fake scores."""
        losses, real_scores, fake_scores = [], [], []
        for name, (fake, real) in fakes.items():
            d = self._disc(name, real.shape[1], real.device)
            real = real.detach().requires_grad_(self.r1 > 0)
            d_real, d_fake = d(real), d(fake.detach())
            loss = d_loss(self.kind, d_real, d_fake)
            if self.r1 > 0:
                (grad,) = torch.autograd.grad(d_real.sum(), real, create_graph=True)
                loss = loss + 0.5 * self.r1 * grad.pow(2).flatten(1).sum(1).mean()
            losses.append(loss)
            real_scores.append(float(d_real.detach().mean()))
            fake_scores.append(float(d_fake.detach().mean()))
        n = len(losses)
        return torch.stack(losses).mean(), sum(real_scores) / n, sum(fake_scores) / n
