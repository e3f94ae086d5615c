"""FT: factor transfer through a paraphraser (teacher) and a translator (student).

Kim, Park & Kwak, "Paraphrasing Complex Network: Network Compression via
Factor Transfer", NeurIPS 2018,
http://papers.nips.cc/paper/7541-paraphrasing-complex-network-network-compression-via-factor-transfer.pdf

Reference (AberHu/Knowledge-Distillation-Zoo ``kd_losses/ft.py``,
``network.py`` and ``train_ft.py``), kept as is:

* ``FT()(factor_s, factor_t) = l1(normalize(factor_s.view(B,-1)),
  normalize(factor_t.view(B,-1)))``: each sample's factor flattened and
  L2-normalised (``F.normalize``, eps 1e-12), then the mean absolute difference
  over B*D elements;
* :class:`Paraphraser` (teacher side): encoder of three 3x3 convs
  ``C_t -> C_t -> k*C_t -> k*C_t`` and a decoder of three 3x3 transposed convs
  back to ``C_t``, each followed by BatchNorm (``use_bn``; convs then have no
  bias) and LeakyReLU(0.1); ``forward`` returns ``(factor, reconstruction)``;
* :class:`Translator` (student side): the same encoder from ``C_s`` to
  ``k*C_t``; trained with the student;
* the paraphraser is *pre-trained* first on the teacher's map by MSE
  reconstruction with its own SGD (lr = 0.1 x the student's 0.1 = 0.01,
  momentum 0.9, weight decay 1e-4, no Nesterov), then frozen (eval mode, no
  grad) while the student and translator train; k = 0.5.
* Weight init as the reference: Kaiming-normal (fan_out, relu) for the
  ``Conv2d`` layers only (the transposed convs keep PyTorch's default), BN
  weight 1 and bias 0.

mtkd's protocol for the pre-training step: the paraphrasers are the
auxiliary group ``paraphraser`` of :class:`FTLoss` (:meth:`FTLoss.aux_groups`),
which the trainer steps after each main step, on the detached teacher maps,
for ``para_steps`` steps; the FT term contributes 0 until then; afterwards
the paraphraser is frozen and the FT term is active. For a separate
pre-training stage over a loader before the student trains (as the
reference's 30 paraphraser epochs), step that group with
:class:`mtkd.engine.aux.AuxOptimizers` on the teacher's outputs.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mtkd.losses._common import need_teacher
from mtkd.losses.base import AuxGroup, Loss, register
from mtkd.losses.zoo._adapt import FeaturePairs, get_feature, mean_of, zero_like_graph


class FT(nn.Module):
    """Tensor core: L1 between per-sample L2-normalised factors."""

    def forward(self, factor_s: torch.Tensor, factor_t: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(self.normalize(factor_s), self.normalize(factor_t))

    @staticmethod
    def normalize(factor: torch.Tensor) -> torch.Tensor:
        return F.normalize(factor.reshape(factor.shape[0], -1))


def _block(conv: nn.Module, channels: int, use_bn: bool) -> List[nn.Module]:
    return [conv, nn.BatchNorm2d(channels) if use_bn else nn.Identity(), nn.LeakyReLU(0.1)]


def _init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        if isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def _encoder(c_in: int, c_mid: int, c_factor: int, use_bn: bool) -> nn.Sequential:
    bias = not use_bn
    return nn.Sequential(
        *_block(nn.Conv2d(c_in, c_mid, 3, 1, 1, bias=bias), c_mid, use_bn),
        *_block(nn.Conv2d(c_mid, c_factor, 3, 1, 1, bias=bias), c_factor, use_bn),
        *_block(nn.Conv2d(c_factor, c_factor, 3, 1, 1, bias=bias), c_factor, use_bn),
    )


class Paraphraser(nn.Module):
    """Teacher-side auto-encoder; ``forward(x) -> (factor, reconstruction)``."""

    def __init__(self, in_channels_t: int, k: float, use_bn: bool = True):
        super().__init__()
        c_t, c_f = in_channels_t, int(in_channels_t * k)
        bias = not use_bn
        self.encoder = _encoder(c_t, c_t, c_f, use_bn)
        self.decoder = nn.Sequential(
            *_block(nn.ConvTranspose2d(c_f, c_f, 3, 1, 1, bias=bias), c_f, use_bn),
            *_block(nn.ConvTranspose2d(c_f, c_t, 3, 1, 1, bias=bias), c_t, use_bn),
            *_block(nn.ConvTranspose2d(c_t, c_t, 3, 1, 1, bias=bias), c_t, use_bn),
        )
        _init(self)

    def forward(self, x: torch.Tensor) -> tuple:
        z = self.encoder(x)
        return z, self.decoder(z)


class Translator(nn.Module):
    """Student-side encoder to the paraphraser's factor width ``int(k * C_t)``."""

    def __init__(self, in_channels_s: int, in_channels_t: int, k: float, use_bn: bool = True):
        super().__init__()
        self.encoder = _encoder(in_channels_s, in_channels_s, int(in_channels_t * k), use_bn)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


