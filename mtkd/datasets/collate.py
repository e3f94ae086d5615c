"""Stack transformed items into the batch dict of :data:`mtkd.structures.BATCH_KEYS`."""
from __future__ import annotations

from typing import Any, Dict, Sequence

import torch

from mtkd.structures import BATCH_KEYS


def collate(items: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Batch items from :class:`mtkd.datasets.transforms.Transform`.

    Images and masks are stacked (all items share the letterbox size); boxes
    and labels stay per-image lists. Samples without segmentation labels
    already carry an all-VOID mask.
    """
    if not items:
        raise ValueError("collate needs at least one item")
    batch = {
        "images": torch.stack([it["image"] for it in items]).float(),
        "boxes": [it["boxes"].float().reshape(-1, 4) for it in items],
        "labels": [it["labels"].long().reshape(-1) for it in items],
        "masks": torch.stack([it["mask"] for it in items]).long(),
        "has_det": torch.tensor([bool(it["has_det"]) for it in items], dtype=torch.bool),
        "has_seg": torch.tensor([bool(it["has_seg"]) for it in items], dtype=torch.bool),
        "ids": [str(it["id"]) for it in items],
        "index": torch.tensor([int(it["index"]) for it in items], dtype=torch.int64),
        "orig_sizes": torch.tensor([list(it["orig_size"]) for it in items], dtype=torch.int64),
        "letterbox": torch.tensor([list(it["letterbox"]) for it in items], dtype=torch.float32),
    }
    assert batch.keys() == BATCH_KEYS.keys()
    return batch
