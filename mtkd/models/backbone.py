"""Backbones by name: any timm model or any smp encoder, one feature interface.

``build_backbone(name)`` returns a :class:`Backbone` whose forward gives the
four maps at strides 4, 8, 16 and 32 (``c2..c5``), with ``.channels`` and
``.strides`` describing them (timm's ``features_only`` interface, reduced to
the four levels a detector/segmenter pyramid needs).

* ``name`` without a prefix is a timm model, built with
  ``timm.create_model(name, features_only=True)``.
* ``smp:<encoder>`` is a segmentation_models_pytorch encoder, built with
  ``get_encoder(encoder)``; it returns six maps at strides 1..32 and the
  last four are kept.
* ``cnn_w<N>`` (e.g. ``cnn_w8``) is mtkd's plain convolutional encoder
  (:class:`PlainCNN`) of base width ``N``: the small testbed's presets use it
  because plain 3x3 convolutions are the fastest layers per FLOP on a CPU
  (depthwise convolutions are not), so such models train in minutes. It has
  no published weights: ``pretrained`` may only be a path.

Initial weights follow ``pretrained`` (``model.pretrained``, see
:mod:`mtkd.pretrained`): ``False`` random; ``True`` the library's own
(timm ``pretrained=True``; smp ``weights="imagenet"``, or ``True`` for its
``tu-`` encoders), which timm / smp download; a path: a local state dict of
the encoder as built here (``Backbone.body``, e.g. a saved
``model.backbone.body.state_dict()``; a leading ``body.`` on every key is
dropped), loaded strictly.
"""
from __future__ import annotations

import re
from typing import List, Sequence, Tuple

import torch
from torch import nn

from mtkd.errors import ConfigError
from mtkd.pretrained import Pretrained, check_pretrained, load_state_file

#: The strides every backbone must expose, in order (c2, c3, c4, c5).
STRIDES: Tuple[int, ...] = (4, 8, 16, 32)


class Backbone(nn.Module):
    """Wraps a feature extractor and picks the maps at :data:`STRIDES`.

    ``body(x)`` must return a list of maps; ``pick`` are the indices of the
    stride-4..32 maps in that list.
    """

    def __init__(self, body: nn.Module, channels: Sequence[int], pick: Sequence[int], name: str):
        super().__init__()
        self.body = body
        self.channels: Tuple[int, ...] = tuple(int(c) for c in channels)
        self.strides: Tuple[int, ...] = STRIDES
        self.pick: Tuple[int, ...] = tuple(pick)
        self.name = name

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        feats = self.body(x)
        return [feats[i] for i in self.pick]


class PlainCNN(nn.Module):
    """A VGG-style encoder: a stride-2 stem, then one stage per stride 4..32.

    Each stage is a stride-2 3x3 ``Conv`` (conv + BatchNorm + SiLU,
    Ultralytics' block) followed by one more 3x3 ``Conv``; widths are
    ``w, 2w, 4w, 8w`` at strides 4, 8, 16, 32. ``forward`` returns the four
    stage outputs.
    """

    def __init__(self, width: int, in_chans: int = 3):
        super().__init__()
        from ultralytics.nn.modules import Conv

        if width < 1:
            raise ValueError(f"PlainCNN: width must be >= 1, got {width}")
        self.stem = Conv(in_chans, width, 3, 2)
        widths = [width, 2 * width, 4 * width, 8 * width]
        stages, c_in = [], width
        for c in widths:
            stages.append(nn.Sequential(Conv(c_in, c, 3, 2), Conv(c, c, 3)))
            c_in = c
        self.stages = nn.ModuleList(stages)
        self.channels = tuple(widths)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.stem(x)
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out


_PLAIN = re.compile(r"cnn_w(\d+)")


def _plain_backbone(name: str, width: int, in_chans: int, key: str, pretrained: bool,
                    pretrained_key: str) -> Backbone:
    if width < 1:
        raise ConfigError(f"{key}: {name!r}: the width must be >= 1")
    if pretrained:
        raise ConfigError(f"{pretrained_key}: {name!r} has no published weights; give the path of a state dict")
    body = PlainCNN(width, in_chans)
    return Backbone(body, body.channels, range(4), name)


def _timm_backbone(name: str, in_chans: int, key: str, pretrained: bool) -> Backbone:
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"{key}: unknown timm model {name!r} (use 'smp:<encoder>' for smp encoders)")
    try:
        body = timm.create_model(name, features_only=True, pretrained=False, in_chans=in_chans)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(f"{key}: timm model {name!r} has no features_only interface: {exc}") from None
    reductions = list(body.feature_info.reduction())
    missing = [s for s in STRIDES if s not in reductions]
    if missing:
        raise ConfigError(f"{key}: timm model {name!r} has no feature map at stride(s) {missing}")
    idx = [reductions.index(s) for s in STRIDES]
    if len(reductions) != len(STRIDES) or pretrained:
        # Rebuild with only the four levels so unused taps are not returned (and, when asked,
        # with timm's pretrained weights: the probe build above never fetches them).
        body = timm.create_model(name, features_only=True, pretrained=pretrained, in_chans=in_chans,
                                 out_indices=tuple(body.feature_info.out_indices[i] for i in idx))
    return Backbone(body, body.feature_info.channels(), range(len(STRIDES)), name)


def _smp_backbone(encoder: str, in_chans: int, key: str, pretrained: bool) -> Backbone:
    from segmentation_models_pytorch.encoders import get_encoder

    # smp's own default weights: "imagenet"; its timm-universal ("tu-") encoders take True
    weights = (True if encoder.startswith("tu-") else "imagenet") if pretrained else None
    try:
        body = get_encoder(encoder, in_channels=in_chans, depth=5, weights=weights)
    except KeyError as exc:
        reason = str(exc).strip("'\"")  # smp lists the encoder's available weights in it
        if "pretrained weights" in reason:
            raise ConfigError(f"{key}: smp encoder {encoder!r} has no 'imagenet' weights ({reason[:200]})") from None
        raise ConfigError(f"{key}: unknown smp encoder {encoder!r}") from None
    # smp encoders return 6 maps at strides 1, 2, 4, 8, 16, 32.
    channels = list(body.out_channels)[2:6]
    return Backbone(body, channels, range(2, 6), f"smp:{encoder}")


def build_backbone(name: str, in_chans: int = 3, key: str = "model.backbone",
                   pretrained: Pretrained = False, pretrained_key: str = "model.pretrained") -> Backbone:
    """Build a backbone; ``key`` / ``pretrained_key`` name the config entries in errors.

    ``pretrained``: ``False`` (random init), ``True`` (timm's / smp's own
    weights) or the path of a local state dict of the encoder (see the module doc).
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{key}: expected a timm model name or 'smp:<encoder>', got {name!r}")
    pretrained = check_pretrained(pretrained, pretrained_key)
    plain = _PLAIN.fullmatch(name)
    if name.startswith("smp:"):
        backbone = _smp_backbone(name[len("smp:"):], in_chans, key, pretrained is True)
    elif plain:
        backbone = _plain_backbone(name, int(plain.group(1)), in_chans, key, pretrained is True, pretrained_key)
    else:
        backbone = _timm_backbone(name, in_chans, key, pretrained is True)
    if isinstance(pretrained, str):
        load_state_file(backbone.body, pretrained, pretrained_key, prefixes=("body.",))
    return backbone
