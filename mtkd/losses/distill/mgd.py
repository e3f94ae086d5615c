"""Masked generative distillation (MGD) on feature maps."""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from mtkd.errors import ConfigError
from mtkd.losses._common import FeatureAdapters, need_teacher
from mtkd.losses._functional import resize_to
from mtkd.losses.base import Loss, register
from mtkd.losses.distill.common import model_device, pairs, widths
def generation_block(channels: int) -> nn.Sequential:
    """MGD's generator: 3x3 conv -> ReLU -> 3x3 conv, ``channels`` in and out."""
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(channels, channels, 3, padding=1))


def random_mask(x: torch.Tensor, lambda_mask: float) -> torch.Tensor:
    """(B,1,H,W) 0/1 mask in ``x``'s dtype, drawn from torch's RNG on
    ``x``'s device: each pixel of each sample is kept (1) with probability
    ``1 - lambda_mask``, shared by all channels."""
    b, _, h, w = x.shape
    return (torch.rand(b, 1, h, w, device=x.device) >= lambda_mask).to(x.dtype)


@register("mgd")
class MGD(Loss):
    """Masked generative distillation.

    Yang, Li, Shao, Shi, Yuan and Yuan, "Masked Generative Distillation"
    (ECCV 2022): instead of imitating the teacher's map, the student's map
    with random pixels masked out must let a small generator rebuild the
    whole teacher map. Per level, with ``S`` the student map and ``T`` the
    (detached) teacher map of width C::

        A    = align(S)                      # 1x1 conv to C channels
        M    ~ Bernoulli(1 - lambda_mask)    # (B,1,H,W), one draw per pixel
        G    = conv3x3(ReLU(conv3x3(A * M))) # the generation block, C -> C
        term = sum_{b,c,h,w} (G - T)^2 / B   # in float32 whatever the AMP dtype
        loss = alpha_mgd * sum over levels of term

    The levels are summed, as the authors' code sums one such loss per
    level, so ``alpha_mgd`` keeps the paper's meaning.

    * ``feats``: feature names (default the neck levels). Every level gets
      its own ``align`` (a 1x1 ``LazyConv2d``, also at equal widths, as the
      paper's formula writes it; the authors' code skips it there, which
      changes nothing the generator cannot express since a 1x1 conv commutes
      with a per-pixel mask and composes into the next 3x3 conv) and its own
      generation block. Both are trainable parts of the loss: they are
      returned by :meth:`student_parameters` and so join the student's
      optimizer. They are built by :meth:`bind` from the models'
      ``feat_channels``, or else at the first forward (the trainer's dry
      forward, before the optimizer is built).
    * ``alpha_mgd`` (default 2e-5, the paper's value for detection) scales
      a sum over every element of the map, so the right value depends on
      the feature sizes and magnitudes: re-measure the term and re-tune
      ``weight`` (or ``alpha_mgd``) for your models.
    * ``lambda_mask`` in [0, 1): the masked fraction; 0.65 (default) is the
      paper's detection setting, 0.75 its segmentation one.
    * The mask is drawn from torch's RNG, so seeding reproduces a run. It is
      drawn in ``eval()`` mode too: this is a training loss, and its value
      on validation batches stays comparable with the training one.
    * A teacher map of another spatial size is bilinearly resized to the
      student's.
    * No ``key: seg``: MGD trains a generator to rebuild feature maps from
      masked ones; rebuilding class logits from masked logits is not what
      the paper does (its segmentation setting distils the last feature
      map), so distil a feature map instead.
    """

    requires = frozenset({"teacher"})

    def __init__(self, feats: Sequence[str] = ("p3", "p4", "p5"), alpha_mgd: float = 2e-5,
                 lambda_mask: float = 0.65, key: Optional[str] = None):
        super().__init__()
        if key is not None:
            raise ConfigError(f"loss mgd.key: MGD distils feature maps only (use feats), got {key!r}")
        if isinstance(feats, str) or not feats:
            raise ConfigError("loss mgd.feats: expected a non-empty list of feature names")
        if not 0.0 <= float(lambda_mask) < 1.0:
            raise ConfigError(f"loss mgd.lambda_mask: must be in [0, 1), got {lambda_mask}")
        if float(alpha_mgd) <= 0:
            raise ConfigError(f"loss mgd.alpha_mgd: must be > 0, got {alpha_mgd}")
        self.feats: List[str] = [str(f) for f in feats]
        self.alpha_mgd, self.lambda_mask = float(alpha_mgd), float(lambda_mask)
        self.adapters = FeatureAdapters("mgd", always=True)
        self.generators = nn.ModuleDict()

    def bind(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        if teacher is None:
            return
        t_ch = widths(teacher, "teacher", "mgd")
        device = model_device(student)
        self.adapters.build(self.feats, widths(student, "student", "mgd"), t_ch, device)
        for name in self.feats:
            self._generator(name, t_ch[name], device)

    def _generator(self, name: str, channels: int, device: torch.device) -> nn.Module:
        if name not in self.generators:
            self.generators[name] = generation_block(channels).to(device)
        return self.generators[name]

    def student_parameters(self) -> Iterable[nn.Parameter]:
        return self.parameters()

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> torch.Tensor:
        teacher_out = need_teacher("mgd", teacher_out)
        total: Optional[torch.Tensor] = None
        for name, s, t in pairs(student_out, teacher_out, self.feats, self.adapters):
            t = resize_to(t.float(), tuple(s.shape[-2:]))
            gen = self._generator(name, t.shape[1], s.device)(s * random_mask(s, self.lambda_mask))
            term = (gen.float() - t).pow(2).sum() / s.shape[0]
            total = term if total is None else total + term
        return self.alpha_mgd * total