@register("ft")
class FTLoss(Loss):
    """Adapter: :class:`FT` between ``translator(student map)`` and the frozen
    ``paraphraser(teacher map)`` factor, averaged over ``feats`` (one
    paraphraser/translator pair per name, built on the first call from the
    maps' widths; the reference uses one layer, its last stage: ``feats: [p5]``).

    The student map is resized to the teacher's size before the translator so
    both factors have the same length. Translators are student parameters; the
    paraphrasers are an auxiliary group (SGD at ``para_lr``, ``para_momentum``,
    ``para_weight_decay``) excluded from :meth:`student_parameters`. The
    paraphraser step counter is the buffer ``para_done`` and the trainer
    checkpoints the group's optimizer, so a resumed run continues the
    pre-training where it stopped.
    """

    requires = frozenset({"teacher"})

    def __init__(self, feats: Optional[Sequence[str]] = None, k: float = 0.5, use_bn: bool = True,
                 para_steps: int = 200, para_lr: float = 0.01, para_momentum: float = 0.9,
                 para_weight_decay: float = 1e-4):
        super().__init__()
        self.core = FT()
        self.pairs = FeaturePairs("ft", feats, adapt=False)
        self.k = float(k)
        self.use_bn = bool(use_bn)
        self.para_steps = int(para_steps)
        self.para_opt_kwargs = dict(lr=float(para_lr), momentum=float(para_momentum),
                                    weight_decay=float(para_weight_decay))
        self.paraphrasers = nn.ModuleDict()
        self.translators = nn.ModuleDict()
        self.register_buffer("para_done", torch.zeros((), dtype=torch.long))

    # -- modules -------------------------------------------------------------------
    @property
    def paraphraser_ready(self) -> bool:
        return int(self.para_done) >= self.para_steps

    def paraphraser(self, name: str, ft: torch.Tensor) -> Paraphraser:
        if name not in self.paraphrasers:
            para = Paraphraser(ft.shape[1], self.k, self.use_bn).to(ft.device)
            self.paraphrasers[name] = para
            self._freeze_if_ready()
        return self.paraphrasers[name]

    def translator(self, name: str, fs: torch.Tensor, ft: torch.Tensor) -> Translator:
        if name not in self.translators:
            self.translators[name] = Translator(fs.shape[1], ft.shape[1], self.k, self.use_bn).to(fs.device)
        return self.translators[name]

    def _freeze_if_ready(self) -> None:
        if self.paraphraser_ready:
            for p in self.paraphrasers.parameters():
                p.requires_grad_(False)
                p.grad = None
            self.paraphrasers.eval()

    def train(self, mode: bool = True) -> "FTLoss":
        super().train(mode)
        self._freeze_if_ready()
        return self

    def student_parameters(self) -> Iterable[nn.Parameter]:
        return self.translators.parameters()

    # -- the KD term -----------------------------------------------------------------
    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> torch.Tensor:
        teacher_out = need_teacher("ft", teacher_out)
        names = self.pairs.names(student_out)
        pairs = self.pairs(student_out, teacher_out)
        terms = []
        for name, (fs, ft) in zip(names, pairs):
            para = self.paraphraser(name, ft)
            trans = self.translator(name, fs, ft)
            if not self.paraphraser_ready:
                terms.append(zero_like_graph(fs))
                continue
            with torch.no_grad():
                factor_t = para(ft)[0]
            terms.append(self.core(trans(fs), factor_t))
        return mean_of(terms)

    # -- paraphraser pre-training ------------------------------------------------------
    def aux_groups(self) -> List[AuxGroup]:
        return [AuxGroup("paraphraser", self.paraphrasers, self.para_step, optimizer="sgd",
                         active=lambda: not self.paraphraser_ready, after=self._para_stepped,
                         **self.para_opt_kwargs)]

    def para_step(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                  batch: Dict[str, Any]) -> Tuple[torch.Tensor, Dict[str, float]]:
        """The paraphrasers' MSE reconstruction of the teacher's maps (mean over
        ``feats``, or the student's feature names when unset) and its value."""
        teacher_out = need_teacher("ft", teacher_out)
        losses = []
        for name in self.pairs.names(student_out):
            ft = get_feature(teacher_out, name, "ft").detach()
            para = self.paraphraser(name, ft)
            para.train()
            losses.append(F.mse_loss(para(ft)[1], ft))
        loss = mean_of(losses)
        return loss, {"para_loss": float(loss.detach())}

    def _para_stepped(self) -> None:
        """Count a paraphraser step; freeze the paraphrasers once ``para_steps`` are done."""
        self.para_done += 1
        self._freeze_if_ready()
