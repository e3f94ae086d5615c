"""Backbones by name: any timm model or any smp encoder, one feature interface.

``build_backbone(name)`` returns a :class:`Backbone` whose forward gives the
four maps at strides 4, 8, 16 and 32 (``c2..c5``), with ``.channels`` and
``.strides`` describing them (timm's ``features_only`` interface, reduced to
the four levels a detector/segmenter pyramid needs).

* ``name`` without a prefix is a timm model, built with
  ``timm.create_model(name, features_only=True, pretrained=False)``.
* ``smp:<encoder>`` is a segmentation_models_pytorch encoder, built with
  ``get_encoder(encoder, weights=None)``; it returns six maps at strides
  1..32 and the last four are kept.
* ``cnn_w<N>`` (e.g. ``cnn_w8``) is mtkd's plain convolutional encoder
  (:class:`PlainCNN`) of base width ``N``: the small testbed's presets use it
  because plain 3x3 convolutions are the fastest layers per FLOP on a CPU
  (depthwise convolutions are not), so such models train to their plateau
  in minutes.

Weights are always random: nothing is downloaded.
"""
from __future__ import annotations

import re
from typing import List, Sequence, Tuple

import torch
from torch import nn

from mtkd.errors import ConfigError

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


def _timm_backbone(name: str, in_chans: int, key: str) -> Backbone:
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
    if len(reductions) != len(STRIDES):
        # Rebuild with only the four levels so unused taps are not returned.
        body = timm.create_model(name, features_only=True, pretrained=False, in_chans=in_chans,
                                 out_indices=tuple(body.feature_info.out_indices[i] for i in idx))
    return Backbone(body, body.feature_info.channels(), range(len(STRIDES)), name)


def _smp_backbone(encoder: str, in_chans: int, key: str) -> Backbone:
    from segmentation_models_pytorch.encoders import get_encoder

    try:
        body = get_encoder(encoder, in_channels=in_chans, depth=5, weights=None)
    except KeyError:
        raise ConfigError(f"{key}: unknown smp encoder {encoder!r}") from None
    # smp encoders return 6 maps at strides 1, 2, 4, 8, 16, 32.
    channels = list(body.out_channels)[2:6]
    return Backbone(body, channels, range(2, 6), f"smp:{encoder}")


def build_backbone(name: str, in_chans: int = 3, key: str = "model.backbone") -> Backbone:
    """Build a randomly initialised backbone; ``key`` names the config entry in errors."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{key}: expected a timm model name or 'smp:<encoder>', got {name!r}")
    if name.startswith("smp:"):
        return _smp_backbone(name[len("smp:"):], in_chans, key)
    plain = _PLAIN.fullmatch(name)
    if plain:
        width = int(plain.group(1))
        if width < 1:
            raise ConfigError(f"{key}: {name!r}: the width must be >= 1")
        body = PlainCNN(width, in_chans)
        return Backbone(body, body.channels, range(4), name)
    return _timm_backbone(name, in_chans, key)
