"""Shared plumbing between the trainer's loss interface and the zoo's tensor cores.

Every zoo loss is a tensor-level core (the exact formulation of the reference
implementation, AberHu/Knowledge-Distillation-Zoo) plus a thin registered
adapter ``(student_out, teacher_out, batch) -> scalar``. The adapters use the
helpers below to pick tensors out of the model output dicts:

* dense multi-task models: ``{"det", "seg": (B,K,H,W), "feats": {"c2".."c5","p3","p4","p5"}}``;
* classification models: ``{"logits": (B,C), "embed": (B,D), "feats": {"f1".."f4"}}``.

Conventions, shared by every zoo loss:

* Teacher tensors are always detached, as the reference's train scripts do
  (``out_t.detach()``), so no gradient reaches the teacher.
* Feature lists default to ``p3, p4, p5`` when the student's output has all of
  them, otherwise to every student feature in output order (``f1..f4`` for
  classifiers); see :func:`resolve_feats`.
* Teacher check: :func:`mtkd.losses._common.need_teacher`.
* Width mismatch: :class:`FeaturePairs` maps the student map to the teacher's
  width with a per-feature 1x1 convolution (no bias), made on the first call
  (the trainer's dry forward, before the optimizer is built), so no widths are
  needed in config. Its parameters are submodules of the loss and reach the
  optimizer. Losses whose maths compares maps of any width (AT, NST) switch it
  off.
* Size mismatch: the student map is bilinearly resized (``align_corners=False``)
  to the teacher map's spatial size.
* Several features: the loss is the mean over features, as the reference does
  for its three residual stages (``(l1 + l2 + l3) / 3``).
* Embeddings: ``out["embed"]`` by default (``p5`` pooled when the output has
  no ``embed``), or the global average pool of each named feature map.
* Per-pixel logits: (B,K,H,W) -> (B*H*W, K); with ``ignore_void`` pixels whose
  ``batch["masks"]`` is :data:`mtkd.structures.VOID` are dropped before the
  loss (so means and batchmeans are over labelled pixels).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from mtkd.errors import ConfigError
from mtkd.losses._common import FeatureAdapters
from mtkd.losses._functional import resize_to
from mtkd.structures import VOID

#: Neck levels of the dense multi-task models, the default feature list.
DENSE_FEATS: Tuple[str, ...] = ("p3", "p4", "p5")

Output = Dict[str, Any]


def get_output(out: Output, key: str, loss: str) -> torch.Tensor:
    """``out[key]`` (e.g. ``"logits"``, ``"seg"``, ``"embed"``) or a ConfigError."""
    if key not in out or out[key] is None:
        have = ", ".join(k for k in out if out[k] is not None)
        raise ConfigError(f"loss {loss!r}: key {key!r} not in the model output (has: {have})")
    return out[key]


def get_feature(out: Output, name: str, loss: str) -> torch.Tensor:
    """``out["feats"][name]`` or a ConfigError listing the available names."""
    feats = out.get("feats") or {}
    if name not in feats:
        raise ConfigError(f"loss {loss!r}: feats: {name!r} not in the model's feature maps "
                          f"(has: {', '.join(feats) or 'none'})")
    return feats[name]


def resolve_feats(feats: Optional[Sequence[str]], out: Output) -> List[str]:
    """The configured feature names, or the default for this output dict:
    ``p3, p4, p5`` when all are present, else every feature in output order."""
    if feats is not None:
        return list(feats)
    have = list((out.get("feats") or {}).keys())
    if all(n in have for n in DENSE_FEATS):
        return list(DENSE_FEATS)
    return have


def check_feats(feats: Optional[Sequence[str]], loss: str) -> Optional[List[str]]:
    """Validate a ``feats`` config value (a list of names or None)."""
    if feats is None:
        return None
    if isinstance(feats, str) or not all(isinstance(n, str) for n in feats) or not len(feats):
        raise ConfigError(f"loss {loss!r}: feats: expected a non-empty list of feature names, got {feats!r}")
    return list(feats)


def mean_of(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean of scalar loss terms (one per feature)."""
    total = values[0]
    for v in values[1:]:
        total = total + v
    return total / len(values)


