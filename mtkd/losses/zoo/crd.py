"""CRD: contrastive representation distillation.

Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020,
https://openreview.net/pdf?id=SkgpBJrtvS

Reference (AberHu/Knowledge-Distillation-Zoo ``kd_losses/crd.py``, after
RepDistiller), ``CRD(s_dim, t_dim, feat_dim, nce_n, nce_t, nce_mom, n_data)
(feat_s, feat_t, idx, sample_idx)``:

* ``Embed``: flatten -> linear -> L2 normalise, one for each model;
* ``ContrastMemory``: two memory banks (n_data x feat_dim, initialised
  uniform in ``[-1/sqrt(feat_dim/3), 1/sqrt(feat_dim/3)]``). ``sample_idx``
  (B, nce_n + 1) holds each sample's positive (column 0) and nce_n negatives.
  Teacher anchor: ``out_t = exp(<memory_s[sample_idx], e_t> / nce_t)``;
  student anchor: ``out_s = exp(<memory_t[sample_idx], e_s> / nce_t)``; each is
  divided by its normaliser ``Z = mean(out) * n_data``, fixed from the first
  batch. Then both banks move to ``normalise(m * memory[idx] + (1 - m) * e)``
  at the batch's dataset indices ``idx``;
* ``ContrastLoss`` (Eq. 18) on each side, with ``N = nce_n`` and ``M = n_data``:
  ``-(sum log(x_0 / (x_0 + N/M + 1e-7)) + sum log((N/M) / (x_j + N/M + 1e-7))) / B``;
  the loss is the sum of the two sides.

Conventions and fixed defects (documented deviations):

* The reference squeezes the (B, N+1, 1) scores with ``.squeeze()``, which
  drops the batch dimension at batch size 1 (and the loss then fails); here
  they are reshaped to (B, N+1).
* ``Z_t``/``Z_s`` are buffers (0 = not yet set) rather than Python floats, so
  they are checkpointed with the memory banks in ``state_dict``.
* The banks are updated only in training mode, so evaluation passes (with
  other datasets' indices) leave them alone.
* ``s_dim``/``t_dim`` may be None: the embedding is then an ``nn.LazyLinear``
  sized by the first call (the trainer's dry forward).

The adapter draws ``sample_idx`` itself: the positive is the sample's own
index (the reference's 'exact' mode) and the ``nce_k`` negatives are drawn
uniformly with replacement from all ``n_data`` indices (RepDistiller's
sampler when no contrast indices are given; the reference's class-aware
negatives need every training label, which a detection dataset does not
have). It reads ``batch["index"]`` and needs ``n_data``, the training set size.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mtkd.errors import ConfigError
from mtkd.losses._common import need_teacher
from mtkd.losses.base import Loss, register
from mtkd.losses.zoo._adapt import get_embedding
from mtkd.losses.zoo.cc import embedding_feat


class Embed(nn.Module):
    """Flatten, project linearly to ``out_dim`` and L2-normalise."""

    def __init__(self, in_dim: Optional[int], out_dim: int):
        super().__init__()
        self.linear = nn.LazyLinear(out_dim) if in_dim is None else nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.reshape(x.shape[0], -1)), p=2, dim=1)


class ContrastLoss(nn.Module):
    """NCE loss of Eq. (18): column 0 is the positive, the rest negatives."""

    def __init__(self, n_data: int, eps: float = 1e-7):
        super().__init__()
        self.n_data = n_data
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bs, n = x.shape[0], x.shape[1] - 1
        noise = n / float(self.n_data)
        pos = x[:, 0]
        log_pos = torch.log(pos / (pos + (noise + self.eps)))
        neg = x[:, 1:]
        log_neg = torch.log(torch.full_like(neg, noise) / (neg + (noise + self.eps)))
        return -(log_pos.sum() + log_neg.sum()) / bs


class ContrastMemory(nn.Module):
    """The two memory banks, the contrast scores and the momentum update."""

    def __init__(self, feat_dim: int, n_data: int, nce_n: int, nce_t: float, nce_mom: float):
        super().__init__()
        self.N = int(nce_n)
        self.T = float(nce_t)
        self.momentum = float(nce_mom)
        stdv = 1.0 / math.sqrt(feat_dim / 3.0)
        self.register_buffer("memory_t", torch.rand(n_data, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_s", torch.rand(n_data, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("Z_t", torch.zeros(()))
        self.register_buffer("Z_s", torch.zeros(()))

    def _scores(self, memory: torch.Tensor, anchor: torch.Tensor, sample_idx: torch.Tensor) -> torch.Tensor:
        bs, dim = anchor.shape
        weight = memory.index_select(0, sample_idx.reshape(-1)).detach().view(bs, self.N + 1, dim)
        return torch.exp(torch.bmm(weight, anchor.view(bs, dim, 1)) / self.T).view(bs, self.N + 1)

    def _update(self, memory: torch.Tensor, feat: torch.Tensor, idx: torch.Tensor) -> None:
        pos = memory.index_select(0, idx) * self.momentum + feat.to(memory.dtype) * (1 - self.momentum)
        memory.index_copy_(0, idx, F.normalize(pos, p=2, dim=1))

    def forward(self, feat_s: torch.Tensor, feat_t: torch.Tensor, idx: torch.Tensor,
                sample_idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        n_data = self.memory_s.shape[0]
        out_t = self._scores(self.memory_s, feat_t, sample_idx)
        out_s = self._scores(self.memory_t, feat_s, sample_idx)
        if self.Z_t.item() <= 0:
            self.Z_t.fill_((out_t.mean() * n_data).item())
        if self.Z_s.item() <= 0:
            self.Z_s.fill_((out_s.mean() * n_data).item())
        out_t = out_t / self.Z_t
        out_s = out_s / self.Z_s
        if self.training:
            with torch.no_grad():
                self._update(self.memory_t, feat_t, idx)
                self._update(self.memory_s, feat_s, idx)
        return out_s, out_t


class CRD(nn.Module):
    """Tensor core: both contrastive sides summed (see module doc)."""

    def __init__(self, s_dim: Optional[int], t_dim: Optional[int], feat_dim: int, nce_n: int,
                 nce_t: float, nce_mom: float, n_data: int):
        super().__init__()
        self.embed_s = Embed(s_dim, feat_dim)
        self.embed_t = Embed(t_dim, feat_dim)
        self.contrast = ContrastMemory(feat_dim, n_data, nce_n, nce_t, nce_mom)
        self.criterion_s = ContrastLoss(n_data)
        self.criterion_t = ContrastLoss(n_data)

    def forward(self, feat_s: torch.Tensor, feat_t: torch.Tensor, idx: torch.Tensor,
                sample_idx: torch.Tensor) -> torch.Tensor:
        out_s, out_t = self.contrast(self.embed_s(feat_s), self.embed_t(feat_t), idx, sample_idx)
        return self.criterion_s(out_s) + self.criterion_t(out_t)


@register("crd")
class CRDLoss(Loss):
    """Adapter: :class:`CRD` on pooled embeddings (``out["embed"]`` on
    classifiers, the global average pool of ``feat``, default ``"p5"``, on
    dense models) with the batch's dataset indices.

    Defaults as the reference's train script: ``feat_dim=128``,
    ``nce_k=16384`` negatives, ``nce_t=0.1``, ``nce_m=0.5`` (the reference
    calls them ``nce_n`` and ``nce_mom``). ``n_data`` (the training set size)
    has no default.
    """

    requires = frozenset({"teacher", "index"})

    def __init__(self, n_data: Optional[int] = None, feat_dim: int = 128, nce_k: int = 16384,
                 nce_t: float = 0.1, nce_m: float = 0.5, feat: Optional[str] = None):
        super().__init__()
        if n_data is None or int(n_data) < 1:
            raise ConfigError("loss 'crd': n_data: required, the number of training samples "
                              f"(size of the memory bank); got {n_data!r}")
        if int(nce_k) < 1 or int(feat_dim) < 1:
            raise ConfigError(f"loss 'crd': nce_k and feat_dim must be positive, got {nce_k}, {feat_dim}")
        self.n_data = int(n_data)
        self.nce_k = int(nce_k)
        self.feat = feat
        self.core = CRD(None, None, int(feat_dim), self.nce_k, nce_t, nce_m, self.n_data)

    def sample_indices(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, nce_k + 1): own index first, then uniform negatives."""
        neg = torch.randint(0, self.n_data, (idx.shape[0], self.nce_k), device=idx.device)
        return torch.cat([idx[:, None], neg], dim=1)

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> torch.Tensor:
        teacher_out = need_teacher("crd", teacher_out)
        if batch.get("index") is None:
            raise ConfigError("loss 'crd': the batch has no 'index' (dataset indices of the samples)")
        device = self.core.contrast.memory_s.device
        idx = torch.as_tensor(batch["index"], dtype=torch.long, device=device).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.n_data):
            raise ConfigError(f"loss 'crd': n_data: batch index {int(idx.max())} outside "
                              f"[0, {self.n_data}); set n_data to the training set size")
        name = embedding_feat(student_out, self.feat)
        emb_s = get_embedding(student_out, name, "crd")
        emb_t = get_embedding(teacher_out, name, "crd").detach()
        return self.core(emb_s, emb_t, idx, self.sample_indices(idx))
