"""Training batches that mix labelled and unlabelled images.

The train loader reads a :class:`MixedDataset` (the labelled set, then the
unlabelled set) through a :class:`MixedBatchSampler`. Conventions:

* **Shares.** Each batch of ``batch`` images holds ``u = round(ratio *
  batch)`` unlabelled and ``batch - u`` labelled indices (Python's
  ``round``); both shares must be at least 1.
* **Epoch.** An epoch is one pass over the labelled set: its labelled
  indices are exactly those a ``DistributedSampler(shuffle=True, seed)``
  with ``set_epoch(epoch)`` gives this rank, cut into labelled shares; the
  last incomplete share is dropped when there is at least one full one, as
  the plain train loader does. ``len(sampler)`` is the number of batches.
* **Unlabelled stream.** Unlabelled indices come from one endless stream of
  permutations of the unlabelled set (permutation ``k`` seeded by ``(seed,
  k)``); epoch ``e`` takes the ``e``-th window of ``len * u * world_size``
  positions and rank ``r`` every ``world_size``-th position from ``r``. So
  use counts of unlabelled images differ by at most one and ranks never
  share a position; an image repeats within a batch only when the batch
  spans the end of one permutation and the start of the next.
* The batches depend only on ``(seed, epoch, rank, world_size)`` and the
  two set sizes, never on worker count or global RNG state.
* Inside a batch the labelled indices come first. Indices are into the
  :class:`MixedDataset`: ``0..n_labeled-1`` labelled, ``n_labeled +
  j`` unlabelled image ``j``. Its items carry that same combined index
  (``batch["index"]``), so memory-bank losses (``crd``) need ``n_data =
  n_labeled + n_unlabeled``.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, List

import numpy as np
import torch

from mtkd.errors import ConfigError

#: Mixed into the seed of the unlabelled permutations (so they differ from the labelled one's).
_STREAM_TAG = 0x756E6C62


def mixed_shares(batch: int, ratio: float) -> tuple[int, int]:
    """``(labelled, unlabelled)`` images per batch for ``data.unlabeled_ratio``; ConfigError if one is 0."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
        raise ConfigError(f"data.unlabeled_ratio: must be a number in (0, 1), got {ratio!r}")
    u = int(round(ratio * batch))
    if not 1 <= u <= batch - 1:
        raise ConfigError(f"data.unlabeled_ratio: {ratio} of train.batch {batch} gives {u} unlabelled and "
                          f"{batch - u} labelled images per batch; both must be at least 1")
    return batch - u, u


class MixedBatchSampler:
    """Batch sampler over a :class:`MixedDataset`; see the module docstring.

    Args:
        n_labeled, n_unlabeled: sizes of the two sets.
        batch: images per batch (per rank).
        ratio: fraction of each batch drawn from the unlabelled set.
        seed: the run's seed.
        rank, world_size: this process's shard (``DistributedSampler`` style).
    """

    def __init__(self, n_labeled: int, n_unlabeled: int, batch: int, ratio: float, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if n_labeled < 1 or n_unlabeled < 1:
            raise ValueError(f"MixedBatchSampler needs both sets non-empty, got {n_labeled} and {n_unlabeled}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self.n_labeled, self.n_unlabeled = int(n_labeled), int(n_unlabeled)
        self.batch = int(batch)
        self.n_l, self.n_u = mixed_shares(self.batch, ratio)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epoch = 0
        # labelled indices per rank, as DistributedSampler(drop_last=False) pads them
        self.per_rank = math.ceil(self.n_labeled / self.world_size)
        self.steps = self.per_rank // self.n_l if self.per_rank >= self.n_l else 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps

    def _labeled(self) -> List[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n_labeled, generator=g).tolist()
        total = self.per_rank * self.world_size
        pad = total - len(order)
        if pad > 0:
            order += (order * math.ceil(pad / len(order)))[:pad]
        return order[self.rank:total:self.world_size]

    def _permutation(self, k: int) -> np.ndarray:
        return np.random.default_rng([self.seed, _STREAM_TAG, k]).permutation(self.n_unlabeled)

    def _unlabeled(self) -> List[int]:
        window = self.steps * self.n_u * self.world_size
        start = self.epoch * window
        first, last = start // self.n_unlabeled, (start + window - 1) // self.n_unlabeled
        stream = np.concatenate([self._permutation(k) for k in range(first, last + 1)])
        offset = start - first * self.n_unlabeled
        mine = stream[offset:offset + window][self.rank::self.world_size]
        return [self.n_labeled + int(j) for j in mine]

    def __iter__(self) -> Iterator[List[int]]:
        labeled, unlabeled = self._labeled(), self._unlabeled()
        for b in range(self.steps):
            yield labeled[b * self.n_l:(b + 1) * self.n_l] + unlabeled[b * self.n_u:(b + 1) * self.n_u]


class MixedDataset:
    """The labelled dataset followed by the unlabelled one (``ConcatDataset``-like).

    Item ``n_labeled + j`` is unlabelled item ``j`` with its ``index`` (item
    dict key or Sample attribute) shifted by ``n_labeled``, so indices stay
    unique over both sets. ``classes`` are the labelled set's.
    """

    def __init__(self, labeled: Any, unlabeled: Any) -> None:
        self.labeled, self.unlabeled = labeled, unlabeled
        self.n_labeled = len(labeled)
        self.classes = getattr(labeled, "classes", None)

    def __len__(self) -> int:
        return self.n_labeled + len(self.unlabeled)

    def __getitem__(self, i: int) -> Any:
        if i < 0 or i >= len(self):
            raise IndexError(f"index {i} outside 0..{len(self) - 1}")
        if i < self.n_labeled:
            return self.labeled[i]
        item = self.unlabeled[i - self.n_labeled]
        if isinstance(item, dict) and "index" in item:
            item = {**item, "index": int(item["index"]) + self.n_labeled}
        elif hasattr(item, "index"):
            item.index = int(item.index) + self.n_labeled
        return item