class FeaturePairs(FeatureAdapters):
    """Picks (student, teacher) feature-map pairs and makes them comparable.

    ``forward(student_out, teacher_out) -> [(fs, ft), ...]`` in ``feats``
    order; ``ft`` is detached; ``fs`` is mapped to the teacher's width by a
    bias-free 1x1 conv (``adapt=True`` and widths differ; the adapters of
    :class:`~mtkd.losses._common.FeatureAdapters`, made on first use, one per
    feature name, in ``self.convs``, so they are parameters of the owning
    loss) and resized to the teacher's spatial size (``resize=True``).
    """

    def __init__(self, loss: str, feats: Optional[Sequence[str]] = None, adapt: bool = True,
                 resize: bool = True):
        super().__init__(loss, always=False, bias=False)
        self.feats = check_feats(feats, loss)
        self.adapt = adapt
        self.resize = resize

    def match(self, name: str, fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
        """``fs`` mapped to ``ft``'s width and spatial size."""
        if self.adapt:
            fs = self.to_teacher(name, fs, ft.shape[1])
        if self.resize and fs.dim() == 4:
            fs = resize_to(fs, ft.shape[-2:])
        return fs

    def names(self, student_out: Output) -> List[str]:
        names = resolve_feats(self.feats, student_out)
        if not names:
            raise ConfigError(f"loss {self.loss!r}: feats: the model output has no feature maps")
        return names

    def forward(self, student_out: Output, teacher_out: Output) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        pairs = []
        for name in self.names(student_out):
            fs = get_feature(student_out, name, self.loss)
            ft = get_feature(teacher_out, name, self.loss).detach()
            pairs.append((self.match(name, fs, ft), ft))
        return pairs


def get_embedding(out: Output, feat: Optional[str], loss: str) -> torch.Tensor:
    """(B,D) embedding: ``out["embed"]`` when ``feat`` is None, else the global
    average pool of feature map ``feat`` (dense models)."""
    if feat is None:
        emb = get_output(out, "embed", loss)
    else:
        fm = get_feature(out, feat, loss)
        emb = fm.mean(dim=(2, 3)) if fm.dim() == 4 else fm
    return emb.flatten(1)


def embedding_pairs(student_out: Output, teacher_out: Output, feats: Optional[Sequence[str]],
                    loss: str) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """[(emb_s, emb_t.detach())] for ``feats``. ``None``: the ``embed``
    output when the model has one (classifiers), else the pooled last default
    feature map (``p5`` for dense models)."""
    names: List[Optional[str]]
    if feats is not None:
        names = list(feats)
    elif student_out.get("embed") is not None:
        names = [None]
    else:
        names = resolve_feats(None, student_out)[-1:] or [None]
    return [(get_embedding(student_out, n, loss), get_embedding(teacher_out, n, loss).detach())
            for n in names]


def flatten_pixels(logits: torch.Tensor) -> torch.Tensor:
    """(B,K,H,W) -> (B*H*W, K); (B,K) is returned as is."""
    if logits.dim() == 2:
        return logits
    return logits.movedim(1, -1).reshape(-1, logits.shape[1])


def valid_pixels(batch: Dict[str, Any], logits: torch.Tensor, loss: str) -> torch.Tensor:
    """(B*H*W,) bool: pixels of ``batch["masks"]`` that are not VOID, with the
    mask nearest-resized to the logits' size if they differ."""
    if "masks" not in batch:
        raise ConfigError(f"loss {loss!r}: ignore_void: the batch has no 'masks'")
    masks = batch["masks"]
    if tuple(masks.shape[-2:]) != tuple(logits.shape[-2:]):
        masks = F.interpolate(masks[:, None].float(), size=tuple(logits.shape[-2:]), mode="nearest")[:, 0]
    return (masks != VOID).reshape(-1).to(logits.device)


def logit_pair(student_out: Output, teacher_out: Output, batch: Dict[str, Any], key: str,
               ignore_void: bool, loss: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(N,K) student logits and detached teacher logits for ``key``.

    Classification logits (B,C) pass through; dense logits (B,K,H,W) become
    one row per pixel; ``ignore_void`` keeps only non-VOID pixels (dense only).
    """
    ls = get_output(student_out, key, loss)
    lt = get_output(teacher_out, key, loss).detach()
    if ls.shape != lt.shape:
        raise ConfigError(f"loss {loss!r}: key {key!r}: student {tuple(ls.shape)} and teacher "
                          f"{tuple(lt.shape)} logits differ in shape")
    if ignore_void and ls.dim() != 4:
        raise ConfigError(f"loss {loss!r}: ignore_void applies to dense (B,K,H,W) logits only")
    keep = valid_pixels(batch, ls, loss) if ignore_void else None
    ls, lt = flatten_pixels(ls), flatten_pixels(lt)
    if keep is not None:
        ls, lt = ls[keep], lt[keep]
    return ls, lt


def zero_like_graph(x: torch.Tensor) -> torch.Tensor:
    """A scalar 0 that stays connected to ``x``'s graph (so backward works
    when a term has nothing to compare, e.g. every pixel VOID)."""
    return x.sum() * 0.0
