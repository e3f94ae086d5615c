"""Drawing classifier predictions: ``val_pred.png``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn


def draw_val(model: nn.Module, dataset: Any, path: str | Path, mean: Sequence[float], std: Sequence[float],
             imgsz: int, device: torch.device, n: int = 8) -> None:
    """The first ``n`` images of ``dataset`` in a row (tiles of at least
    96 px), each captioned ``pred prob`` over ``gt`` (green when right,
    red when wrong), saved to ``path``.

    ``mean``/``std`` undo the dataset's normalisation for display. The model
    runs in eval mode under ``no_grad``; its previous mode is restored.
    """
    from PIL import Image, ImageDraw

    size = max(int(imgsz), 96)  # tiles wide enough for the captions
    items = [dataset[i] for i in range(min(n, len(dataset)))]
    if not items:
        return
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            prob = model(torch.stack([it["image"] for it in items]).to(device))["logits"].float().softmax(1)
    finally:
        model.train(was_training)
    conf, pred = prob.max(1)
    canvas = Image.new("RGB", (size * len(items), size + 28), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    for j, it in enumerate(items):
        img = ((it["image"] * s + m).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        canvas.paste(Image.fromarray(img).resize((size, size), Image.NEAREST), (j * size, 0))
        ok = int(pred[j]) == it["label"]
        draw.text((j * size + 2, size + 1), f"{dataset.classes[int(pred[j])]} {float(conf[j]):.2f}",
                  fill=(0, 140, 0) if ok else (200, 0, 0))
        draw.text((j * size + 2, size + 14), dataset.classes[it["label"]], fill=(0, 0, 0))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
